"""Where a jitted training step's time goes on the CPU: its XLA thunks, summed by model part and by kernel.

    python -m benchmarks.profile_step --case cbam_resnet50:224:8 --dtype bfloat16
    python -m benchmarks.profile_step --case cbam_resnet18:32:64:cifar --dtype bfloat16 --json profile.json

Compiles the benchmark's train step (`benchmarks.throughput.make_train_step`: softmax cross-entropy,
backward, SGD with momentum, BatchNorm in training mode, the state donated), warms it up, times
`--steps` steps, then records `--steps` more with `jax.profiler` (a Perfetto trace) and sums, per step,
the wall time of each XLA:CPU thunk on the thread that ran it. The compiled program's HLO says what
each thunk is: a native kernel (its custom-call target: the oneDNN convolutions, the gate and pool
kernels of `cbam_jax.layers.native`), an XLA fusion or library call, and, from its source metadata,
the model part it computes (convolution, BatchNorm, channel gate, spatial gate, max pool) and whether
in the forward or the backward pass. Fusions XLA made up itself (converts, copies) carry no source
and are counted as such. XLA runs independent thunks on two threads at once, so the thunks can add
up to more than the step's wall time. Like train.py, the process first restarts itself with glibc's
huge-page tunable where that helps (`cbam_jax.host_memory`).
"""

import argparse
import collections
import datetime
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

# Thunk names are the HLO instruction names; the instruction's line gives its kind and its source.
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (?:\([^=]*?\)|\S+) ([\w\-]+)\((.*)$", re.M)
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_FUSION_KIND = re.compile(r'"kind":"(\w+)"')
PROGRAM = "python -m benchmarks.profile_step"
_NATIVE_PARTS = {"cbam_onednn_conv_forward": "convolution (oneDNN)", "cbam_onednn_conv_input_grad": "convolution (oneDNN)",
                 "cbam_onednn_conv_kernel_grad": "convolution (oneDNN)", "cbam_max_pool": "max pool",
                 "cbam_max_pool_grad": "max pool"}


def instructions(hlo: str) -> dict[str, dict[str, str]]:
    """HLO instruction name -> its opcode, custom-call target, fusion kind and source op_name ('' where absent)."""
    table = {}
    for name, opcode, rest in _INSTRUCTION.findall(hlo):
        target, op_name, kind = (p.search(rest) for p in (_TARGET, _OP_NAME, _FUSION_KIND))
        table[name] = {"opcode": opcode, "target": target.group(1) if target else "",
                       "op_name": op_name.group(1) if op_name else "", "fusion_kind": kind.group(1) if kind else ""}
    return table


def model_part(info: dict[str, str]) -> str:
    """What an instruction computes: a part of the model, or 'no source' for what XLA added itself."""
    if info["target"] in _NATIVE_PARTS:
        return _NATIVE_PARTS[info["target"]]
    scopes = info["op_name"].split("/")
    if not info["op_name"]:
        return "no source (XLA's converts, copies)"
    if "channel" in scopes:
        return "channel gate"
    if "spatial" in scopes:
        return "spatial gate"
    if any(re.fullmatch(r"(\w+_)?bn\d*|norm\w*", s.split(".")[-1]) for s in scopes):
        return "BatchNorm"
    if scopes[-1] == "conv_general_dilated":
        return "convolution (XLA)"
    return "other (ReLU, residual, loss, optimizer)"


def kernel_kind(info: dict[str, str]) -> str:
    """How an instruction runs: a native kernel by target, or the XLA construct."""
    if info["target"]:
        return f"native {info['target']}"
    if info["fusion_kind"] == "__ynn_fusion":
        return "XLA library fusion (YNNPACK)"
    if info["opcode"] == "fusion":
        return "XLA fusion"
    return f"XLA {info['opcode']}"


def thunk_ms(trace: dict[str, Any], table: dict[str, dict[str, str]], steps: int) -> collections.Counter:
    """Per-step milliseconds of every instruction that ran as a thunk in the trace."""
    totals: collections.Counter = collections.Counter()
    for event in trace["traceEvents"] if isinstance(trace, dict) else trace:
        if event.get("ph") == "X" and event.get("name") in table:
            totals[event["name"]] += event["dur"] / 1e3 / steps
    return totals


def summarise(totals: collections.Counter, table: dict[str, dict[str, str]], top: int) -> dict[str, Any]:
    """Tables of the per-step thunk time by model part (forward / backward) and by kernel kind, and the top thunks."""
    parts: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"forward": 0.0, "backward": 0.0})
    kinds: collections.Counter = collections.Counter()
    for name, ms in totals.items():
        info = table[name]
        if info["op_name"]:  # what XLA made up itself has no source, so no pass either
            parts[model_part(info)]["backward" if "transpose(" in info["op_name"] else "forward"] += ms
        else:
            parts[model_part(info)]["no pass"] = parts[model_part(info)].get("no pass", 0.0) + ms
        kinds[kernel_kind(info)] += ms
    total = sum(totals.values())
    return {"thunk_ms": total,
            "parts": sorted(({"part": p, **v, "ms": sum(v.values())} for p, v in parts.items()),
                            key=lambda r: -r["ms"]),
            "kinds": [{"kind": k, "ms": ms} for k, ms in kinds.most_common()],
            "top": [{"name": n, "ms": ms, "kind": kernel_kind(table[n]), "part": model_part(table[n]),
                     "op_name": table[n]["op_name"]} for n, ms in totals.most_common(top)]}


