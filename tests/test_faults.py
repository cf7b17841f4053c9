"""Fault injection: what the program does when something outside the code goes wrong (issue 22).

One section per class of fault: a diverging run, data that disagrees with itself, the huge-page
restart, a shared or lost workdir (lock, full disk, read-only), damaged checkpoints, failures at the
entry points, and the README's commands typed with relative paths. Command-line cases assert what
the bad-input table asserts: exit code != 0, exactly one stderr line, no traceback, nothing left
behind. Subprocess-heavy cases are marked slow; each class keeps at least one fast case.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbam_jax import host_memory

ROOT = Path(__file__).resolve().parents[1]


def _environment(**extra: str) -> dict[str, str]:
    """This environment with the checkout first on the path, huge pages not yet chosen, CPU JAX."""
    environment = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.DISABLE_VARIABLE)}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), environment.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    environment["JAX_PLATFORMS"] = "cpu"
    environment.update(extra)
    return environment


def assert_one_line_error(done: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit code != 0, exactly one line on stderr holding every `expected` text, no traceback."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0, (done.returncode, done.stderr)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# --- The huge-page restart: every way a program starts restarts faithfully or not at all ---------

HUGE_PAGE_PROGRAM = ("import os, sys\nfrom cbam_jax import host_memory\nhost_memory.use_huge_pages()\n"
                     "print('ran', os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])\n")
needs_huge_pages = pytest.mark.skipif(not host_memory.huge_pages_possible(),
                                      reason="needs Linux, glibc 2.35+ and transparent huge pages")


def _start(tmp_path: Path, how: str) -> tuple[list[str], str | None]:
    """The command line and standard input that start HUGE_PAGE_PROGRAM `how`."""
    (tmp_path / "program.py").write_text(HUGE_PAGE_PROGRAM)
    python = sys.executable
    return {"file": ([python, str(tmp_path / "program.py"), "arg"], None),
            "module": ([python, "-m", "program", "arg"], None),
            "-c": ([python, "-c", HUGE_PAGE_PROGRAM, "arg"], None),
            "stdin -": ([python, "-", "arg"], HUGE_PAGE_PROGRAM),
            "stdin": ([python], HUGE_PAGE_PROGRAM),
            "/dev/stdin": ([python, "/dev/stdin", "arg"], HUGE_PAGE_PROGRAM),
            "interactive": ([python, "-i"], HUGE_PAGE_PROGRAM)}[how]


@needs_huge_pages
@pytest.mark.parametrize("how, restarts", [("file", True), *(pytest.param(how, restarts, marks=pytest.mark.slow) for how, restarts in  # a subprocess each
    [("module", True), ("-c", True), ("stdin -", False), ("stdin", False), ("/dev/stdin", False), ("interactive", False)])])
def test_huge_page_restart_runs_the_program_once_however_it_started(tmp_path, how, restarts):
    command, stdin = _start(tmp_path, how)
    environment = _environment()
    environment["PYTHONPATH"] += os.pathsep + str(tmp_path)  # for -m program
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, env=environment, cwd=tmp_path,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    ran = [line for line in done.stdout.replace(">>> ", "").splitlines() if line.startswith("ran")]
    # The program ran exactly once to its end; with the tunable where it restarted, untouched where not.
    assert len(ran) == 1, (done.stdout, done.stderr)
    assert (host_memory.TUNABLE in ran[0]) == restarts, ran
    if how not in ("stdin", "interactive"):
        assert ran[0].endswith("['arg']"), ran


# --- Training state on disk: a small TrainState saved and read by the real Checkpoints -----------

def _state(variance: float = 1.0, step: int = 1):
    """A small TrainState of host arrays (one BatchNorm variance set to `variance`)."""
    import numpy as np

    from cbam_jax.training.step import TrainState

    return TrainState(step=np.asarray(step, np.int32), params={"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}},
                      batch_stats={"bn": {"var": np.array([1.0, variance], np.float32)}},
                      opt_state=({"dense": {"kernel": np.zeros((2, 3), np.float32)}},),
                      loss_scale=np.asarray(1.0, np.float32), finite_steps=np.asarray(0, np.int32))


def _save(checkpoints, step: int, **kwargs) -> None:
    checkpoints.save(step, _state(step=step, **kwargs), {"position": step}, {"step": step}, **{})


def _restore(workdir: Path):
    from cbam_jax.training.checkpoint import Checkpoints

    checkpoints = Checkpoints(str(workdir), keep=3)
    try:
        return checkpoints.restore(_state())
    finally:
        checkpoints.close()


# --- A diverging run: non-finite state is never saved ---------------------------------------------

def test_nonfinite_state_is_never_saved_and_the_message_names_the_last_finite_step(tmp_path):
    from cbam_jax.training.checkpoint import Checkpoints, NonFiniteState

    checkpoints = Checkpoints(str(tmp_path), keep=3)
    _save(checkpoints, 4)
    with pytest.raises(NonFiniteState, match=r"step 8 holds NaN.*batch_stats/bn/var.*last good checkpoint \(step 4\)"):
        _save(checkpoints, 8, variance=float("inf"))
    with pytest.raises(NonFiniteState):  # nor promoted to best/
        checkpoints.save(8, _state(variance=float("nan")), {}, {}, best=True)
    checkpoints.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"] and os.listdir(tmp_path / "best") == []


@pytest.mark.slow
def test_diverging_run_saves_nothing_nonfinite_and_leaves_no_workdir(tmp_path, xla_cache):
    # learning_rate 1e4: the loss at step 4 is finite but the BatchNorm variances after it are inf.
    workdir = tmp_path / "run"
    done = _train(workdir, "--config.learning_rate=1e4", cache=xla_cache)
    assert_one_line_error(done, "holds NaN or infinite values", "no checkpoint was written")
    assert not workdir.exists()  # failed before its first checkpoint: nothing left, not even TensorBoard


# --- Runs that share or lose their folder: lock, full disk, read-only -------------------------------

def test_second_lock_on_a_workdir_names_the_holder_and_a_released_lock_is_free(tmp_path):
    from cbam_jax.errors import OutputError
    from cbam_jax.training.checkpoint import lock_workdir

    lock = lock_workdir(str(tmp_path))
    with pytest.raises(OutputError, match=rf"in use by another training run \(process {os.getpid()}\)"):
        lock_workdir(str(tmp_path))
    lock.close()
    lock_workdir(str(tmp_path)).close()


def test_unwritable_workdir_is_refused(tmp_path, monkeypatch):
    from cbam_jax.errors import OutputError
    from cbam_jax.training.checkpoint import lock_workdir

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root writes anywhere: pretend read-only
    with pytest.raises(OutputError, match="cannot write there"):
        lock_workdir(str(tmp_path))


def test_failed_save_is_one_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    from cbam_jax.training.checkpoint import Checkpoints, SaveFailed

    checkpoints = Checkpoints(str(tmp_path), keep=1)
    _save(checkpoints, 4)

    def disk_full(self, *args, **kwargs):
        os.makedirs(os.path.join(self.directory, "8.orbax-checkpoint-tmp"))  # what a failed save leaves
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    with pytest.raises(SaveFailed, match=r"No space left on device \(errno 28\).*last good checkpoint \(step 4\)"):
        _save(checkpoints, 8)
    monkeypatch.undo()
    checkpoints.close()
    assert os.listdir(tmp_path / "checkpoints") == ["4"]  # intact, and the partial step removed
    assert int(_restore(tmp_path)[0].step) == 4


# --- Damaged checkpoints ------------------------------------------------------------------------

def _damage(step_dir: Path) -> None:
    """Truncate every data file of a step's state (a torn copy, a bad disk)."""
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.name not in ("commit_success.txt",):
            path.write_bytes(path.read_bytes()[:7])


