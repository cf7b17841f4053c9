"""The CBAM paper's ablation (Sec. 4.1, Tables 1-3) rerun: every row of `configs/ablation.py`
trained for several seeds and tabulated beside the paper's ImageNet ResNet-50 numbers.

    python -m benchmarks.ablation --quick                     # digits, 10 rows x 3 seeds, < 15 min on 2 cores
    python -m benchmarks.ablation --quick --json benchmarks/results/ablation.json   # the record docs/ablation.md quotes
    python -m benchmarks.ablation --seeds 5                   # digits, the full default recipe (30 epochs)
    python -m benchmarks.ablation --base cifar10 --seeds 3 --study-dir runs/ablation_cifar10
    python -m benchmarks.ablation --rows cbam parallel --config.num_epochs=5   # any train.py override

Each (row, seed) trains in its own workdir, STUDY_DIR/ROW/seedS, with train.py's trainer, in this
process. A finished run leaves `result.json` there and is skipped when the command runs again; an
interrupted one (Ctrl-C, SIGTERM, a crash) resumes from its last checkpoint, exactly, as train.py
does. The study writes STUDY_DIR/results.md (the tables), results.json (the report: every run, the
per-row statistics, the machine with lscpu's model name and flags, the command, the date; also to
--json PATH) and, where matplotlib is installed (`pip install 'cbam-jax[bench]'`), results.png; the
tables are also printed.

Columns: final and best test accuracy (mean +- sample standard deviation over the seeds), the
model's parameters, training time per step (mean over seeds, compilation excluded; runs are
sequential, so on a shared machine the load of the moment is in it), and the paper's ImageNet
top-1 / top-5 error of the same design (ResNet-50, one run each).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from cbam_jax.cli import ArgumentParser
from cbam_jax.errors import UsageError, UserError, report

PROGRAM = "python -m benchmarks.ablation"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "ablation.py")

# The paper's tables: title -> rows of configs/ablation.py.
TABLES: dict[str, tuple[str, ...]] = {
    "Table 1: channel descriptor": ("resnet", "channel_avg", "channel_max", "channel_avgmax"),
    "Table 2: spatial descriptor and kernel": ("conv1x1_k3", "conv1x1_k7", "pool_k3", "cbam"),
    "Table 3: arrangement": ("cbam", "spatial_first", "parallel"),
}
# row -> (what it is, the paper's ImageNet ResNet-50 top-1 / top-5 error in %): Woo et al., "CBAM:
# Convolutional Block Attention Module", ECCV 2018, Tables 1-3 (single-crop, one run each).
PAPER: dict[str, tuple[str, float, float]] = {
    "resnet": ("ResNet, no attention", 24.56, 7.50),
    "channel_avg": ("channel gate, average pool (= SE)", 23.14, 6.70),
    "channel_max": ("channel gate, max pool", 23.20, 6.83),
    "channel_avgmax": ("channel gate, average & max pool", 22.80, 6.52),
    "conv1x1_k3": ("+ spatial gate, 1x1 conv descriptor, k=3", 22.96, 6.64),
    "conv1x1_k7": ("+ spatial gate, 1x1 conv descriptor, k=7", 22.90, 6.47),
    "pool_k3": ("+ spatial gate, avg & max pool descriptor, k=3", 22.68, 6.41),
    "cbam": ("CBAM: channel, then spatial (pool, k=7)", 22.66, 6.31),
    "spatial_first": ("spatial, then channel", 22.78, 6.42),
    "parallel": ("channel and spatial in parallel", 22.95, 6.59),
}
# --quick: fewer epochs and seeds of the digits recipe, sized to finish in < 15 min on 2 idle cores.
QUICK = {"seeds": 3, "overrides": ["--config.num_epochs=10", "--config.checkpoint_every_steps=110"]}
FULL_SEEDS = 5


def load_recipe():
    """configs/ablation.py as a module (ROWS, get_config)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cbam_jax_ablation_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    rows = list(load_recipe().ROWS)
    parser = ArgumentParser(prog="python -m benchmarks.ablation", description=__doc__.split("\n\n")[0],
                     epilog="Any other --config.FIELD=VALUE is a train.py override applied to every run.")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['seeds']} seeds, overrides {' '.join(QUICK['overrides'])} (< 15 min on 2 cores)")
    parser.add_argument("--rows", nargs="+", metavar="ROW", default=rows, help=f"rows to run (default all: {' '.join(rows)})")
    parser.add_argument("--seeds", type=int, help=f"seeds 0..N-1 per row (default {FULL_SEEDS}; --quick {QUICK['seeds']})")
    parser.add_argument("--base", default="default", help="base recipe in configs/ (default: default, the digits)")
    parser.add_argument("--study-dir", help="one workdir per run below it (default runs/ablation[_quick], or "
                        "runs/ablation_BASE[_quick] for another base)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw results.png")
    parser.add_argument("--json", help="also write the report (STUDY_DIR/results.json) to this file")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    unknown = [r for r in args.rows if r not in rows]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; rows: {' '.join(rows)}")
    if any(a.startswith("--config.seed=") or a == "--config.seed" for a in extra):
        parser.error("the study sets config.seed for each run; use --seeds N (seeds 0..N-1)")
    args.overrides = (QUICK["overrides"] if args.quick else []) + extra
    args.seeds = args.seeds if args.seeds is not None else QUICK["seeds"] if args.quick else FULL_SEEDS
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1; got {args.seeds}")
    if not os.path.isfile(os.path.join(ROOT, "configs", f"{args.base}.py")):
        recipes = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py") and f != "ablation.py")
        parser.error(f"--base {args.base!r} is not a recipe in configs/; recipes: {' '.join(recipes)}")
    if args.study_dir is None:
        args.study_dir = os.path.join("runs", "ablation" + ("" if args.base == "default" else f"_{args.base}")
                                      + ("_quick" if args.quick else ""))
    args.plot = not args.no_plot
    if args.json is not None and (not args.json or os.path.isdir(args.json)):
        parser.error(f"--json {args.json!r} is not a file name; give e.g. --json benchmarks/results/ablation.json")
    return args


