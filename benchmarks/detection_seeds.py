"""CBAM against the plain backbone in the FCOS detector on the generated shapes set: the recipe
configs/detection_shapes.py trained with each backbone for several seeds, its COCO figures tabulated
(docs/detection.md, "Results on the generated set").

    python -m benchmarks.detection_seeds                       # cbam_resnet18 and resnet18, seeds 0 1 2
    python -m benchmarks.detection_seeds --json benchmarks/results/detection_seeds.json   # the docs' record
    python -m benchmarks.detection_seeds --seeds 0 1 2 3 4 --config.num_train_steps=1200  # any train.py override

Each run is `python train.py --config configs/detection_shapes.py --config.model.name=MODEL
--config.seed=SEED --workdir STUDY_DIR/MODEL_seedSEED` in a process of its own (the command the page
shows); its figures are the `summary` record train.py leaves in the workdir's metrics.jsonl. A run
whose metrics.jsonl ends with a finished summary is not trained again; an interrupted one resumes
from its last checkpoint (train.py's own resume). The study writes STUDY_DIR/results.md (the table)
and the report (every run's figures, the machine, the command) to --json, default
STUDY_DIR/results.json; the table is also printed.

Table: mean +/- sample standard deviation over the seeds of mAP@[.5:.95], mAP@.5 and mAP@.75 on the
eval images, and mAP@.5 of each seed; the last row is the difference of the first two models, seed
by seed (mean +/- sample standard deviation of the paired differences).
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from cbam_jax.cli import ArgumentParser
from cbam_jax.errors import UsageError, UserError, report

PROGRAM = "python -m benchmarks.detection_seeds"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = "configs/detection_shapes.py"
MODELS = ("cbam_resnet18", "resnet18")
SEEDS = (0, 1, 2)
METRICS = (("mAP", "mAP@[.5:.95]"), ("mAP50", "mAP@.5"), ("mAP75", "mAP@.75"))
PER_SEED = "mAP50"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0],
                     epilog="Any other --config.FIELD=VALUE is a train.py override applied to every run.")
    parser.add_argument("--models", nargs="+", default=list(MODELS), metavar="MODEL",
                        help=f"backbones (default {' '.join(MODELS)}); the table's last row compares the first two")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), metavar="SEED",
                        help=f"config.seed of the runs (default {' '.join(map(str, SEEDS))})")
    parser.add_argument("--study-dir", default=os.path.join("runs", "detection_seeds"),
                        help="one workdir per run below it (default runs/detection_seeds)")
    parser.add_argument("--json", help="where the report goes (default STUDY_DIR/results.json)")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    for field in ("seed", "model.name"):
        if any(a.split("=")[0] == f"--config.{field}" for a in extra):
            parser.error(f"the study sets config.{field} for each run; use --{'seeds' if field == 'seed' else 'models'}")
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.models)) != len(args.models):
        parser.error("--seeds and --models take each value once")
    args.overrides = extra
    args.json = args.json or os.path.join(args.study_dir, "results.json")
    return args


def run_config(model: str, seed: int, overrides: Sequence[str]):
    """The validated config of one run: what train.py builds from the same command line."""
    from absl import flags

    from cbam_jax.detection.config import validate
    from cbam_jax.training.config import config_from_flags

    argv = ["train.py", f"--config.model.name={model}", f"--config.seed={seed}", *overrides]
    try:
        return validate(config_from_flags(argv, flags.FlagValues(), os.path.join(ROOT, RECIPE)))
    except UserError as error:
        raise UsageError(f"{model} seed {seed}: {error}") from None


def command(model: str, seed: int, workdir: str, overrides: Sequence[str]) -> list[str]:
    """train.py's command line of one run (program first)."""
    return ["train.py", "--config", RECIPE, f"--config.model.name={model}", f"--config.seed={seed}", *overrides,
            "--workdir", workdir]


