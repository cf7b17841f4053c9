"""User mistakes: `UserError`, and how every entry point reports one.

A mistake in what the user gave (a missing or unreadable file, a bad option or config value, data
that does not fit the config, a workdir of another run) is raised as a `UserError` whose message
names the input and the fix. The entry points (`train.py`, every `cbam-jax` subcommand, `python -m
benchmarks.ablation`) catch it in one place and print it with `report`: one line on stderr, exit
code `exit_code` (1, or 2 for a wrong command line). Any other exception is a bug and keeps its
traceback.

Library functions raise the subclasses that are also the builtin type their callers expect
(`InvalidInput` is a ValueError, `MissingInput` a FileNotFoundError), so `except ValueError` around
`load_pretrained` or `validate` keeps working.
"""

import importlib
import importlib.util
import sys


class UserError(Exception):
    """A user mistake; the message names the input and how to fix it. `exit_code`: 1 unless told."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(UserError):
    """A wrong command line: an unknown option, a missing argument, an option value out of range."""

    exit_code = 2


class InvalidInput(UserError, ValueError):
    """A value (option, config field, file content, data) that cannot be used."""


class MissingInput(UserError, FileNotFoundError):
    """A file or directory the command needs does not exist."""


class MissingDependency(UserError, ImportError):
    """An optional package the command needs is not installed; the message gives the pip command."""


class OutputError(UserError, OSError):
    """An output that cannot be written where asked (exists already, under a file, no permission, disk full)."""


def one_line(message: object) -> str:
    """The message with its lines joined by '; ' (library messages sometimes span lines)."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return "; ".join(lines)


def report(program: str, error: BaseException, exit_code: int | None = None) -> int:
    """Print `program: error: MESSAGE` as one line on stderr; returns the exit code to end with."""
    print(f"{program}: error: {one_line(error) or type(error).__name__}", file=sys.stderr, flush=True)
    if exit_code is not None:
        return exit_code
    return getattr(error, "exit_code", 1)


class ExportError(InvalidInput):
    """A model, size or format that cannot be exported; the message says why and what to do."""


class MissingExtra(MissingDependency):
    """A module of one of cbam-jax's extras is not installed; the message names the extra to install."""


def require(module: str, extra: str):
    """Import `module` (an optional dependency of the extra `extra`) or raise `MissingExtra` in one line.

    Used at the lazy import points of the application and the optional formats, so that a library
    installed without an extra says `pip install 'cbam-jax[EXTRA]'` instead of an ImportError traceback.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = getattr(error, "name", None) or module
        what = module if missing.split(".")[0] == module.split(".")[0] else f"{missing} (needed by {module})"
        raise MissingExtra(f"{what} is not installed: pip install 'cbam-jax[{extra}]'") from None


# The import names of each extra's packages (pyproject.toml's optional dependencies) that cbam-jax imports.
EXTRA_MODULES = {
    "train": ("ml_collections", "grain", "tensorflow_datasets", "sklearn", "tensorboardX", "tqdm", "absl",
              "flatbuffers"),
    "torch": ("torch", "tqdm"),
    "onnx": ("onnx", "onnxruntime"),
    "export": ("flatbuffers", "onnx", "onnxruntime"),
    "hub": ("huggingface_hub",),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or a module blocked with sys.modules[name] = None
        return False


def check_extra(extra: str) -> None:
    """Raise `MissingExtra` (one line) unless every package of `extra` is installed; imports nothing."""
    missing = [module for module in EXTRA_MODULES[extra] if not _installed(module)]
    if missing:
        raise MissingExtra(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
                           f"pip install 'cbam-jax[{extra}]'")


def describe_os_error(error: OSError) -> str:
    """An OSError as the entry points print it: the file(s) it names first, then the system's reason
    ('/data/out: No space left on device'), instead of Python's '[Errno 28] ...' form."""
    names = [str(name) for name in (error.filename, error.filename2) if name is not None]
    reason = error.strerror or str(error)
    return f"{' -> '.join(names)}: {reason}" if names else reason
