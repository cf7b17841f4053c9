"""Grouped and depthwise convolutions per layer on the CPU: XLA's own kernels against oneDNN's.

    python -m benchmarks.grouped_convs                      # MobileNet w1 b32 and ResNeXt-50 32x4d b8, 224px
    python -m benchmarks.grouped_convs --dtypes float32 --repeats 3 --markdown grouped.md

For each 3x3 grouped convolution of CBAM-ResNeXt-50 32x4d (32 groups) and each depthwise one of
CBAM-MobileNet w1 (groups = channels, strides 1 and 2), at 224px, it times the forward pass, the
input gradient and the kernel gradient, each as its own jitted program, with XLA's
`lax.conv_general_dilated` and with `cbam_jax.layers.cpu_ops.conv_general_dilated` (oneDNN where
`cbam_jax.layers.native` is available: the path the models take on the CPU). The two alternate
call by call in one process; the median of `--repeats` calls is reported in ms, with the speed-up
per pass. This is the measurement behind `cpu_ops` sending every grouped convolution to oneDNN.
"""

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.throughput import machine, write_atomic
from cbam_jax.layers import cpu_ops, native

NHWC = ("NHWC", "HWIO", "NHWC")
PASSES = ("forward", "input_grad", "kernel_grad")
# (input size H = W, input channels, output channels, groups, stride) of the 3x3 grouped convs at 224px
LAYERS = {
    "mobilenet_w1": [(112, 32, 32, 32, 1), (112, 64, 64, 64, 2), (56, 128, 128, 128, 1), (56, 128, 128, 128, 2),
                     (28, 256, 256, 256, 1), (28, 256, 256, 256, 2), (14, 512, 512, 512, 1), (14, 512, 512, 512, 2),
                     (7, 1024, 1024, 1024, 1)],
    "resnext50_32x4d": [(56, 128, 128, 32, 1), (56, 256, 256, 32, 2), (28, 256, 256, 32, 1), (28, 512, 512, 32, 2),
                        (14, 512, 512, 32, 1), (14, 1024, 1024, 32, 2), (7, 1024, 1024, 32, 1)],
}
BATCHES = {"mobilenet_w1": 32, "resnext50_32x4d": 8}


def pass_programs(conv: Callable, shape: tuple[int, int, int, int, int], batch: int,
                  dtype: str) -> dict[str, Callable[[], Any]]:
    """Per pass, a blocking call of the jitted forward / input gradient / kernel gradient of one layer."""
    size, cin, cout, groups, stride = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, cin)), dtype)
    kernel = jnp.asarray(rng.standard_normal((3, 3, cin // groups, cout)), dtype)

    def forward(x, kernel):
        return conv(x, kernel, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=NHWC, feature_group_count=groups)

    grad_y = jnp.asarray(rng.standard_normal(jax.eval_shape(forward, x, kernel).shape), dtype)
    programs = {"forward": jax.jit(forward),
                "input_grad": jax.jit(lambda x, k: jax.vjp(lambda x: forward(x, k), x)[1](grad_y)[0]),
                "kernel_grad": jax.jit(lambda x, k: jax.vjp(lambda k: forward(x, k), k)[1](grad_y)[0])}
    return {name: (lambda p=program: jax.block_until_ready(p(x, kernel))) for name, program in programs.items()}


def time_layer(shape: tuple[int, int, int, int, int], batch: int, dtype: str, repeats: int) -> dict[str, Any]:
    """Median ms of each pass with XLA's kernels ('xla') and on the CPU path ('onednn'), alternated."""
    row: dict[str, Any] = {"size": shape[0], "in_channels": shape[1], "out_channels": shape[2], "groups": shape[3],
                           "stride": shape[4], "batch": batch, "dtype": dtype}
    sides = {"xla": pass_programs(lax.conv_general_dilated, shape, batch, dtype),
             "onednn": pass_programs(cpu_ops.conv_general_dilated, shape, batch, dtype)}
    for name in PASSES:
        times: dict[str, list[float]] = {"xla": [], "onednn": []}
        for side in sides:  # compile and warm up
            sides[side][name]()
        for index in range(repeats):
            for side in (("xla", "onednn") if index % 2 == 0 else ("onednn", "xla")):
                start = time.perf_counter()
                sides[side][name]()
                times[side].append(time.perf_counter() - start)
        for side, values in times.items():
            row[f"{name}_{side}_ms"] = 1000 * statistics.median(values)
    return row


def table(report: dict[str, Any]) -> str:
    """The report as one Markdown table: per layer and dtype, ms XLA -> oneDNN for each pass."""
    m = report["machine"]
    lines = [f"Machine: {m['cpu']} (lscpu flags: {' '.join(m.get('cpu_shown_flags', [])) or 'none of interest'}), "
             f"{m['cores']} cores; JAX {m['jax']}; load average {report['load_before']} before, "
             f"{report['load_after']} after; median of {report['repeats']} calls, XLA and oneDNN alternated.", "",
             "| net | batch | layer (H, Cin->Cout, groups, stride) | dtype | forward ms XLA -> oneDNN | "
             "input grad ms | kernel grad ms | oneDNN speed-up (fwd, dx, dw) |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        cells = [f"{r[f'{p}_xla_ms']:.1f} -> {r[f'{p}_onednn_ms']:.1f}" for p in PASSES]
        speedups = ", ".join(f"{r[f'{p}_xla_ms'] / r[f'{p}_onednn_ms']:.0f}x" for p in PASSES)
        lines.append(f"| {r['net']} | {r['batch']} | {r['size']}, {r['in_channels']}->{r['out_channels']}, "
                     f"g{r['groups']}, s{r['stride']} | {r['dtype']} | " + " | ".join(cells) + f" | {speedups} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grouped_convs", description=__doc__.split("\n")[0])
    parser.add_argument("--nets", nargs="+", choices=sorted(LAYERS), default=list(LAYERS))
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, help="batch of every layer (default: 32 for MobileNet, 8 for ResNeXt)")
    parser.add_argument("--layers", type=int, help="only the first N layers of each net (a quick check)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per pass and side")
    parser.add_argument("--json", default="benchmarks/grouped_convs.json", help="where to write the JSON report")
    parser.add_argument("--markdown", help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or (args.batch is not None and args.batch < 1) or (args.layers is not None and args.layers < 1):
        parser.error("--repeats, --batch and --layers must be >= 1.")
    if jax.default_backend() != "cpu" or not native.available():
        parser.error("this compares XLA:CPU with oneDNN: it needs the CPU backend and the native kernels "
                     "(pip install 'cbam-jax[cpu]'; see the warning above for why they are unavailable).")
    dtypes = [d for d in args.dtypes if d == "float32" or native.bfloat16_convolutions()]
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows = []
    for net in args.nets:
        for dtype in dtypes:
            for shape in LAYERS[net][:args.layers]:
                rows.append({"net": net, **time_layer(shape, args.batch or BATCHES[net], dtype, args.repeats)})
                print(f"{net} {dtype} {shape}: " + ", ".join(
                    f"{p} {rows[-1][f'{p}_xla_ms']:.1f} -> {rows[-1][f'{p}_onednn_ms']:.1f} ms" for p in PASSES),
                    file=sys.stderr, flush=True)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "machine": machine(), "repeats": args.repeats,
              "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
              "rows": rows}
    text = table(report)
    print(text)
    write_atomic(args.json, lambda temp: pathlib.Path(temp).write_text(json.dumps(report, indent=1)))
    if args.markdown:
        write_atomic(args.markdown, lambda temp: pathlib.Path(temp).write_text(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