def run_config(row: str, base: str, overrides: Sequence[str], seed: int):
    """The validated config of one run: configs/ablation.py:ROW,base=BASE with train.py's overrides."""
    from absl import flags

    from cbam_jax.training.config import config_from_flags, validate

    try:  # exactly what train.py does with `--config configs/ablation.py:ROW,base=BASE --config.X=Y ...`
        config = config_from_flags(["ablation", *overrides], flags.FlagValues(), f"{RECIPE}:{row},base={base}")
        with config.unlocked():
            config.seed = seed
            config.progress_bar = False  # one line per run instead
        return validate(config)
    except UserError as error:
        raise UsageError(f"row {row}: {error}") from None


def count_parameters(config) -> int:
    """Parameters of the config's model (shapes only, no initialisation)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cbam_jax.training.trainer import build_model

    shape = (1, config.dataset.image_size, config.dataset.image_size, config.dataset.channels)
    variables = jax.eval_shape(build_model(config).init, jax.random.key(0), jnp.zeros(shape))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two studies comparable (rows and seeds may grow)."""
    return {"base": args.base, "overrides": list(args.overrides)}


def check_study_dir(args: argparse.Namespace) -> None:
    """Refuse a study folder that holds runs of other settings, or that cannot be created."""
    from cbam_jax.atomic import check_destination

    if os.path.exists(args.study_dir) and not os.path.isdir(args.study_dir):
        raise UsageError(f"--study-dir {args.study_dir} is a file, not a folder; use another --study-dir")
    try:
        check_destination(args.study_dir, replace=True, option="--study-dir")
    except UserError as error:
        raise UsageError(str(error)) from None
    path = os.path.join(args.study_dir, "study.json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != settings(args):
            raise UsageError(f"{args.study_dir} holds a study with other settings ({saved}); use another --study-dir "
                             f"or the same --base and overrides")
    elif os.path.exists(args.study_dir) and os.listdir(args.study_dir):
        raise UsageError(f"{args.study_dir} exists and is not an ablation study folder; use another --study-dir")


def train_run(config, workdir: str, parameters: int) -> dict[str, Any]:
    """Train (or resume) one run; its result, also written to WORKDIR/result.json."""
    from cbam_jax.training.trainer import train_and_evaluate

    start = time.perf_counter()
    summary = train_and_evaluate(config, workdir)
    if summary["status"] != "finished":
        raise InterruptedError(f"{workdir}: stopped at step {summary['step']}/{summary['total_steps']} "
                               f"({summary['status']}); run the same command again to resume")
    result = {"final_accuracy": summary["final_accuracy"], "best_accuracy": summary["best_accuracy"],
              "best_step": summary["best_step"], "steps": summary["total_steps"],
              # None when this session trained no step (the run had finished before result.json was written)
              "step_ms": 1000.0 * config.batch_size / summary["images_per_second"] if summary["images_per_second"] else None,
              "train_seconds": summary["train_seconds"], "first_step_seconds": summary["first_step_seconds"],
              # this session's time, compilation and evaluation included (a resumed run: the part after resuming)
              "wall_seconds": round(time.perf_counter() - start, 1),
              "parameters": parameters, "model": config.model.name,
              "attention_options": config.model.attention_options.to_dict(), "seed": config.seed}
    write_text(os.path.join(workdir, "result.json"), json.dumps(result, indent=1))
    return result


def aggregate(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per row: mean and sample standard deviation (0 for one seed) of the accuracies in %, step time."""
    def mean_std(values):
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    stats = {}
    for row, runs in results.items():
        if runs:
            step_ms = [r["step_ms"] for r in runs if r["step_ms"] is not None]
            stats[row] = {"final": mean_std([100 * r["final_accuracy"] for r in runs]),
                          "best": mean_std([100 * r["best_accuracy"] for r in runs]),
                          "step_ms": statistics.fmean(step_ms) if step_ms else None,
                          "parameters": runs[0]["parameters"], "seeds": len(runs)}
    return stats


def markdown(stats: dict[str, dict[str, Any]], title: str) -> str:
    """The three tables (rows without results are left out)."""
    lines = [f"### {title}", ""]
    for table, rows in TABLES.items():
        rows = [r for r in rows if r in stats]
        if not rows:
            continue
        lines += [f"**{table}**", "",
                  "| row | design | params | final acc. % | best acc. % | ms/step | seeds | paper top-1 / top-5 err. % |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            s, (what, top1, top5) = stats[row], PAPER[row]
            step_ms = "-" if s["step_ms"] is None else f"{s['step_ms']:.1f}"
            lines.append(f"| `{row}` | {what} | {s['parameters']:,} | {s['final'][0]:.2f} ± {s['final'][1]:.2f} | "
                         f"{s['best'][0]:.2f} ± {s['best'][1]:.2f} | {step_ms} | {s['seeds']} | {top1:.2f} / {top5:.2f} |")
        lines.append("")
    return "\n".join(lines)


def findings(stats: dict[str, dict[str, Any]]) -> str:
    """One sentence of the figures the tables' reading rests on: the plain ResNet's final accuracy, the
    range of the attention rows' (and their gains over it), the range of the rows' seed spreads."""
    final = {row: s["final"] for row, s in stats.items()}
    attention = sorted((row for row in final if row != "resnet"), key=lambda row: final[row][0])
    if not attention:
        return ""
    low, high = attention[0], attention[-1]
    stds = [final[row][1] for row in final]
    text = "Final accuracy, mean ± standard deviation over the seeds: "
    if "resnet" in final:
        text += f"`resnet` {final['resnet'][0]:.2f} ± {final['resnet'][1]:.2f}%; "
    text += (f"the attention rows from {final[low][0]:.2f}% (`{low}`) to {final[high][0]:.2f}% (`{high}`)")
    if "resnet" in final:
        text += (f", {final[low][0] - final['resnet'][0]:+.2f} to {final[high][0] - final['resnet'][0]:+.2f} points "
                 "against `resnet`")
    return text + f"; the rows' standard deviations {min(stds):.2f} to {max(stds):.2f} points."


def timing(report: dict[str, Any]) -> str:
    """One sentence of how long the report's runs took (those that recorded it) and the machine's load."""
    walls = [run["wall_seconds"] for runs in report["runs"].values() for run in runs if "wall_seconds" in run]
    if not walls:
        return ""
    load = (f"; the 1-minute load average was {report['load_before'][0]:.1f} before the study and "
            f"{report['load_after'][0]:.1f} after it" if report.get("trained_now") else "")  # that of a training one
    return (f"{len(walls)} runs, one after another, took {sum(walls) / 60:.1f} min (compilation and evaluation "
            f"included){load}.")


def plot(stats: dict[str, dict[str, Any]], path: str, title: str) -> None:
    """Final and best accuracy (mean +- std) per row, one panel per table, the paper's error beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cbam_jax.atomic import atomic_output

    tables = [(t, [r for r in rows if r in stats]) for t, rows in TABLES.items()]
    tables = [(t, rows) for t, rows in tables if rows]
    low = min(s[k][0] - s[k][1] for s in stats.values() for k in ("final", "best"))
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 4.4), squeeze=False)
    for ax, (table, rows) in zip(axes[0], tables):
        x = range(len(rows))
        for offset, key, alpha in ((-0.2, "final", 1.0), (0.2, "best", 0.45)):
            ax.bar([i + offset for i in x], [stats[r][key][0] for r in rows], width=0.4, alpha=alpha, color="C0",
                   yerr=[stats[r][key][1] for r in rows], capsize=3, label=f"{key} accuracy (this study)")
        ax.set_ylim(max(0.0, low - 2.0), 100.0)  # one scale for all panels
        ax.set_ylabel("test accuracy %")
        ax.set_xticks(list(x), rows, rotation=35, ha="right", fontsize=8)
        ax.set_title(table, fontsize=9)
        paper = ax.twinx()
        paper.plot(list(x), [PAPER[r][1] for r in rows], "kD")
        paper.set_ylabel("paper top-1 error %", fontsize=8)
        paper.set_ylim(25.0, 22.4)  # inverted (lower error is better: up means better on both axes), one scale for all
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles + [plt.Line2D([], [], color="k", marker="D", linestyle="")],
               labels + ["paper: ImageNet ResNet-50 top-1 error (right axis, inverted)"], loc="lower center", ncol=3,
               fontsize=8)
    fig.suptitle(title.replace("; ", "\n"), fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.93))
    with atomic_output(path, replace=True) as temporary:
        fig.savefig(temporary, format="png", dpi=110)
    plt.close(fig)