def test_damaged_latest_step_is_moved_aside_and_the_newest_intact_step_resumes(tmp_path):
    from cbam_jax.training.checkpoint import Checkpoints

    checkpoints = Checkpoints(str(tmp_path), keep=3)
    _save(checkpoints, 4)
    _save(checkpoints, 8)
    checkpoints.close()
    _damage(tmp_path / "checkpoints" / "8")
    with pytest.warns(UserWarning, match=r"step 8 .* is damaged .*moved to .*damaged/checkpoints/8; resuming from step 4"):
        state, data, meta = _restore(tmp_path)
    assert int(state.step) == 4 and data == {"position": 4} and meta == {"step": 4}
    assert os.listdir(tmp_path / "checkpoints") == ["4"] and (tmp_path / "damaged" / "checkpoints" / "8").is_dir()


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> Path:
    """One compilation cache for this module's train.py runs: they compile the same programs (~20 s
    of each run's ~33 s on two cores). Not the session's shared one: these runs demand exactly one
    line on stderr, and JAX warns when it reads an entry another process is still writing (its cache
    writes are not atomic) or cannot write one (the full-disk run)."""
    return tmp_path_factory.mktemp("xla_cache")


def _train(workdir: Path, *overrides: str, cache: Path, file_size_limit: int | None = None
           ) -> subprocess.CompletedProcess:
    """train.py on configs/tiny.py in `workdir` (a subprocess: what a user runs) with the compilation
    cache `cache`; with `file_size_limit`,
    no file may grow past that many bytes (RLIMIT_FSIZE, SIGXFSZ ignored so that write() fails with
    EFBIG): a full disk without root. The limit is set by a small wrapper that then execs train.py."""
    wrapper = []
    if file_size_limit is not None:
        wrapper = ["-c", "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                         f"resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, {file_size_limit})); "
                         "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]
    return subprocess.run([sys.executable, *wrapper, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py"),
                           "--workdir", str(workdir), f"--config.compilation_cache_dir={cache}", *overrides],
                          capture_output=True, text=True, env=_environment(CBAM_JAX_HUGE_PAGES="0"), cwd=ROOT,
                          timeout=600)


