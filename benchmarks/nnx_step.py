"""Training-step time of the NNX models (`cbam_jax.nnx`) against the Linen model they wrap.

    python -m benchmarks.nnx_step                          # CIFAR CBAM-ResNet-18, 32px, batch 32
    python -m benchmarks.nnx_step --model cbam_resnet50 --stem imagenet --size 224 --batch 8

Variants, all the same model and weights, timed round-robin in one process (median and min-max of
`--rounds` calls each, after a compiling call):
- linen: `jax.jit` of a functional step over (params, batch_stats, opt_state);
- nnx.jit: `nnx.jit` of a step on the NNX model and an `nnx.Optimizer` (the NNX tutorial's loop);
- nnx split/merge: `jax.jit` of a step on `nnx.split((model, optimizer))` state, merged inside (the
  loop Flax's performance guide recommends when Python overhead matters).
Each step: forward in training mode, cross-entropy, backward, SGD with momentum 0.9, BatchNorm
running averages updated.
"""

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import cbam_jax.nnx
from benchmarks.throughput import make_train_step
from cbam_jax.registry import create_model


def linen_step(model, variables, optimizer, images, labels) -> Callable[[], jax.Array]:
    """A blocking call of the Linen step (its state carried between calls)."""
    step = jax.jit(make_train_step(model, optimizer), donate_argnums=0)
    state = [(variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))]

    def call():
        state[0], loss = step(state[0], images, labels)
        return jax.block_until_ready(loss)

    return call


def _loss(model: nnx.Module, images: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()


def nnx_jit_step(model: nnx.Module, optimizer: optax.GradientTransformation, images, labels) -> Callable[[], jax.Array]:
    """A blocking call of `nnx.jit(step)(model, nnx.Optimizer)`."""
    model.train()
    trainer = nnx.Optimizer(model, optimizer, wrt=nnx.Param)

    @nnx.jit(donate_argnums=(0, 1))
    def step(model, trainer, images, labels):
        loss, grads = nnx.value_and_grad(_loss)(model, images, labels)
        trainer.update(model, grads)
        return loss

    return lambda: jax.block_until_ready(step(model, trainer, images, labels))


def nnx_split_step(model: nnx.Module, optimizer: optax.GradientTransformation, images, labels) -> Callable[[], jax.Array]:
    """A blocking call of `jax.jit(step)(state)` with the graph split once, outside the loop."""
    model.train()
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optimizer, wrt=nnx.Param)))

    @jax.jit
    def step(state, images, labels):
        model, trainer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(_loss)(model, images, labels)
        trainer.update(model, grads)
        return nnx.state((model, trainer)), loss

    carried = [state]

    def call():
        carried[0], loss = step(carried[0], images, labels)
        return jax.block_until_ready(loss)

    return call


def time_round_robin(calls: dict[str, Callable[[], jax.Array]], rounds: int) -> dict[str, dict[str, float]]:
    """{name: {'first_s', 'median_s', 'min_s', 'max_s'}}: one compiling call each, then `rounds` rounds."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    first = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        first[name] = time.perf_counter() - start
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: {"first_s": first[name], "median_s": statistics.median(values), "min_s": min(values),
                   "max_s": max(values)} for name, values in times.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nnx_step", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cbam_resnet18")
    parser.add_argument("--stem", choices=("imagenet", "cifar"), default="cifar")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--implementation", choices=("auto", "cpu", "xla"), default="auto")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((args.batch, args.size, args.size, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)
    optimizer = optax.sgd(0.1, momentum=0.9)
    options = dict(num_classes=10, stem=args.stem, implementation=args.implementation)
    model = create_model(args.model, **options)
    variables = cbam_jax.nnx.init_linen(model, nnx.Rngs(0), 3)
    copy = lambda: jax.tree.map(jnp.copy, variables)  # each variant donates its own buffers
    calls = {
        "linen": linen_step(model, copy(), optimizer, images, labels),
        "nnx.jit": nnx_jit_step(cbam_jax.nnx.from_linen(model, copy()), optimizer, images, labels),
        "nnx split/merge": nnx_split_step(cbam_jax.nnx.from_linen(model, copy()), optimizer, images, labels),
    }
    results = time_round_robin(calls, args.rounds)
    print(f"{args.model} ({args.stem} stem) {args.size}px batch {args.batch}, implementation={args.implementation}, "
          f"jax {jax.__version__}, {jax.devices()[0].platform}, {args.rounds} rounds")
    print("| variant | step ms (median) | min-max | first call s |\n|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['median_s'] * 1e3:.0f} | {result['min_s'] * 1e3:.0f}-{result['max_s'] * 1e3:.0f} "
              f"| {result['first_s']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
