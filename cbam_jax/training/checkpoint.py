"""Checkpoints of a training workdir with orbax: `checkpoints/` (periodic, keep N) and `best/` (the
best eval accuracy so far, keep 1).

Each step directory holds three items: 'state' (the TrainState as host arrays), 'data' (the grain
iterator state: where the training stream stands) and 'meta' (JSON: the model's architecture via
`cbam_jax.registry.model_config`, the training config, step, best accuracy). Saves are asynchronous;
`close()` waits for them, and orbax writes to a temporary directory then renames, so an interrupted
save never leaves a half-written checkpoint.

`Checkpoints` saves and resumes a run (all processes together); `restore_variables` reads the
model of a finished checkpoint (latest or best) from the calling process alone, for `cbam-jax eval`
and the export at the end of training.
"""

import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from cbam_jax.errors import InvalidInput, MissingInput
from cbam_jax.layers.common import upgrade_renamed_options
from cbam_jax.pretrained import process_local_checkpointer

LATEST_DIR, BEST_DIR = "checkpoints", "best"

# Fields of model_config that describe the computation, not the architecture: a run may resume
# with another precision, parallel mode or implementation of the same layers.
NON_ARCHITECTURE_FIELDS = ("dtype", "bn_axis_name", "implementation")


def architecture(model_config: dict) -> dict:
    """The fields of a `registry.model_config` that fix the parameters (renamed options upgraded)."""
    config = upgrade_renamed_options(model_config, "model config", warn=False)
    config["attention_options"] = upgrade_renamed_options(config.get("attention_options", {}), "model config",
                                                          warn=False)
    return {k: v for k, v in config.items() if k not in NON_ARCHITECTURE_FIELDS}


def _manager(directory: str, keep: int, name: str) -> ocp.CheckpointManager:
    # Both managers may save the same step at once: their multi-process barriers need distinct names.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))
    return ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "data", "meta"), options=options)


class Checkpoints:
    """The periodic and best checkpoint managers of a workdir."""

    def __init__(self, workdir: str, keep: int):
        self.workdir = workdir
        self.latest = _manager(os.path.join(workdir, LATEST_DIR), keep, "latest")
        self.best = _manager(os.path.join(workdir, BEST_DIR), 1, "best")
        self.closed = False

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def meta(self) -> dict | None:
        """The 'meta' item of the latest periodic checkpoint, None if there is none."""
        step = self.latest.latest_step()
        if step is None:
            return None
        return self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, template: Any, best: bool = False) -> tuple[Any, dict, dict]:
        """(state like `template` as host arrays, data iterator state, meta) of the latest (or best) step."""
        manager = self.best if best else self.latest
        step = manager.latest_step()
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["data"], restored["meta"]

    def save(self, step: int, host_state: Any, data_state: dict, meta: dict, best: bool = False) -> None:
        """Start an asynchronous save of `step` (periodic, or into best/)."""
        manager = self.best if best else self.latest
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                                   data=ocp.args.JsonSave(data_state),
                                                   meta=ocp.args.JsonSave(meta)), force=True)

    def discard_best_after(self, step: int) -> None:
        """Drop best/ checkpoints newer than `step`: a killed run saved them after its last periodic
        checkpoint, and the resumed run will replay (and re-save) those steps."""
        for saved in self.best.all_steps():
            if saved > step:
                self.best.delete(saved)

    def close(self) -> None:
        """Wait for every pending save to be on disk (a second call does nothing)."""
        if self.closed:
            return
        self.closed = True
        for manager in (self.latest, self.best):
            manager.wait_until_finished()
            manager.close()


def restore_variables(workdir: str | os.PathLike, which: str = "best") -> tuple[dict, dict]:
    """The model variables {'params', 'batch_stats'} (host arrays) and the 'meta' item of the newest
    checkpoint of `workdir`, read by the calling process alone.

    `which`: 'best' (`best/`, or the latest periodic checkpoint when no best was saved) or
    'latest' (`checkpoints/`).

    Raises:
      FileNotFoundError: the workdir has no such checkpoint.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"restore_variables: which must be 'best' or 'latest'; got {which!r}.")
    folders = (BEST_DIR, LATEST_DIR) if which == "best" else (LATEST_DIR,)
    for folder in folders:
        steps = _finished_steps(Path(workdir) / folder)
        if steps:
            directory = Path(workdir) / folder / str(steps[-1])
            state = process_local_checkpointer().restore(directory / "state")
            meta = process_local_checkpointer(ocp.JsonCheckpointHandler).restore(directory / "meta")
            return {"params": state["params"], "batch_stats": state["batch_stats"]}, meta
    expected = " or ".join(f"{workdir}/{folder}/STEP" for folder in folders)
    raise MissingInput(f"No checkpoint in {str(workdir)!r} (expected {expected}).")


def _finished_steps(folder: Path) -> list[int]:
    """The saved steps in an orbax manager's folder, oldest first (temporary step folders, named
    'STEP.orbax-checkpoint-tmp-...', are not finished)."""
    if not folder.is_dir():
        return []
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def check_architecture(saved_meta: dict, model_config: dict, workdir: str) -> None:
    """Refuse to resume a workdir whose checkpoint holds another architecture."""
    saved, current = architecture(saved_meta["model_config"]), architecture(model_config)
    if saved != current:
        differences = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        raise InvalidInput(
            f"The workdir {workdir!r} holds a checkpoint of another architecture (fields that differ: "
            f"{', '.join(f'{k}: saved {saved.get(k)!r} vs config {current.get(k)!r}' for k in differences)}). "
            "Use a new --workdir, or the config that wrote it.")
