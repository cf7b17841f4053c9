"""How far reduced precision moves cbam-jax's outputs on the current device: a table of relative errors.

    python -m benchmarks.precision                                # cbam_resnet50, 224px, batch 8
    python -m benchmarks.precision --model cbam_resnet18 --size 32 --batch 64 --stem cifar

For eval logits and for the gradient of one training step's loss, each setting is compared with
float32 at `precision='highest'` (true float32 products, no TF32) on the same device and inputs:

- float32 at the default precision (on NVIDIA GPUs from Ampere on, XLA may run float32
  convolutions and matrix products in TF32: about 3e-4 relative per product);
- bfloat16 activations with float32 parameters (`create_model(..., dtype=jnp.bfloat16)`).

Reported: ||out - ref|| / ||ref||, the max abs difference of the logits and the cosine between
the gradient vectors. Float32 lands far under 1e-3; bfloat16 logits typically at 1e-3 to 1e-2.
Gradients of a whole network in bfloat16 move more (0.1-0.3 relative at batch 8 on the CPU, in
plain ResNets as much as in CBAM ones) while keeping their direction (cosine near 1). The
parameters are random (not the initial ones) so BatchNorm scales and biases are not at special
values.
"""

import argparse
import contextlib
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.throughput import NUM_CLASSES
from cbam_jax.registry import create_model


def _randomised(variables, seed: int = 0):
    """Every leaf replaced by N(0, 0.5^2)-ish values; BatchNorm variances kept positive; kernels at init scale."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys):
        name = getattr(path[-1], "key", "")
        if name == "kernel":
            out.append(leaf)  # keep the init scale so activations stay O(1) through 50 layers
        elif name == "var":
            out.append(jnp.abs(jax.random.normal(key, leaf.shape)) * 0.5 + 0.5)
        else:
            out.append(jax.random.normal(key, leaf.shape) * (0.1 if name in ("bias", "mean") else 0.3)
                       + (1.0 if name == "scale" else 0.0))
    return jax.tree_util.tree_unflatten(treedef, out)


def _outputs(model, variables, images, labels):
    """(eval logits, loss gradient of a train-mode forward) as float32 arrays."""
    logits = model.apply(variables, images, train=False)

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), labels).mean()

    grads = jax.grad(loss)(variables["params"])
    flat = jnp.concatenate([g.astype(jnp.float32).ravel() for g in jax.tree.leaves(grads)])
    return logits.astype(jnp.float32), flat


def _errors(out: jax.Array, ref: jax.Array) -> tuple[float, float, float]:
    """||out - ref|| / ||ref||, max |out - ref| and the cosine of the angle between them."""
    out, ref = np.asarray(out, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    cosine = float(out @ ref / (np.linalg.norm(out) * np.linalg.norm(ref)))
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref)), float(np.max(np.abs(out - ref))), cosine


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cbam_resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--stem", choices=sorted(NUM_CLASSES), default="imagenet")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((args.batch, args.size, args.size, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES[args.stem], args.batch))
    settings = {"float32, precision=highest (reference)": (jnp.float32, "highest"),
                "float32, default precision": (jnp.float32, None),
                "bfloat16 activations": (jnp.bfloat16, None)}
    results = {}
    variables = None
    for label, (dtype, precision) in settings.items():
        model = create_model(args.model, num_classes=NUM_CLASSES[args.stem], stem=args.stem, dtype=dtype)
        if variables is None:
            variables = _randomised(jax.jit(model.init)(jax.random.PRNGKey(0), images))
        with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
            results[label] = jax.jit(lambda v, x, y, m=model: _outputs(m, v, x, y))(variables, images, labels)
    device = jax.devices()[0]
    print(f"{args.model} {args.size}px batch {args.batch}, random parameters; JAX {jax.__version__} on "
          f"{device.platform} ({device.device_kind})\n")
    print("| setting | logits rel. error | logits max abs | grads rel. error | grads cosine |")
    print("|---|---:|---:|---:|---:|")
    reference = results[next(iter(settings))]
    for label, (logits, grads) in results.items():
        logit_rel, logit_abs, _ = _errors(logits, reference[0])
        grad_rel, _, grad_cosine = _errors(grads, reference[1])
        print(f"| {label} | {logit_rel:.1e} | {logit_abs:.1e} | {grad_rel:.1e} | {grad_cosine:.5f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