@pytest.mark.slow
def test_second_train_run_on_a_workdir_stops_at_once_naming_the_first(tmp_path, xla_cache):
    import time

    from cbam_jax.training.checkpoint import LOCK_FILE, lock_workdir

    workdir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py"),
                              "--workdir", str(workdir), "--config.compilation_cache_dir=",
                              "--config.num_train_steps=100000"], env=_environment(CBAM_JAX_HUGE_PAGES="0"), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (workdir / LOCK_FILE).is_file() or not (workdir / LOCK_FILE).read_text():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = _train(workdir, cache=xla_cache)
        assert_one_line_error(second, f"in use by another training run (process {first.pid})")
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    lock_workdir(str(workdir)).close()  # the kernel dropped the killed run's lock


@pytest.mark.slow
def test_full_disk_during_a_save_stops_in_one_line_and_the_resume_is_exact(tmp_path, xla_cache):
    from tests.test_train import assert_same_state, final_state

    straight, run = tmp_path / "straight", tmp_path / "run"
    assert _train(straight, cache=xla_cache).returncode == 0
    assert _train(run, "--config.stop_at_step=4", cache=xla_cache).returncode == 0
    # The checkpoint's data files cannot be written (the programs come from the cache: nothing else is).
    full = _train(run, cache=xla_cache, file_size_limit=200_000)
    assert_one_line_error(full, "failed: File too large", "last good checkpoint (step 4)", "run the same command again")
    assert os.listdir(run / "checkpoints") == ["4"]  # intact, and nothing half-written left
    resumed = _train(run, cache=xla_cache)  # space freed
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_state(final_state(run)[1], final_state(straight)[1])


def _workdir_with_best_and_latest(tmp_path: Path) -> Path:
    from cbam_jax.training.checkpoint import Checkpoints

    checkpoints = Checkpoints(str(tmp_path), keep=3)
    _save(checkpoints, 4)
    checkpoints.save(8, _state(step=8, variance=2.0), {}, {"step": 8}, best=True)
    checkpoints.close()
    return tmp_path


def test_damaged_best_falls_back_to_the_newest_periodic_checkpoint_with_a_warning(tmp_path):
    from cbam_jax.training.checkpoint import restore_variables

    workdir = _workdir_with_best_and_latest(tmp_path)
    assert restore_variables(workdir)[1] == {"step": 8}
    _damage(workdir / "best" / "8")
    with pytest.warns(UserWarning, match=r"best/8 is damaged .*using .*checkpoints/4 instead"):
        variables, meta = restore_variables(workdir)
    assert meta == {"step": 4} and variables["batch_stats"]["bn"]["var"].tolist() == [1.0, 1.0]
    assert restore_variables(workdir, step=4)[1] == {"step": 4}


