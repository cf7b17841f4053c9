"""Checkpoints of a training workdir with orbax: `checkpoints/` (periodic, keep N) and `best/` (the
best eval accuracy so far, keep 1).

Each step directory holds three items: 'state' (the TrainState as host arrays), 'data' (the grain
iterator state: where the training stream stands) and 'meta' (JSON: the model's architecture via
`cbam_jax.registry.model_config`, the training config, step, best accuracy). Each save is waited
for (a failed one stops the run at once), and orbax writes to a temporary directory then renames,
so an interrupted or failed save never leaves a half-written checkpoint.

`Checkpoints` saves and resumes a run (all processes together); `restore_variables` reads the
model of a finished checkpoint (latest or best) from the calling process alone, for `cbam-jax eval`
and the export at the end of training.
"""

import contextlib
import errno
import fcntl
import logging as std_logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from cbam_jax.errors import InvalidInput, MissingInput, OutputError
from cbam_jax.pretrained import process_local_checkpointer

LATEST_DIR, BEST_DIR = "checkpoints", "best"
DAMAGED_DIR = "damaged"  # damaged steps are moved here (WORKDIR/damaged/checkpoints/STEP), never deleted
DIVERGED_FIX = "Lower config.learning_rate, set config.grad_clip_norm, or use precision='float32'."
LOCK_FILE = "train.lock"  # held (flock) by the process that trains in the workdir; holds its process id

# Fields of model_config that describe the computation, not the architecture: a run may resume
# with another precision, parallel mode or implementation of the same layers.
NON_ARCHITECTURE_FIELDS = ("dtype", "bn_axis_name", "implementation", "remat")


def architecture(model_config: dict) -> dict:
    """The fields of a `registry.model_config` that fix the parameters."""
    return {k: v for k, v in model_config.items() if k not in NON_ARCHITECTURE_FIELDS}


def _manager(directory: str, keep: int, name: str) -> ocp.CheckpointManager:
    # Both managers may save the same step at once: their multi-process barriers need distinct names.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))
    return ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "data", "meta"), options=options)


class NonFiniteState(FloatingPointError):
    """The training state to be saved holds NaN or inf: the run diverged; nothing was saved."""


class SaveFailed(OutputError):
    """A checkpoint could not be written (disk full, file too large, permissions): the run stops."""


def nonfinite_leaves(tree: Any) -> list[str]:
    """The paths ('params/conv1/kernel') of the floating-point leaves of `tree` holding NaN or inf."""
    broken = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.asarray(leaf)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            broken.append("/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
                                   for key in path))
    return broken


def lock_workdir(workdir: str) -> Any:
    """Hold an exclusive lock on `workdir` (created if missing) for as long as the returned file is open.

    The kernel drops the lock when the process ends, however it ends (a killed run never leaves a
    stale lock). Also the check that the workdir is writable, before anything compiles.

    Raises:
      OutputError: another process holds the lock (named by its process id), or the workdir is not writable.
    """
    path = os.path.join(workdir, LOCK_FILE)
    try:
        os.makedirs(workdir, exist_ok=True)
        if not os.access(workdir, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), workdir)
        lock = open(path, "a+")
    except OSError as error:
        raise OutputError(f"--workdir {workdir}: cannot write there ({error.strerror or error}); "
                          "choose a writable --workdir.") from error
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        if error.errno not in (errno.EAGAIN, errno.EACCES):
            raise OutputError(f"--workdir {workdir}: cannot lock {path} ({error.strerror}).") from error
        raise OutputError(f"--workdir {workdir} is in use by another training run (process {holder}); wait for "
                          "it to end or stop it, or use another --workdir.") from error
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


@contextlib.contextmanager
def holding_workdir(workdir: str):
    """One run per workdir: `lock_workdir` held by process 0 (the one that writes) for the block."""
    lock = lock_workdir(workdir) if jax.process_index() == 0 else None
    try:
        yield
    finally:
        if lock is not None:
            lock.close()


def _drop_closed_loop_callbacks(previous_hook):
    """A sys.unraisablehook that drops the 'Event loop is closed' errors tensorstore's writer threads
    raise after a failed save has ended orbax's event loop (hundreds of tracebacks otherwise)."""

    def hook(unraisable):
        if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
            previous_hook(unraisable)

    hook.drops_closed_loop_callbacks = True
    return hook