def write_text(path: str, text: str) -> None:
    """`path` replaced whole (never half-written), with the user's umask."""
    from cbam_jax.atomic import atomic_output

    with atomic_output(path, replace=True) as temporary:
        temporary.write_text(text)


def machine() -> dict[str, Any]:
    """What a study ran on: lscpu's model name and flags (benchmarks.throughput reads them), cores,
    Python, jax and its backend. (benchmarks.throughput.machine() adds PyTorch's, which this does not run.)"""
    import jax

    from benchmarks.throughput import cpu_description

    cpu = cpu_description()
    return {"cpu": cpu["model"], "cpu_flags": cpu["flags"], "cpu_shown_flags": cpu["shown_flags"],
            "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(), "jax": jax.__version__,
            "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}


def machine_line(facts: dict[str, Any]) -> str:
    """One line of `machine()`'s facts, for the tables' title."""
    flags = " ".join(facts.get("cpu_shown_flags", [])) or "none of interest"
    return (f"{facts['cpu']} (lscpu flags: {flags}), {facts['cores']} cores, Python {facts['python']}, "
            f"jax {facts['jax']} ({facts['backend']})")


def main(argv: Sequence[str] | None = None) -> int:
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)

    try:
        args = parse_args(argv)
        # Every run's config first: a bad row, recipe or override fails before anything is written.
        configs = {(row, seed): run_config(row, args.base, args.overrides, seed)
                   for row in args.rows for seed in range(args.seeds)}
        parameters = {}
        for row in args.rows:  # builds each model's shapes: bad option values fail here
            try:
                parameters[row] = count_parameters(configs[row, 0])
            except ValueError as error:  # an option value the layer refuses when built
                raise UsageError(f"row {row}: {error}") from None
        check_study_dir(args)
        if args.json:
            from cbam_jax.atomic import check_destination

            check_destination(args.json, replace=True, option="--json")
        first = next(iter(configs.values()))
        from cbam_jax.data import make_source

        for split in (first.dataset.train_split, first.dataset.eval_split):
            make_source(first.dataset, split)  # the dataset is there (tfds prepared, folder readable)
    except UserError as error:  # the dataset's errors too
        return report(PROGRAM, error, exit_code=2)

    write_text(os.path.join(args.study_dir, "study.json"), json.dumps(settings(args)))
    load_before, trained = os.getloadavg(), 0
    results: dict[str, list[dict[str, Any]]] = {row: [] for row in args.rows}
    try:
        for (row, seed), config in configs.items():
            workdir = os.path.join(args.study_dir, row, f"seed{seed}")
            done = os.path.join(workdir, "result.json")
            if os.path.isfile(done):
                with open(done) as f:
                    results[row].append(json.load(f))
                continue
            run_start = time.perf_counter()
            result = train_run(config, workdir, parameters[row])
            results[row].append(result)
            trained += 1
            step_ms = "" if result["step_ms"] is None else f", {result['step_ms']:.1f} ms/step"
            log(f"{row} seed {seed}: final {100 * result['final_accuracy']:.2f}%, best "
                f"{100 * result['best_accuracy']:.2f}%{step_ms} ({time.perf_counter() - run_start:.0f} s)")
    except KeyboardInterrupt:
        print("python -m benchmarks.ablation: interrupted; run the same command again to resume (finished runs "
              "are kept, the interrupted one continues from its last checkpoint).", file=sys.stderr)
        return 130
    except InterruptedError as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return 1
    except UserError as error:
        return report(PROGRAM, error)

    stats = aggregate(results)
    facts = machine()
    title = (f"CBAM ablation on {first.dataset.name or first.dataset.source} ({first.model.name.split('_')[-1]}, width "
             f"{first.model.width}, {first.num_epochs if first.num_train_steps <= 0 else first.num_train_steps:g} "
             f"{'epochs' if first.num_train_steps <= 0 else 'steps'}), {args.seeds} seed(s); {machine_line(facts)}")
    table = markdown(stats, title) + "\n" + findings(stats) + "\n"
    print(table)
    write_text(os.path.join(args.study_dir, "results.md"), table)
    document = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([PROGRAM, *(argv if argv is not None else sys.argv[1:])]),
                "settings": settings(args), "seeds": args.seeds, "title": title, "machine": facts,
                "load_before": list(load_before), "load_after": list(os.getloadavg()),
                # this session: runs trained now (the others were read from their result.json) and its time
                "trained_now": trained, "seconds": round(time.perf_counter() - start, 1),
                "paper": "Woo et al., CBAM, ECCV 2018, Tables 1-3: ImageNet ResNet-50 top-1 / top-5 error %",
                "rows": stats, "runs": results}
    if timing(document):
        log(timing(document))
    text = json.dumps(document, indent=1) + "\n"
    write_text(os.path.join(args.study_dir, "results.json"), text)
    written = ["results.md", "results.json"]
    if args.json:
        write_text(args.json, text)
        written.append(args.json)
    if args.plot:
        try:
            plot(stats, os.path.join(args.study_dir, "results.png"), title)
            written.append("results.png")
        except ImportError:
            log("no plot: matplotlib is not installed (pip install 'cbam-jax[bench]')")
    log(f"wrote {', '.join(w if w == args.json else os.path.join(args.study_dir, w) for w in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
