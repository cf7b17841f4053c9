"""Evaluation over a whole split, and the `cbam-jax eval` subcommand.

`cbam-jax eval --workdir DIR [--split test] [--checkpoint best|latest]` evaluates a training run's
checkpoint on a split of the dataset it was trained on (a detection run: its COCO figures, see
cbam_jax/detection/evaluate.py); `cbam-jax eval --pretrained DIR --config
configs/NAME.py` evaluates a converted pretrained model on that config's eval split.
"""

import argparse
import json
import os

import jax
import ml_collections

from cbam_jax.data import eval_batches, make_source
from cbam_jax.data.pipeline import check_source
from cbam_jax.errors import InvalidInput, MissingInput, UsageError
from cbam_jax.factory import load
from cbam_jax.predict import check_positive
from cbam_jax.registry import model_from_config
from cbam_jax.training.checkpoint import restore_variables
from cbam_jax.training.config import config_from_json, load_config
from cbam_jax.training.parallel import DataParallel


def evaluate_split(parallel, variables: dict, source, dataset: ml_collections.ConfigDict, batch_size: int) -> dict:
    """{'accuracy', 'loss', 'count'} over every example of `source`, each counted exactly once.

    `variables` are placed by `parallel` (replicated); the last batch is padded and masked.
    """
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    pending = []
    for batch in eval_batches(source, dataset, global_batch=batch_size, process_index=jax.process_index(),
                              process_count=jax.process_count()):
        pending.append(parallel.eval_step(variables, parallel.place_batch(batch)))
    for metrics in pending:
        for key, value in parallel.metrics_to_host(metrics).items():
            totals[key] += value
    count = totals["count"]
    return {"accuracy": totals["correct"] / count, "loss": totals["loss_sum"] / count, "count": int(count)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a training workdir (its checkpoint and the config it was trained with)")
    source.add_argument("--pretrained", help="a converted pretrained model directory, a registered name or an "
                        "hf-hub:ORG/NAME[@REV] id (needs --config)")
    parser.add_argument("--config", help="a config file (configs/NAME.py) naming the dataset; "
                                         "default for --workdir: the config saved in the checkpoint")
    parser.add_argument("--split", help="split to evaluate (default: the config's dataset.eval_split)")
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                        help="which checkpoint of --workdir (default best; then the periodic ones, newest "
                        "first, if best/ is missing or damaged)")
    parser.add_argument("--step", type=int, help="evaluate this periodic checkpoint of --workdir (checkpoints/STEP)")
    parser.add_argument("--batch-size", type=int, help="eval batch size (default: the config's eval_batch_size)")
    parser.add_argument("--parallel", choices=("jit", "pmap"), default="jit")


def run(args: argparse.Namespace) -> int:
    """Print the metrics as one JSON line; a UserError (one line on stderr, exit code 1) on bad input."""
    check_positive(args, "batch_size")
    if args.workdir and not os.path.isdir(args.workdir):
        raise MissingInput(f"--workdir {args.workdir}: {'is a file, not a' if os.path.exists(args.workdir) else 'no such'} "
                           "training workdir; give the --workdir a train.py run wrote.")
    if args.config and not os.path.isfile(args.config):
        raise MissingInput(f"--config {args.config}: no such recipe file; give configs/NAME.py.")
    if args.step is not None and not args.workdir:
        raise UsageError("--step picks a checkpoint of --workdir; it needs --workdir.")
    print(json.dumps(_evaluate(args)))
    return 0


def _evaluate(args: argparse.Namespace) -> dict:
    if args.workdir:
        variables, meta = restore_variables(args.workdir, args.checkpoint, args.step)
        if meta.get("task") == "detection":  # a detection run: its COCO figures (cbam_jax/detection/evaluate.py)
            from cbam_jax.detection import config as detection_config
            from cbam_jax.detection.evaluate import evaluate_checkpoint

            config = load_config(args.config, detection_config.validate) if args.config else None
            return evaluate_checkpoint(variables, meta, config=config, split=args.split, batch_size=args.batch_size)
        config = load_config(args.config) if args.config else config_from_json(meta["config"])
        model = model_from_config(meta["model_config"])
        step = meta["step"]
    else:
        if not args.config:
            raise UsageError("--pretrained needs --config configs/NAME.py to say which dataset to evaluate on.")
        config = load_config(args.config)
        model, variables = load(args.pretrained)
        step = None
    batch_size = args.batch_size or config.eval_batch_size
    DataParallel.check_batch_size(batch_size, "eval_batch_size (--batch-size)")
    split = args.split or config.dataset.eval_split
    source = make_source(config.dataset, split)
    if model.num_classes != config.dataset.num_classes:
        raise InvalidInput(f"the model has {model.num_classes} outputs but --config {args.config} says "
                           f"dataset.num_classes = {config.dataset.num_classes}; evaluate with the model's dataset config.")
    check_source(source, config.dataset, split)
    parallel = DataParallel(args.parallel, model, tx=None, num_classes=model.num_classes, label_smoothing=0.0,
                            mean=config.dataset.mean, std=config.dataset.std, dynamic_loss_scale=False)
    placed = parallel.place_state({"params": variables["params"], "batch_stats": variables.get("batch_stats", {})})
    metrics = evaluate_split(parallel, placed, source, config.dataset, batch_size)
    return {"split": split, "step": step, **metrics}
