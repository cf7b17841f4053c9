"""Outputs that appear complete or not at all: `atomic_output(path)`, the one way cbam-jax writes a
file or a folder (attention figures, `convert --to-torch` files, pretrained directories, the
export at the end of training).

    with atomic_output(out / "cat_attention.png", replace=True) as temporary:
        figure.save(temporary, format="PNG")

The caller writes to a hidden temporary name beside `path` (`.NAME.partial-PID-TOKEN`, in the same
folder so that the final rename is atomic); when the block ends it is renamed to `path`, and on any
error (KeyboardInterrupt included) it is removed. What this guarantees:

- Nothing partial is ever visible under `path`: readers see the old output or the new one whole.
- Created files and folders get the user's umask, as `open()` and `mkdir()` give them (0o666 and
  0o777 minus the umask), not tempfile's private 0o600 / 0o700. The helper never creates the file
  itself: the writer's own `open()` does.
- A failed write leaves the file system as it was: the temporary is removed, and so are the
  parent folders this call created.
- A write that was killed (SIGKILL, power loss) leaves its temporary behind; the next write to the
  same `path` removes it once its process is gone. A folder replacement killed between its two
  renames leaves the old output under `.NAME.replaced-PID-TOKEN`; the next write puts it back first.
- A write that fails for a reason of the file system (no permission, a file where a folder should
  be, a full disk) raises `cbam_jax.errors.OutputError` (an OSError) naming `path` and the reason.
  `check_destination(path)` finds the common ones before any work is done.
"""

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from cbam_jax.errors import OutputError

PARTIAL = "partial"  # a write in progress (or killed)
REPLACED = "replaced"  # an old folder moved aside while the new one is renamed into place


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, folder: bool = False, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path` at; rename it to `path` when the block succeeds.

    Args:
      path: the file or folder to create. Missing parent folders are created (and removed again
        if the write fails).
      folder: True: the temporary is an empty folder (created) to fill; False: a file name, not
        created, for the writer to open.
      replace: True: an existing `path` is replaced (files with one `os.replace`; folders by two
        renames, the old one deleted afterwards). False: an existing `path` is a FileExistsError.

    Raises:
      OutputError: `path` exists and `replace` is False (checked before and after writing; also a
        FileExistsError), or the file system refused a write (no permission, not a folder, full).
    """
    path = Path(path).absolute()
    try:
        created_parents = make_parents(path.parent)
    except OSError as error:
        raise _output_error(path, error) from error
    temporary = retired = None
    try:
        _clean_leftovers(path)
        if _present(path) and not replace:
            raise OutputExists(f"{path} already exists; choose a new name or remove it first.")
        temporary = _hidden_name(path, PARTIAL)
        if folder:
            temporary.mkdir()
        yield temporary
        _sync(temporary)
        if _present(path) and not replace:
            raise OutputExists(f"{path} already exists; choose a new name or remove it first.")
        if folder and _present(path):
            retired = _hidden_name(path, REPLACED)
            os.rename(path, retired)
        os.replace(temporary, path)
    except BaseException as error:
        if retired is not None and retired.exists() and not _present(path):
            os.rename(retired, path)  # interrupted between the two renames: the old output stays
        if temporary is not None:
            _remove(temporary)
        for parent in reversed(created_parents):
            with contextlib.suppress(OSError):
                parent.rmdir()
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            raise _output_error(path, error) from error
        raise
    finally:
        if retired is not None and _present(path):
            _remove(retired)


class OutputExists(OutputError, FileExistsError):
    """The output is there already and may not be replaced."""


def check_destination(path: str | os.PathLike, *, replace: bool = False, option: str | None = None) -> None:
    """Fail before any work when `path` cannot be created: it exists (unless `replace`), a parent is a
    file, or the nearest existing folder is not writable. Creates nothing.

    `option` (e.g. '--out') is named in the message. Raises OutputError.
    """
    path = Path(path).absolute()
    name = f"{option} {path}" if option else str(path)
    if _present(path) and not replace:
        raise OutputExists(f"{name} already exists; choose a new name or remove it first.")
    folder = path.parent
    while not folder.exists() and not folder.is_symlink():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{name}: {folder} is a file, not a folder; choose another place.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{name}: no permission to write in {folder}; choose another place.")


def _output_error(path: Path, error: OSError) -> OutputError:
    reason = error.strerror or str(error)
    where = f" ({error.filename})" if error.filename and str(error.filename) != str(path) else ""
    return OutputError(f"cannot write {path}: {reason}{where}.")


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _hidden_name(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder` (umask modes); the folders this call created, outermost first: what the
    caller may remove again. A folder made meanwhile by another process or thread is not counted.

    Raises FileNotFoundError when another process removes a parent between two of its steps
    (its cleanup after a write): a caller racing such cleanups calls it again."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    created = []
    try:
        for parent in reversed(missing):
            try:
                parent.mkdir()
            except FileExistsError:  # made meanwhile by someone else: not ours to remove
                continue
            created.append(parent)
    except BaseException:
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    return created


def _clean_leftovers(path: Path) -> None:
    """Remove the temporaries of killed writes to `path`; put back an old folder that a killed
    replacement had moved aside (when nothing took its place)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.({PARTIAL}|{REPLACED})-(\d+)-[0-9a-f]+$")
    try:
        names = sorted(os.listdir(path.parent))
    except FileNotFoundError:
        return
    for name in names:
        match = pattern.match(name)
        if not match or _process_alive(int(match[2])):
            continue
        leftover = path.parent / name
        if match[1] == REPLACED and not _present(path):
            os.rename(leftover, path)
        else:
            _remove(leftover)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another write of this process (a thread) may be in progress
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:  # cannot tell (e.g. an invalid pid): keep it
        return True
    return True


def _sync(path: Path) -> None:
    """fsync the written file(s), so that a crash right after the rename cannot leave empty files."""
    files = [path] if path.is_file() else [Path(root, name) for root, _, names in os.walk(path) for name in names]
    for file in files:
        if file.is_file() and not file.is_symlink():
            with open(file, "rb") as stream:
                os.fsync(stream.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
