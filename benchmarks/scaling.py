"""How the cost of a training step grows with batch size and depth, cbam-jax against PyTorch (CPU).

    python -m benchmarks.scaling                    # both sweeps below, jax and torch-cl, float32
    python -m benchmarks.scaling --sweep batch --batches 8 16 --depths 50 --impls jax   # a smaller run
    python -m benchmarks.scaling --sweep batch --batches 8 32 64 --depths 50 --impls jax jax-remat torch-cl \
        --repeats 1 --json benchmarks/results/memory.json      # the memory table (jax, remat, PyTorch)

Two sweeps of CBAM-ResNet training steps (224px, ImageNet stem): batch 8, 16, 32, 64 at depth 50,
and depth 18, 34, 50, 101, 152 at batch 8. Every point runs in its own processes through
`benchmarks.throughput` (implementations alternated over `--rounds`, `--repeats` timed calls per
process), so the numbers mean what they mean there: step time is the median over rounds of each
process's median, step MiB the resident memory above the resting level during the first step,
process MiB the whole process's peak resident memory (libraries, model, optimiser state, compilation
and the steps: what must fit in the machine's memory),
compile s the JAX lower + compile of the step in a fresh process (no persistent cache hit: every
point is a new program). The batch sweep also fits each implementation's process peak with a
line over the batch sizes (fixed MiB + MiB per image) and gives the largest batch that fits in
each of `--fit-gib` GiB. The report (JSON + Markdown) names the CPU and its flags.

Expected duration on an idle 2-core machine (jax, torch-cl, 1 round): about 25 min for both
sweeps, most of it in batch 64 and ResNet-152.
"""

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.throughput import (
    IMPLS,
    TORCH_IMPLS,
    Case,
    Variant,
    _write_text,
    ratios,
    run_child,
    run_processes,
    write_atomic,
)

BATCHES = (8, 16, 32, 64)
DEPTHS = (18, 34, 50, 101, 152)
FIT_GIB = (8, 16, 32)


def sweep_variants(sweep: str, batches: Sequence[int], depths: Sequence[int], size: int, impls: Sequence[str],
                   dtype: str) -> list[Variant]:
    """The train-step variants of one sweep: over `batches` at the first of `depths`, or over `depths` at the
    first of `batches`."""
    if sweep == "batch":
        cases = [Case(f"cbam_resnet{depths[0]}", size, b) for b in batches]
    else:
        cases = [Case(f"cbam_resnet{d}", size, batches[0]) for d in depths]
    return [Variant(case, "cbam", "train", dtype, impl) for case in cases for impl in impls]


