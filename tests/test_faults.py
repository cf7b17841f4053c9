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
@pytest.mark.parametrize("how, restarts", [("file", True), ("module", True), ("-c", True), ("stdin -", False),
                                           ("stdin", False), ("/dev/stdin", False), ("interactive", False)])
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