@pytest.mark.slow  # the eval CLI over real checkpoints
def test_eval_of_a_workdir_whose_checkpoints_are_all_damaged_is_one_line_naming_the_file(tmp_path):
    workdir = _workdir_with_best_and_latest(tmp_path)
    _damage(workdir / "best" / "8")
    _damage(workdir / "checkpoints" / "4")
    done = subprocess.run([sys.executable, "-m", "cbam_jax.cli", "eval", "--workdir", str(workdir)],
                          capture_output=True, text=True, env=_environment(), cwd=tmp_path, timeout=300)
    assert_one_line_error(done, f"Checkpoint {workdir}/best/8 cannot be read", "--step")
    done = subprocess.run([sys.executable, "-m", "cbam_jax.cli", "eval", "--workdir", str(workdir), "--step", "5"],
                          capture_output=True, text=True, env=_environment(), cwd=tmp_path, timeout=300)
    assert_one_line_error(done, "--step 5: no such checkpoint", "saved steps: 4")


# --- Entry points: what the system refuses is one line; a bug keeps its traceback ----------------

@pytest.mark.parametrize("raised, expected", [
    (OSError(28, "No space left on device", "/data/out.safetensors"), "/data/out.safetensors: No space left on device"),
    (NotADirectoryError(20, "Not a directory", "/cache/file/downloads"), "/cache/file/downloads: Not a directory"),
])
def test_cli_reports_what_the_system_refuses_in_one_line(monkeypatch, capsys, raised, expected):
    from cbam_jax import cli
    from cbam_jax.zoo import __name__ as zoo_module

    def refuse(args):
        raise raised

    monkeypatch.setattr(sys.modules[zoo_module], "run", refuse)
    assert cli.main(["list-pretrained"]) == 1
    assert capsys.readouterr().err == f"cbam-jax list-pretrained: error: {expected}\n"


def test_cli_keeps_the_traceback_of_a_bug(monkeypatch):
    from cbam_jax import cli
    from cbam_jax.zoo import __name__ as zoo_module

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(sys.modules[zoo_module], "run", bug)
    with pytest.raises(KeyError):
        cli.main(["list-pretrained"])


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_prints_under_a_strict_utf8_terminal(tmp_path):
    import numpy as np
    from PIL import Image

    from cbam_jax.pretrained import save_pretrained
    from cbam_jax.resnet import ResNet
    from tests.helpers import random_variables

    model = ResNet(stage_sizes=(1,), block="basic", width=8, stem="cifar", num_classes=2, attention="cbam",
                   attention_options={"reduction": 4})
    save_pretrained(tmp_path / "model", model, random_variables(model, (1, 16, 16, 3)), metadata={
        "preprocessing": {"resize": 16, "crop": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "channels": 3}})
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / name)
    done = subprocess.run([sys.executable, "-m", "cbam_jax.cli", "predict", "--pretrained", "model", name],
                          capture_output=True, env=_environment(PYTHONIOENCODING="utf-8:strict"), cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.startswith(b"caf\xe9.png\n")  # the name as its bytes


# --- Data that disagrees with itself --------------------------------------------------------------

def _image_folders(root: Path, splits: dict[str, list[str]]) -> None:
    import numpy as np
    from PIL import Image

    for split, classes in splits.items():
        for index, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), 10 * index, np.uint8)).save(root / split / name / f"{index}.png")


def _folder_dataset(root: Path, num_classes: int = 3):
    from cbam_jax.training.config import base_config

    dataset = base_config().dataset
    dataset.source, dataset.data_dir, dataset.num_classes = "folder", str(root), num_classes
    dataset.train_split, dataset.eval_split = "train", "val"
    return dataset


def test_a_split_missing_a_class_keeps_the_labels_of_the_others(tmp_path):
    from cbam_jax.data import make_source

    _image_folders(tmp_path, {"train": ["cat", "dog", "fox"], "val": ["cat", "fox"]})
    with pytest.warns(UserWarning, match=r"lacks 1 of the 3 classes of the training split \(dog\)"):
        val = make_source(_folder_dataset(tmp_path), "val")
    assert val.classes == ["cat", "dog", "fox"]
    assert [(Path(path).parent.name, label) for path, label in val.files] == [("cat", 0), ("fox", 2)]