def table(rows: Sequence[dict[str, Any]], sweep: str, impls: Sequence[str]) -> str:
    """Markdown: one line per batch or depth, step ms / images/s / step and process peak MiB per
    implementation, jax's compile s, the speed ratios and the memory ratios (process peaks)."""
    by_point: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_point.setdefault((r["model"], r["batch"]), {})[r["impl"]] = r
    ratio_by_point = {(e["case"]): e for e in ratios(rows)}
    others = [i for i in impls if i != "jax"]
    # Sweeps written before the process peak was recorded keep their one memory column ('peak MiB').
    process = any("process_peak_mib" in r for r in rows)
    head = ["depth" if sweep == "depth" else "batch"]
    for impl in impls:
        head += ([f"{impl} step ms (min-max)", f"{impl} img/s", f"{impl} step MiB", f"{impl} process MiB"] if process
                 else [f"{impl} step ms (min-max)", f"{impl} img/s", f"{impl} peak MiB"])
    jax_impls = [i for i in impls if i.startswith("jax")]
    torch_impls = [i for i in impls if not i.startswith("jax")]
    if "jax" in impls:
        head += ["jax compile s"] + [f"jax over {o}" for o in others]
    if process:
        head += [f"{j} / {t} memory" for j in jax_impls for t in torch_impls]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for (model, batch), per_impl in by_point.items():
        point = model.rsplit("resnet", 1)[1] if sweep == "depth" else str(batch)
        cells = [point]
        for impl in impls:
            r = per_impl.get(impl)
            if r is None:
                cells += [""] * (4 if process else 3)
                continue
            rounds = r["round_medians_s"] or r["step_s_all"]
            cells += [f"{1000 * r['step_s_median']:.0f} ({1000 * min(rounds):.0f}-{1000 * max(rounds):.0f})",
                      f"{r['images_per_s']:.1f}", f"{r['peak_mib']:.0f}"]
            if process:
                cells.append(f"{r.get('process_peak_mib', math.nan):.0f}")
        if "jax" in impls:
            cells.append(f"{per_impl['jax']['compile_s']:.1f}" if "jax" in per_impl else "")
            entry = ratio_by_point.get(per_impl.get("jax", {}).get("case"), {})
            cells += [f"{entry[f'jax_over_{o}']:.2f}" if f"jax_over_{o}" in entry else "" for o in others]
        for j in jax_impls if process else ():
            for t in torch_impls:
                mine, theirs = per_impl.get(j, {}).get("process_peak_mib"), per_impl.get(t, {}).get("process_peak_mib")
                cells.append(f"{mine / theirs:.2f}" if mine and theirs else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def batch_fits(rows: Sequence[dict[str, Any]], fit_gib: Sequence[float]) -> list[dict[str, Any]]:
    """Per implementation of a batch sweep: its process peak as a line over the measured batches
    (least squares: fixed MiB + MiB per image) and the largest batch whose predicted peak fits in
    each of `fit_gib` GiB (0 if none; the extrapolation beyond the largest measured batch assumes
    memory keeps growing linearly, which it does for activations)."""
    by_impl: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        peak = r.get("process_peak_mib", math.nan)
        if not math.isnan(peak):
            by_impl.setdefault(r["impl"], []).append((r["batch"], peak))
    fits = []
    for impl, points in by_impl.items():
        if len({b for b, _ in points}) < 2:
            continue
        batches, peaks = zip(*points, strict=True)
        mean_b, mean_p = statistics.fmean(batches), statistics.fmean(peaks)
        per_image = (sum((b - mean_b) * (p - mean_p) for b, p in points)
                     / sum((b - mean_b) ** 2 for b in batches))
        fixed = mean_p - per_image * mean_b
        fits.append({"impl": impl, "fixed_mib": fixed, "mib_per_image": per_image, "measured": sorted(points),
                     "largest_batch": {str(g): max(0, math.floor((g * 1024 - fixed) / per_image)) if per_image > 0
                                       else None for g in fit_gib}})
    return fits


def fits_table(fits: Sequence[dict[str, Any]], fit_gib: Sequence[float]) -> str:
    """Markdown: the fitted line and the largest batch per memory size, one line per implementation."""
    head = ["impl", "fixed MiB", "MiB per image"] + [f"largest batch in {g:g} GiB" for g in fit_gib]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for f in fits:
        lines.append(f"| {f['impl']} | {f['fixed_mib']:.0f} | {f['mib_per_image']:.1f} | "
                     + " | ".join(str(f["largest_batch"][str(g)]) for g in fit_gib) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", nargs="+", choices=("batch", "depth"), default=["batch", "depth"])
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES),
                        help="batch sizes of the batch sweep; the first is the depth sweep's batch")
    parser.add_argument("--depths", nargs="+", type=int, choices=DEPTHS, default=list(DEPTHS),
                        help="depths of the depth sweep; the batch sweep runs at 50 (the first depth if 50 is not "
                        "among them)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=["jax", "torch-cl"])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--jax-python", help="the Python interpreter of the JAX processes (default: this one)")
    parser.add_argument("--torch-python", help="the Python interpreter of the PyTorch processes (default: this one)")
    parser.add_argument("--fit-gib", nargs="+", type=float, default=list(FIT_GIB),
                        help="memory sizes (GiB) for the largest-batch figure of the batch sweep")
    parser.add_argument("--json", default="benchmarks/scaling.json")
    parser.add_argument("--markdown", help="also write the Markdown tables to this file")
    args = parser.parse_args(argv)
    if min(args.batches) < 1 or args.rounds < 1 or args.repeats < 1 or args.warmup < 1 or args.size < 32:
        parser.error("--batches, --rounds, --repeats and --warmup must be >= 1 and --size >= 32.")
    uses_torch = any(i in TORCH_IMPLS for i in args.impls)
    if uses_torch and not args.torch_python:
        try:
            import torch  # noqa: F401
        except ImportError:
            parser.error("PyTorch is not installed here: pass --torch-python or --impls jax.")
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)

    batch_depth = 50 if 50 in args.depths else args.depths[0]
    load_before = os.getloadavg()
    report: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "command": " ".join(sys.argv), "rounds": args.rounds, "repeats": args.repeats,
                              "sweeps": {}}
    with tempfile.TemporaryDirectory(prefix="cbam-jax-scaling-cache-") as cache_dir:
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir}
        probe = run_child({"probe": "matmul", "dtypes": [args.dtype], "torch": False, "python": args.jax_python}, env)
        report["machine"] = probe.pop("machine")
        for sweep in args.sweep:
            depths = [batch_depth] if sweep == "batch" else args.depths
            variants = sweep_variants(sweep, args.batches, depths, args.size, args.impls, args.dtype)
            run_processes(variants, args.rounds, args.repeats, args.warmup, log, env,
                          pythons={"jax": args.jax_python, "torch": args.torch_python})
            report["sweeps"][sweep] = [v.summary({args.dtype: probe[args.dtype]}) for v in variants]
            if sweep == "batch":
                report["batch_fits"] = batch_fits(report["sweeps"]["batch"], args.fit_gib)
    report["load_before"] = [round(x, 2) for x in load_before]
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = time.perf_counter() - start
    m = report["machine"]
    text = [f"Machine: {m['cpu']} (lscpu flags: {' '.join(m.get('cpu_shown_flags', []))}), {m['cores']} cores; "
            f"JAX {m['jax']}; {args.dtype}, {args.size}px CBAM-ResNet train steps; each point in its own processes, "
            f"{args.rounds} round(s) x {args.repeats} timed calls; load average {report['load_before']} before, "
            f"{report['load_after']} after; {report['wall_s'] / 60:.0f} min.", ""]
    for sweep, rows in report["sweeps"].items():
        text += [f"By {sweep}" + (f" (CBAM-ResNet-{batch_depth})" if sweep == "batch"
                                  else f" (batch {args.batches[0]})") + ":", "", table(rows, sweep, args.impls)]
    if report.get("batch_fits"):
        text += ["Largest batch that fits, from the process peaks above (a line over the measured batches):", "",
                 fits_table(report["batch_fits"], args.fit_gib)]
    markdown = "\n".join(text)
    print(markdown)
    write_atomic(args.json, lambda temp: _write_text(temp, json.dumps(report, indent=1)))
    if args.markdown:
        write_atomic(args.markdown, lambda temp: _write_text(temp, markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
