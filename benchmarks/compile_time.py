"""Compile time of a cbam-jax training step: cold, and warm from JAX's persistent compilation cache.

    python -m benchmarks.compile_time                      # cbam_resnet50, 224px, batch 32
    python -m benchmarks.compile_time --model cbam_resnet18 --size 32 --batch 64 --stem cifar

Each measurement runs in a fresh Python process (a warm start is a new process finding the
program in the cache directory): first with an empty cache directory, then again with the same
directory. Reported: seconds for `jit(train_step).lower(...).compile()`, tracing included; and the
same through `cbam_jax.step_cache.cached_step` (the step exported with `jax.export` on the cold
run, loaded without tracing on the warm one), from a cold start to a compiled step.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence


def _child(args: argparse.Namespace) -> None:
    import jax

    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import jax.numpy as jnp
    import optax

    from benchmarks.throughput import NUM_CLASSES, make_train_step
    from cbam_jax.registry import create_model

    model = create_model(args.model, num_classes=NUM_CLASSES[args.stem], stem=args.stem, implementation=args.implementation)
    images = jax.ShapeDtypeStruct((args.batch, args.size, args.size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
    optimizer = optax.sgd(0.1, momentum=0.9)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    state = (variables["params"], variables["batch_stats"], jax.eval_shape(optimizer.init, variables["params"]))
    if args.implementation != "xla" and jax.default_backend() == "cpu":
        from cbam_jax.layers import native

        native.available()  # build or load the native kernels outside the timing (a one-off, cached on disk)
    start = time.perf_counter()
    if args.via == "export":
        from cbam_jax.registry import model_config
        from cbam_jax.step_cache import cached_step

        step = make_train_step(model, optimizer)
        call, loaded = cached_step(step, (state, images, labels), os.path.join(args.cache_dir, "steps"),
                                   key=json.dumps(model_config(model), sort_keys=True))
        call.lower(state, images, labels).compile()
    else:
        loaded = None
        jax.jit(make_train_step(model, optimizer), donate_argnums=0).lower(state, images, labels).compile()
    print(json.dumps({"compile_s": time.perf_counter() - start, "loaded": loaded}))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_time", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cbam_resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--stem", choices=("imagenet", "cifar"), default="imagenet")
    parser.add_argument("--implementation", choices=("auto", "cpu", "xla"), default="auto")
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--via", choices=("jit", "export"), default="jit", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    results = {}
    for via in ("jit", "export"):
        with tempfile.TemporaryDirectory(prefix="cbam-jax-cache-") as cache_dir:
            for run in ("cold", "warm"):
                command = [sys.executable, "-m", "benchmarks.compile_time", "--child", "--cache-dir", cache_dir,
                           "--model", args.model, "--size", str(args.size), "--batch", str(args.batch),
                           "--stem", args.stem, "--implementation", args.implementation, "--via", via]
                output = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
                results[via, run] = json.loads(output.strip().splitlines()[-1])
    if results["export", "cold"]["loaded"] or not results["export", "warm"]["loaded"]:
        raise RuntimeError("cached_step: the warm run did not load the step exported by the cold run")
    print(f"{args.model} {args.size}px batch {args.batch} train step, implementation={args.implementation}, "
          f"load average {os.getloadavg()[0]:.1f}: compile {results['jit', 'cold']['compile_s']:.1f} s cold, "
          f"{results['jit', 'warm']['compile_s']:.1f} s warm (persistent cache); with cbam_jax.step_cache: "
          f"{results['export', 'cold']['compile_s']:.1f} s cold (trace, export, compile), "
          f"{results['export', 'warm']['compile_s']:.1f} s warm (load the exported step, persistent cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