def test_a_split_with_an_unknown_class_is_refused(tmp_path):
    from cbam_jax.data import make_source
    from cbam_jax.errors import InvalidInput

    _image_folders(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog", "emu"]})
    with pytest.raises(InvalidInput, match=r"class folders the training split lacks \(emu\)"):
        make_source(_folder_dataset(tmp_path), "val")


def test_one_folder_level_too_many_and_far_fewer_classes_are_said(tmp_path):
    from cbam_jax.data import make_source
    from cbam_jax.data.pipeline import check_source
    from cbam_jax.errors import InvalidInput

    _image_folders(tmp_path / "deep", {"train": ["images"]})
    dataset = _folder_dataset(tmp_path / "deep")
    with pytest.raises(InvalidInput, match="single class folder .*one folder level too many"):
        check_source(make_source(dataset, "train"), dataset, "train")
    _image_folders(tmp_path / "few", {"train": ["cat", "dog"]})
    dataset = _folder_dataset(tmp_path / "few", num_classes=10)
    with pytest.warns(UserWarning, match="2 class folders, far fewer than config.dataset.num_classes = 10"):
        check_source(make_source(dataset, "train"), dataset, "train")


@pytest.mark.parametrize("value, expected", [(200, 1), (65535, 255), (32896, 128)])
def test_sixteen_bit_png_is_scaled_by_its_bit_depth_not_its_values(tmp_path, value, expected):
    import numpy as np
    from PIL import Image

    from cbam_jax.images import load_image

    Image.fromarray(np.full((4, 4), value, np.uint16)).save(tmp_path / "deep.png")
    assert np.unique(load_image(tmp_path / "deep.png")).tolist() == [expected]


# --- The README's commands as typed: relative folders --------------------------------------------

def test_a_workdir_given_as_a_relative_path_is_read(tmp_path, monkeypatch):
    from cbam_jax.training.checkpoint import restore_variables

    _workdir_with_best_and_latest(tmp_path / "runs" / "digits")
    monkeypatch.chdir(tmp_path)
    assert restore_variables("runs/digits")[1] == {"step": 8}
    assert restore_variables("runs/digits", "latest")[1] == {"step": 4}


@pytest.mark.slow
@pytest.mark.parametrize("command, expected", [
    (["predict", "--pretrained", "backbone", "image.png"], "features_only backbone"),
    (["attention", "--pretrained", "backbone", "--out", "figures", "image.png"], "features_only backbone"),
    (["export", "backbone", "exported"], "features_only backbone"),
])
def test_a_features_only_model_given_to_a_classifier_command_says_why_not(tmp_path, command, expected):
    import numpy as np
    from PIL import Image

    from cbam_jax.pretrained import save_pretrained
    from cbam_jax.resnet import ResNet
    from tests.helpers import random_variables

    model = ResNet(stage_sizes=(1, 1), block="basic", width=8, stem="cifar", num_classes=3, attention="cbam",
                   attention_options={"reduction": 4}, features_only=True)
    save_pretrained(tmp_path / "backbone", model, random_variables(model), metadata={
        "preprocessing": {"resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "channels": 3}})
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "image.png")
    before = sorted(os.listdir(tmp_path))
    done = subprocess.run([sys.executable, "-m", "cbam_jax.cli", *command], capture_output=True, text=True,
                          env=_environment(), cwd=tmp_path, timeout=300)
    assert_one_line_error(done, expected, "full model")
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


@pytest.mark.slow
def test_train_resumes_exactly_from_the_newest_intact_step_when_the_latest_is_damaged(tmp_path, xla_cache):
    from tests.test_train import assert_same_state, final_state

    workdir = tmp_path / "run"
    assert _train(workdir, cache=xla_cache).returncode == 0
    straight = final_state(workdir)[1]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]
    _damage(workdir / "checkpoints" / "8")
    resumed = _train(workdir, cache=xla_cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    warning = [line for line in resumed.stderr.splitlines() if "is damaged" in line]
    assert len(warning) == 1 and "step 8" in warning[0] and "resuming from step 4" in warning[0], resumed.stderr
    assert (workdir / "damaged" / "checkpoints" / "8").is_dir()
    assert_same_state(final_state(workdir)[1], straight)  # steps 5..8 trained again, to the same bits


def test_a_cache_root_that_is_a_file_is_one_line_naming_it(tmp_path):
    """22.8: `$CBAM_JAX_CACHE` pointing at a file, with a registered name: the cache root is named, not a
    misleading "no model in this directory"."""
    import numpy as np
    from PIL import Image

    (tmp_path / "cache").write_text("not a folder")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "image.png")
    done = subprocess.run([sys.executable, "-m", "cbam_jax.cli", "predict", "--pretrained", "resnet18", "image.png"],
                          capture_output=True, text=True, env=_environment(CBAM_JAX_CACHE=str(tmp_path / "cache")),
                          cwd=tmp_path, timeout=300)
    line = assert_one_line_error(done, "resnet18", "cache root", "CBAM_JAX_CACHE")
    assert "directory written by" not in line