def profile(case_text: str, dtype: str, steps: int, warmup: int, top: int = 15) -> dict[str, Any]:
    """Compile, time and trace the case's train step; the summary plus the step time."""
    import jax
    import jax.numpy as jnp
    import optax

    from benchmarks.throughput import NUM_CLASSES, Case, classification_batch, make_train_step
    from cbam_jax.registry import create_model

    case = Case.parse(case_text)
    model = create_model(case.model, num_classes=NUM_CLASSES[case.stem], stem=case.stem, dtype=jnp.dtype(dtype))
    images, labels = classification_batch(case)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
    optimizer = optax.sgd(0.1, momentum=0.9)
    state = (variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))
    compiled = jax.jit(make_train_step(model, optimizer), donate_argnums=0).lower(state, images, labels).compile()

    def run(count: int) -> None:
        nonlocal state
        for _ in range(count):
            state, loss = compiled(state, images, labels)
            loss.block_until_ready()

    run(warmup)
    start = time.perf_counter()
    run(steps)
    step_ms = (time.perf_counter() - start) / steps * 1e3
    with tempfile.TemporaryDirectory(prefix="cbam-jax-profile-") as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            run(steps)
        trace_file, = pathlib.Path(directory).rglob("perfetto_trace.json.gz")
        with gzip.open(trace_file) as f:
            trace = json.load(f)
    table = instructions(compiled.as_text())
    return {"step_ms": step_ms, **summarise(thunk_ms(trace, table, steps), table, top)}


def caption(report: dict[str, Any]) -> str:
    """One line: the case, the step's wall time, the thunks' total and the machine."""
    m = report["machine"]
    return (f"{report['case']} {report['dtype']} train step: {report['step_ms']:.0f} ms wall, "
            f"{report['thunk_ms']:.0f} ms of thunks per step ({report['steps']} traced steps). Machine: {m['cpu']} "
            f"(lscpu flags: {' '.join(m['cpu_shown_flags'])}), {m['cores']} cores; JAX {m['jax']}; native "
            f"kernels: {m.get('native_kernels')}.")


def parts_table(report: dict[str, Any]) -> str:
    """Thunk time by model part, forward and backward."""
    total = report["thunk_ms"]
    lines = ["| model part | forward ms | backward ms | ms per step | share |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['part']} | " + ("| " if "no pass" in r else f"{r['forward']:.1f} | {r['backward']:.1f} ")
              + f"| {r['ms']:.1f} | {r['ms'] / total:.0%} |" for r in report["parts"]]
    return "\n".join(lines)


def kinds_table(report: dict[str, Any]) -> str:
    """Thunk time by kernel: each native kernel, XLA's fusions and library calls."""
    total = report["thunk_ms"]
    lines = ["| kernel | ms per step | share |", "|---|---:|---:|"]
    lines += [f"| {r['kind']} | {r['ms']:.1f} | {r['ms'] / total:.0%} |" for r in report["kinds"]]
    return "\n".join(lines)


def top_table(report: dict[str, Any]) -> str:
    """The longest thunks."""
    lines = ["| thunk | kernel | model part | ms per step |", "|---|---|---|---:|"]
    lines += [f"| {r['name']} | {r['kind']} | {r['part']} | {r['ms']:.1f} |" for r in report["top"]]
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the caption, then the tables by model part, by kernel and the top thunks."""
    return "\n\n".join([caption(report), parts_table(report), kinds_table(report), top_table(report)])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from benchmarks.throughput import Case

    from cbam_jax.cli import ArgumentParser  # errors as one line (a UsageError), not usage text

    parser = ArgumentParser(prog=PROGRAM, description=__doc__.split("\n")[0])
    parser.add_argument("--case", default="cbam_resnet50:224:8", help="MODEL:SIZE:BATCH[:STEM] (default "
                        "cbam_resnet50:224:8), as benchmarks.throughput's --cases; no detector cases")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--steps", type=int, default=3, help="timed steps, then as many traced ones (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling (default 2)")
    parser.add_argument("--top", type=int, default=15, help="how many of the longest thunks to list (default 15)")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    try:
        case = Case.parse(args.case)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if case.detector:
        parser.error("--case: the profile covers classifier train steps; drop ':fcos'.")
    if args.steps < 1 or args.warmup < 0 or args.top < 0:
        parser.error("--steps must be >= 1, --warmup and --top >= 0.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from cbam_jax.atomic import check_destination
    from cbam_jax.errors import UserError, report

    try:
        args = parse_args(argv)
        if args.json:  # before minutes of compiling and tracing
            check_destination(args.json, replace=True, option="--json")
    except UserError as error:
        return report(PROGRAM, error, exit_code=2)
    from benchmarks.throughput import machine, write_atomic

    report_data = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "command": " ".join(sys.argv), "case": args.case, "dtype": args.dtype, "steps": args.steps,
                   "machine": machine(), **profile(args.case, args.dtype, args.steps, args.warmup, args.top)}
    print(markdown(report_data))
    if args.json:
        try:  # a full or read-only disk: one line, and no half-written file (atomic_output)
            write_atomic(args.json, lambda temp: pathlib.Path(temp).write_text(json.dumps(report_data, indent=1)))
        except UserError as error:
            return report(PROGRAM, error)
    return 0


if __name__ == "__main__":
    from cbam_jax.host_memory import use_huge_pages

    use_huge_pages()  # as train.py: the step's scratch memory in huge pages (cbam_jax/host_memory.py)
    sys.exit(main())
