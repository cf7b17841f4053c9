"""Transparent huge pages for XLA:CPU's scratch memory, so that a CPU step does not page-fault 4 KiB at a time.

XLA:CPU mallocs a step's temporaries (1.7 GB for a CBAM-ResNet-50 batch-8 training step, 6.6 GB at
batch 32) on its worker threads and frees them when the step ends. glibc serves blocks that large
with mmap and unmaps them on free, so every step faults its whole scratch space in again, 4 KiB
at a time: on a 2-core Sapphire Rapids, jax 0.12, CBAM-ResNet-50 b8 took 438,000 minor page
faults and 0.69 s of kernel time per 1.64 s step (b32: 1.7 million faults, 3.5 s of 6.6 s).

glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35+) makes malloc ask for transparent huge pages
(`madvise(MADV_HUGEPAGE)`) on the memory it maps, so the same memory arrives in 2 MiB pages:
1,250 faults and 0.25 s of kernel time, 1.38 s per b8 step; b32 5.27 s; resident memory
unchanged (measured). Tunables are read when a process starts, so `use_huge_pages` restarts the
running program (`os.execve`, same interpreter, arguments and environment plus the tunable) before
it has done anything; `train.py` and `cbam-jax eval` do that first thing.

Tried and rejected: keeping the freed memory mapped with `mallopt` (one arena, no mmap, no
trimming) removed the faults at batch 8 (1.31 s) but fragmented the heap: resident memory 4.3 GB
instead of 2.7 GB at b8, 20.9 GB instead of 7.7 GB at b32, and a b64 step killed for memory.
"""

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
DISABLE_VARIABLE = "CBAM_JAX_HUGE_PAGES"  # "0": never restart for huge pages
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def jax_runs_on_cpu() -> bool:
    """Whether JAX's default backend in this process will be the CPU, decided without importing JAX.

    `JAX_PLATFORMS` decides when set; otherwise the CPU unless an accelerator plugin (CUDA, ROCm,
    TPU) is installed.
    """
    import importlib.metadata
    import importlib.util

    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    return all(importlib.util.find_spec(name) is None
               for name in ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                            "jax_rocm7_plugin"))


def _glibc_version() -> tuple[int, int] | None:
    """glibc's (major, minor), or None for another C library or OS."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (ValueError, OSError, AttributeError):
        return None


def huge_pages_possible() -> bool:
    """Whether glibc has the tunable (2.35+) and the kernel gives transparent huge pages on request."""
    version = _glibc_version()
    if version is None or version < (2, 35):
        return False
    try:
        with open(_THP_SETTING) as f:
            setting = f.read()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def with_huge_pages(environ: dict[str, str]) -> dict[str, str]:
    """A copy of `environ` whose GLIBC_TUNABLES also holds `glibc.malloc.hugetlb=1` (other tunables kept)."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":")
                if t and not t.startswith("glibc.malloc.hugetlb=")]
    return {**environ, "GLIBC_TUNABLES": ":".join([*tunables, TUNABLE])}


def program_can_restart() -> bool:
    """Whether running `sys.orig_argv` again runs this same program from its start.

    True for a script file (`python train.py`), a module (`python -m pkg`) and `python -c CODE`;
    False for a script read from standard input (`python -`, `python < script.py`, `python /dev/stdin`:
    what the first run read is gone, so a restart would run nothing) and for an interactive
    interpreter (`python`, `python -i`: a restart would lose the session).
    """
    if sys.flags.interactive or sys.flags.inspect or hasattr(sys, "ps1"):
        return False
    program = sys.argv[0] if sys.argv else ""
    if program == "-c":
        return True
    if program in ("", "-"):
        return False
    # A regular file, not a pipe, terminal or /proc/self/fd/N alias that a restart cannot read again.
    real = os.path.realpath(program)
    return os.path.isfile(real) and not real.startswith(("/dev/", "/proc/"))


def restart_wanted() -> bool:
    """Whether `use_huge_pages` would restart this process now (see there for the conditions)."""
    if os.environ.get(DISABLE_VARIABLE, "1").strip() == "0":
        return False
    if not program_can_restart():
        return False
    if "glibc.malloc.hugetlb=" in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # set already (by us before the restart, or by the user)
    return huge_pages_possible() and jax_runs_on_cpu()


def use_huge_pages(argv: list[str] | None = None) -> None:
    """Restart this program with glibc's huge-page tunable set, where that helps; else return at once.

    Call it first thing in a program that trains or evaluates on the CPU, before it has read input
    or started threads: where it restarts, the call does not return (the program runs again from
    the top with the tunable set, and this time the call returns). No restart where the tunable is
    set already (or another `glibc.malloc.hugetlb` value is), where JAX will compute on an
    accelerator, outside Linux with glibc 2.35+, where the kernel's transparent huge pages are off,
    where the program cannot be run again as it started (read from standard input, or an
    interactive interpreter: `program_can_restart`), or with `CBAM_JAX_HUGE_PAGES=0`. `argv`: the command line to run again (default
    `sys.orig_argv`, the interpreter's own).
    """
    if not restart_wanted():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv if argv is None else argv), with_huge_pages(dict(os.environ)))