@contextlib.contextmanager
def _quiet_save():
    """While a save runs, orbax's and tensorstore's own reports of a failed write stay silent: the
    failure is raised here and reported once, as one line."""
    if not getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
        sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)  # they arrive late: kept
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.FATAL)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _damaged(error: BaseException) -> str:
    """What went wrong, short, for the one-line warning or message: the system's reason where there is
    one (an OSError, or tensorstore's "...: File too large [os_error_code='27']"), else the first line."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} (errno {error.errno})"
    found = re.search(r":\s*([^:]+?)\s*\[os_error_code='(\d+)'\]", str(error))
    if found:
        return f"{found.group(1)} (errno {found.group(2)})"
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


class Checkpoints:
    """The periodic and best checkpoint managers of a workdir.

    Every save is checked first: a state holding NaN or inf is never saved (`NonFiniteState`), so
    every checkpoint on disk is finite. A save that fails (disk full) stops the run with `SaveFailed`
    (saves are waited for, so at once); orbax writes into a temporary folder, so the previous checkpoint stays intact.
    A step that cannot be read back is moved to WORKDIR/damaged/ with a warning, and the run resumes
    from the newest intact step.
    """

    def __init__(self, workdir: str, keep: int):
        self.workdir = workdir
        self.latest = _manager(os.path.join(workdir, LATEST_DIR), keep, "latest")
        self.best = _manager(os.path.join(workdir, BEST_DIR), 1, "best")
        self.closed = False

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def _newest_readable(self, manager: ocp.CheckpointManager, folder: str, read) -> Any:
        """`read(step)` of the newest step that reads; newer steps that do not are moved to
        WORKDIR/damaged/FOLDER/STEP (never deleted) with a one-line warning each.

        A step counts as damaged only when an older one reads: when none does, nothing is moved and
        the newest step's error is raised as it is (a wrong template is a bug, not damage).
        """
        steps = sorted(manager.all_steps(), reverse=True)
        failures = []
        for step in steps:
            try:
                result = read(step)
            except Exception as error:  # any read error of a damaged file: orbax, tensorstore, json
                failures.append((step, error))
                continue
            for damaged, error in failures:
                target = os.path.join(self.workdir, DAMAGED_DIR, folder, str(damaged))
                while os.path.exists(target):
                    target += "-again"
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.move(os.path.join(self.workdir, folder, str(damaged)), target)
                warnings.warn(f"Checkpoint step {damaged} in {self.workdir}/{folder} is damaged ({_damaged(error)}); "
                              f"moved to {target}; resuming from step {step}.", stacklevel=3)
            if failures:
                manager.reload()
            return result
        if failures:
            raise failures[0][1]
        return None

    def meta(self) -> dict | None:
        """The 'meta' item of the newest readable periodic checkpoint, None if there is none."""
        return self._newest_readable(self.latest, LATEST_DIR, lambda step: self.latest.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, template: Any, best: bool = False) -> tuple[Any, dict, dict]:
        """(state like `template` as host arrays, data iterator state, meta) of the newest intact
        latest (or best) step; damaged newer steps are moved aside (`_newest_readable`)."""
        manager, folder = (self.best, BEST_DIR) if best else (self.latest, LATEST_DIR)
        restored = self._newest_readable(manager, folder, lambda step: manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())))
        if restored is None:
            raise MissingInput(f"No checkpoint in {self.workdir}/{folder}.")
        return restored["state"], restored["data"], restored["meta"]

    def save(self, step: int, host_state: Any, data_state: dict, meta: dict, best: bool = False) -> None:
        """Save `step` (periodic, or into best/) and wait until it is on disk.

        Raises:
          NonFiniteState: the state holds NaN or inf (nothing is saved).
          SaveFailed: the save failed (what it wrote is removed; earlier steps are intact).
        """
        broken = nonfinite_leaves({"params": host_state.params, "batch_stats": host_state.batch_stats,
                                   "opt_state": host_state.opt_state})
        if broken:
            raise NonFiniteState(
                f"The training state at step {step} holds NaN or infinite values ({', '.join(broken[:2])}"
                f"{f' and {len(broken) - 2} more' if len(broken) > 2 else ''}); it was not saved. "
                f"{self.last_good_sentence()} {DIVERGED_FIX}")
        manager = self.best if best else self.latest
        try:
            with _quiet_save():
                manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                                           data=ocp.args.JsonSave(data_state),
                                                           meta=ocp.args.JsonSave(meta)), force=True)
                # Wait for it: a failed save (disk full) stops the run here, in one place, instead of
                # in a writer thread while training goes on; the copy to host was the slow part anyway.
                manager.wait_until_finished()
        except Exception as error:  # OSError, or orbax's re-raise of tensorstore's (ValueError OUT_OF_RANGE...)
            raise self._save_failed(step, error) from error

    def last_good_sentence(self) -> str:
        """'Training stopped; the last good checkpoint (step N) in ... is intact.' (or: none was written)."""
        step = self.latest_step()
        if step is None:
            return "Training stopped; no checkpoint was written."
        return f"Training stopped; the last good checkpoint (step {step}) in {self.workdir}/{LATEST_DIR} is intact."

    def _save_failed(self, step: int | None, error: BaseException) -> SaveFailed:
        # The failed save's abandoned writer tasks log "Task exception was never retrieved" (asyncio's
        # logger, when they are collected: any time later, seen at exit) with this same error, which the
        # run reports once, as one line; the run stops here, so asyncio's logger stays silent from now on.
        std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
        for folder in (LATEST_DIR, BEST_DIR):  # what the failed save wrote: free its space
            root = os.path.join(self.workdir, folder)
            for name in os.listdir(root) if os.path.isdir(root) else ():
                if ".orbax-checkpoint-tmp" in name:
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        for manager in (self.latest, self.best):
            manager.reload()
        return SaveFailed(f"Saving a checkpoint{f' (step {step})' if step is not None else ''} in {self.workdir} failed: "
                          f"{_damaged(error)}. {self.last_good_sentence()} Free space and run the same command "
                          "again to resume.")

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
        failure = None
        for manager in (self.latest, self.best):
            try:
                manager.wait_until_finished()
                manager.close()
            except Exception as error:  # a failed asynchronous save: reported once both managers are closed
                failure = failure or error
        if failure is not None:
            raise self._save_failed(None, failure) from failure


def restore_variables(workdir: str | os.PathLike, which: str = "best", step: int | None = None) -> tuple[dict, dict]:
    """The model variables {'params', 'batch_stats'} (host arrays) and the 'meta' item of the newest
    readable checkpoint of `workdir`, read by the calling process alone.

    `which`: 'best' (`best/`, then the periodic checkpoints of `checkpoints/`, newest first) or
    'latest' (`checkpoints/` only); `step`: that periodic step instead. A damaged step is skipped
    with a one-line warning naming it (and the one used instead).

    Raises:
      MissingInput: the workdir has no such checkpoint.
      InvalidInput: no candidate step could be read (the message names the damaged folder).
    """
    if which not in ("best", "latest"):
        raise ValueError(f"restore_variables: which must be 'best' or 'latest'; got {which!r}.")
    folders = (BEST_DIR, LATEST_DIR) if which == "best" else (LATEST_DIR,)
    workdir = Path(workdir).absolute()  # orbax reads absolute paths only (`--workdir runs/digits` as the README writes)
    if step is not None:
        available = _finished_steps(Path(workdir) / LATEST_DIR)
        if step not in available:
            raise MissingInput(f"--step {step}: no such checkpoint in {workdir}/{LATEST_DIR} (saved steps: "
                               f"{', '.join(map(str, available)) or 'none'}).")
        candidates = [Path(workdir) / LATEST_DIR / str(step)]
    else:
        candidates = [Path(workdir) / folder / str(saved) for folder in folders
                      for saved in reversed(_finished_steps(Path(workdir) / folder))]
    failures = []
    for directory in candidates:
        try:
            state = process_local_checkpointer().restore(directory / "state")
            meta = process_local_checkpointer(ocp.JsonCheckpointHandler).restore(directory / "meta")
        except Exception as error:  # any read error of a damaged file: orbax, tensorstore, json
            failures.append((directory, error))
            continue
        for damaged, error in failures:
            warnings.warn(f"Checkpoint {damaged} is damaged ({_damaged(error)}); using {directory} instead.",
                          stacklevel=2)
        return {"params": state["params"], "batch_stats": state["batch_stats"]}, meta
    if failures:
        damaged, error = failures[0]
        raise InvalidInput(f"Checkpoint {damaged} cannot be read ({_damaged(error)})"
                           + (f" and neither can the {len(failures) - 1} other(s)" if len(failures) > 1 else "")
                           + "; give an intact step with --step, or retrain.")
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