def finished_summary(workdir: str) -> dict[str, Any] | None:
    """The last `summary` record of WORKDIR/metrics.jsonl if it is of a finished run, else None."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        summaries = [record for record in map(json.loads, f) if record.get("split") == "summary"]
    if summaries and summaries[-1]["status"] == "finished":
        return summaries[-1]
    return None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: dict[str, dict[str, dict[str, Any]]], seeds: Sequence[int]) -> dict[str, Any]:
    """Per model and metric: mean and std over `seeds`; then the paired differences of the first two models."""
    keys = [key for key, _ in METRICS]
    stats = {model: {key: mean_std([by_seed[str(s)]["final"][key] for s in seeds]) for key in keys}
             for model, by_seed in runs.items()}
    models = list(runs)
    if len(models) >= 2:
        first, second = runs[models[0]], runs[models[1]]
        differences = {key: [first[str(s)]["final"][key] - second[str(s)]["final"][key] for s in seeds] for key in keys}
        stats["difference"] = {"models": models[:2], **{key: mean_std(d) for key, d in differences.items()},
                               "per_seed": differences}
    return stats


def markdown(report: dict[str, Any]) -> str:
    """The table of a report: one row per model, then the difference of the first two."""
    seeds, runs, stats = report["seeds"], report["runs"], report["stats"]
    lines = ["| backbone | " + " | ".join(label for _, label in METRICS)
             + f" | {dict(METRICS)[PER_SEED]} per seed ({' / '.join(map(str, seeds))}) |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    for model, by_seed in runs.items():
        cells = [f"{stats[model][key][0]:.3f} +/- {stats[model][key][1]:.3f}" for key, _ in METRICS]
        per_seed = " / ".join(f"{by_seed[str(s)]['final'][PER_SEED]:.3f}" for s in seeds)
        lines.append(f"| {model} (width {report['width'][model]}) | " + " | ".join(cells) + f" | {per_seed} |")
    if "difference" in stats:
        d = stats["difference"]
        cells = [f"{d[key][0]:+.3f} +/- {d[key][1]:.3f}" for key, _ in METRICS]
        per_seed = " / ".join(f"{value:+.3f}" for value in d["per_seed"][PER_SEED])
        lines.append(f"| difference, {d['models'][0]} - {d['models'][1]} | " + " | ".join(cells) + f" | {per_seed} |")
    return "\n".join(lines) + "\n"


def caption(report: dict[str, Any]) -> str:
    """What the table was measured with and on, and how long the runs took, in one paragraph."""
    from benchmarks.ablation import machine_line

    runs = [run for by_seed in report["runs"].values() for run in by_seed.values()]
    train = [run["train_seconds"] for run in runs]
    first = [run["first_step_seconds"] for run in runs]
    overrides = f" with {' '.join(report['overrides'])}" if report["overrides"] else ""
    # the load of the invocation that trained the runs (wall_seconds: runs trained by this invocation)
    load = (f"; the 1-minute load average was {report['load_before'][0]:.1f} before the study and "
            f"{report['load_after'][0]:.1f} after it" if any("wall_seconds" in run for run in runs) else "")
    return (f"`{report['recipe']}`{overrides}: {report['steps']} steps of batch {report['batch_size']} on "
            f"{report['train_images']} generated training images, COCO figures on {report['eval_images']} held-out "
            f"images; seeds {', '.join(map(str, report['seeds']))}; {machine_line(report['machine'])}. Each run trained "
            f"for {min(train):.0f}-{max(train):.0f} s after a first (compiling) step of "
            f"{min(first):.0f}-{max(first):.0f} s{load}.")


def write_text(path: str, text: str) -> None:
    """`path` replaced whole (never half-written)."""
    from cbam_jax.atomic import atomic_output

    with atomic_output(path, replace=True) as temporary:
        temporary.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)

    try:
        args = parse_args(argv)
        configs = {(model, seed): run_config(model, seed, args.overrides) for model in args.models for seed in args.seeds}
        from cbam_jax.atomic import check_destination

        for path, option in ((args.study_dir, "--study-dir"), (args.json, "--json")):
            check_destination(path, replace=True, option=option)
        if os.path.exists(args.study_dir) and not os.path.isdir(args.study_dir):
            raise UsageError(f"--study-dir {args.study_dir} is a file, not a folder; use another --study-dir")
    except UserError as error:
        return report(PROGRAM, error, exit_code=2)

    from benchmarks.ablation import machine

    load_before = os.getloadavg()
    runs: dict[str, dict[str, dict[str, Any]]] = {model: {} for model in args.models}
    for seed in args.seeds:  # seed by seed, so that an interrupted study already compares the models
        for model in args.models:
            workdir = os.path.join(args.study_dir, f"{model}_seed{seed}")
            summary = finished_summary(workdir)
            if summary is None:
                run_start = time.perf_counter()
                line = command(model, seed, workdir, args.overrides)
                absolute = command(model, seed, os.path.abspath(workdir), args.overrides)  # from any folder
                absolute[0], absolute[2] = os.path.join(ROOT, "train.py"), os.path.join(ROOT, RECIPE)
                try:
                    done = subprocess.run([sys.executable, *absolute], stdout=sys.stderr, env={  # stdout: the table
                        **os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))})
                except KeyboardInterrupt:
                    print(f"{PROGRAM}: interrupted; run the same command again to resume (finished runs are kept, "
                          "the interrupted one continues from its last checkpoint).", file=sys.stderr)
                    return 130
                summary = finished_summary(workdir)
                if done.returncode != 0 or summary is None:
                    print(f"{PROGRAM}: python {' '.join(line)} ended with exit code {done.returncode} (its message is "
                          "above); run the same command again to resume", file=sys.stderr)
                    return 1
                summary["wall_seconds"] = round(time.perf_counter() - run_start, 1)
            runs[model][str(seed)] = {key: summary[key] for key in
                                      ("final", "best_mAP", "best_step", "total_steps", "train_seconds",
                                       "first_step_seconds", "images_per_second", "wall_seconds") if key in summary}
            log(f"{model} seed {seed}: mAP {summary['final']['mAP']:.3f}, mAP@.5 {summary['final']['mAP50']:.3f}")

    first = configs[args.models[0], args.seeds[0]]
    document = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([PROGRAM, *(argv if argv is not None else sys.argv[1:])]),
                "recipe": RECIPE, "overrides": args.overrides, "seeds": args.seeds,
                "steps": first.num_train_steps, "batch_size": first.batch_size,
                "train_images": first.dataset.num_train_images, "eval_images": first.dataset.num_eval_images,
                "width": {model: configs[model, args.seeds[0]].model.width for model in args.models},
                "machine": machine(), "load_before": list(load_before), "load_after": list(os.getloadavg()),
                "runs": runs, "stats": aggregate(runs, args.seeds)}
    table = caption(document) + "\n\n" + markdown(document)
    print(table, end="")
    write_text(os.path.join(args.study_dir, "results.md"), table)
    write_text(args.json, json.dumps(document, indent=1) + "\n")
    log(f"wrote {os.path.join(args.study_dir, 'results.md')} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
