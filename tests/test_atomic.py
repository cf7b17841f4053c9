"""atomic_output: outputs appear whole or not at all, with the user's umask, and a killed write's
leftovers are cleaned up by the next write to the same place."""

import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from cbam_jax.atomic import atomic_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def umask():
    """Set a umask for the test (restored afterwards)."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def hidden(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


def dead_pid() -> int:
    """The pid of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_created_files_and_folders_keep_the_umask(tmp_path, umask, mask):
    umask(mask)
    with atomic_output(tmp_path / "new" / "deeper" / "file.txt") as temporary:
        temporary.write_text("content")
    with atomic_output(tmp_path / "folder", folder=True) as temporary:
        (temporary / "inside.txt").write_text("content")
        (temporary / "sub").mkdir()
    assert (tmp_path / "new" / "deeper" / "file.txt").read_text() == "content"
    assert mode(tmp_path / "new" / "deeper" / "file.txt") == 0o666 & ~mask
    for folder in (tmp_path / "new", tmp_path / "new" / "deeper", tmp_path / "folder", tmp_path / "folder" / "sub"):
        assert mode(folder) == 0o777 & ~mask, folder
    assert mode(tmp_path / "folder" / "inside.txt") == 0o666 & ~mask


def test_saved_pretrained_directory_keeps_the_umask(tmp_path, umask):
    import jax
    import jax.numpy as jnp

    from cbam_jax import create_model
    from cbam_jax.pretrained import save_pretrained

    umask(0o027)
    model = create_model("resnet18", num_classes=2, stem="cifar", width=4)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    variables = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), variables)
    path = save_pretrained(tmp_path / "new" / "model", model, variables)
    assert mode(tmp_path / "new") == mode(path) == 0o750
    for root, folders, files in os.walk(path):
        assert all(mode(os.path.join(root, name)) == 0o750 for name in folders)
        assert all(mode(os.path.join(root, name)) == 0o640 for name in files)
    assert (path / "config.json").is_file()


def test_nothing_partial_is_visible_and_a_failed_write_leaves_things_as_they_were(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as temporary:
            temporary.write_text("half")
            assert not target.exists()  # not under the final name while being written
            raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []  # neither the temporary nor the parent folders it made

    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target, replace=True) as temporary:
            temporary.write_text("new, half")
            assert target.read_text() == "old"
            raise KeyboardInterrupt
    assert target.read_text() == "old" and hidden(tmp_path) == []
    with atomic_output(target, replace=True) as temporary:
        temporary.write_text("new")
    assert target.read_text() == "new" and hidden(tmp_path) == []


def test_folders_are_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_output(target, folder=True) as temporary:
        (temporary / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_output(target, folder=True):
            pass
    with pytest.raises(ValueError):
        with atomic_output(target, folder=True, replace=True) as temporary:
            (temporary / "new.txt").write_text("new")
            assert sorted(os.listdir(target)) == ["old.txt"]
            raise ValueError("writer failed")
    assert sorted(os.listdir(target)) == ["old.txt"] and hidden(tmp_path) == []
    with atomic_output(target, folder=True, replace=True) as temporary:
        (temporary / "new.txt").write_text("new")
    assert sorted(os.listdir(target)) == ["new.txt"] and hidden(tmp_path) == []


def test_existing_output_is_kept_unless_replace(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_output(target):
            pass
    with pytest.raises(FileExistsError, match="already exists"):  # appeared while writing
        with atomic_output(tmp_path / "late.txt") as temporary:
            temporary.write_text("new")
            (tmp_path / "late.txt").write_text("someone else's")
    assert target.read_text() == "mine" and (tmp_path / "late.txt").read_text() == "someone else's"
    assert hidden(tmp_path) == []


KILLED_WRITER = textwrap.dedent("""
    import importlib.util, os, signal, sys
    spec = importlib.util.spec_from_file_location("atomic", os.path.join(sys.argv[1], "cbam_jax", "atomic.py"))
    atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atomic)
    with atomic.atomic_output(sys.argv[2], folder=sys.argv[3] == "folder", replace=True) as temporary:
        if sys.argv[3] == "folder":
            (temporary / "half.txt").write_text("half")
        else:
            temporary.write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("kind", ["file", pytest.param("folder", marks=pytest.mark.slow)])  # a subprocess each
def test_next_write_removes_the_leftovers_of_a_killed_write(tmp_path, kind):
    target = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, ROOT, str(target), kind])
    assert killed.returncode == -signal.SIGKILL
    leftovers = hidden(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.partial-") and not target.exists()
    # A live writer's temporary (here: this process's) and other names' leftovers are not touched.
    alive = tmp_path / f".out.partial-{os.getppid()}-0a1b"
    alive.write_text("in progress")
    (tmp_path / f".other.partial-{dead_pid()}-0a1b").write_text("not ours")
    with atomic_output(target, folder=kind == "folder") as temporary:
        assert leftovers[0] not in hidden(tmp_path)  # cleaned before the new write starts
        if kind == "folder":
            (temporary / "whole.txt").write_text("whole")
        else:
            temporary.write_text("whole")
    remaining = hidden(tmp_path)
    assert leftovers[0] not in remaining
    assert alive.name in remaining and any(name.startswith(".other.partial-") for name in remaining)
    assert (target / "whole.txt" if kind == "folder" else target).read_text() == "whole"


def test_a_folder_moved_aside_by_a_killed_replacement_is_put_back(tmp_path):
    target = tmp_path / "model"
    retired = tmp_path / f".model.replaced-{dead_pid()}-0a1b"  # killed between its two renames
    retired.mkdir()
    (retired / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_output(target, folder=True, replace=True):
            assert (target / "old.txt").read_text() == "old"  # back before anything else happens
            raise ValueError("writer failed")
    assert (target / "old.txt").read_text() == "old" and hidden(tmp_path) == []


def test_an_interruption_between_the_two_renames_keeps_the_old_folder(tmp_path, monkeypatch):
    import cbam_jax.atomic

    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")

    def interrupted(source, destination):  # the old folder is already aside when the new one would move in
        raise KeyboardInterrupt

    monkeypatch.setattr(cbam_jax.atomic.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target, folder=True, replace=True) as temporary:
            (temporary / "new.txt").write_text("new")
    assert sorted(os.listdir(target)) == ["old.txt"] and hidden(tmp_path) == []
