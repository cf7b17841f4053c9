"""`make mutants`: mutation testing (mutmut 3) of the modules that carry the project's core claims.

Each target mutates one module (or the named functions in it) and runs each mutant only against the
tests that cover it (mutmut maps tests to functions on a first clean run), in its own scratch copy
of the repository under build/mutants/TARGET: mutmut works in a `mutants/` folder next to its
config, so targets cannot share one. Workers fork from a server that has imported jax, flax and
other libraries (PRELOAD) but run nothing: a process forked after XLA started its threads can hang.

mutmut mutates code inside functions, not module-level data, so the ONNX translator's elementwise
table (primitive -> ONNX op) gets its own mutants here: every entry replaced by every other op of
the table, each run against the table's test.

The counts and every surviving mutant (with its diff) go to build/mutants/TARGET.txt, and the
latest section of every target run so far to docs/mutation-report.txt.

    python tools/mutants.py                           # the targets in DEFAULT, one after the other
    python tools/mutants.py checksum loss-scaling     # some targets (see TARGETS)
    python tools/mutants.py --rerun-survivors loss-scaling   # after adding tests: only the survivors
"""

import argparse
import collections
import fnmatch
import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutants"
REPORT = ROOT / "docs" / "mutation-report.txt"
LAYER_TESTS = ["tests/test_layers.py", "tests/test_layer_options.py"]

# name -> (module, mutant-name patterns (None: every function), the tests that cover it)
TARGETS = {
    "checksum": ("cbam_jax/zoo.py", ["cbam_jax.zoo.x__check__mutmut_*", "cbam_jax.zoo.x__digest__mutmut_*",
                                     "cbam_jax.zoo.x__verify_download__mutmut_*"],
                 [f"tests/test_zoo.py::{test}" for test in (
                     "test_download_verify_convert_cache_then_offline", "test_wrong_checksum",
                     "test_kept_bytes_that_fail_the_checksum_are_downloaded_again",
                     "test_wrong_file_by_hand_is_refused_and_kept", "test_a_file_of_another_model_is_refused",
                     "test_prefix_checksums_right_and_wrong", "test_a_zipped_torch_file_with_a_wrong_sha1_is_refused",
                     "test_the_right_pth_put_by_hand_is_accepted_and_a_wrong_one_refused")]),
    "loss-scaling": ("cbam_jax/training/step.py", ["cbam_jax.training.step.x_train_step__mutmut_*",
                                                   "cbam_jax.training.step.x__apply_loss_scaling__mutmut_*"],
                     ["tests/test_train_step.py"]),
    "onnx-elementwise": ("cbam_jax/artifacts/onnx_graph.py", ["cbam_jax.artifacts.onnx_graph.x__elementwise__mutmut_*"],
                         ["tests/test_artifacts.py"]),
    "layouts": ("cbam_jax/convert/layout.py", None, ["tests/test_convert.py", "tests/test_convert_numpy.py"]),
    "channel_gate": ("cbam_jax/layers/channel_gate.py", None, LAYER_TESTS),
    "spatial_gate": ("cbam_jax/layers/spatial_gate.py", None, LAYER_TESTS),
    "cbam": ("cbam_jax/layers/cbam.py", None, LAYER_TESTS),
    "se": ("cbam_jax/layers/se.py", None, LAYER_TESTS),
    "bam": ("cbam_jax/layers/bam.py", None, LAYER_TESTS),
}
DEFAULT = ["checksum", "loss-scaling", "onnx-elementwise"]
# What the tests read besides the package (copied next to it and into mutmut's mutants/).
COPIED = ["tests", "configs", "docs", "README.md", "train.py"]
# Imported once by the fork server (importing starts no XLA thread; ~10 s per mutant saved).
# Not cbam_jax: the workers must import the mutated copy in mutants/, not the original.
PRELOAD = ["numpy", "jax", "jax.numpy", "flax.linen", "optax", "pytest", "scipy", "PIL", "onnx", "onnxruntime"]


def _setup_cfg(module: str, tests: list[str]) -> str:
    return "\n".join([
        "[mutmut]", "source_paths = cbam_jax", f"only_mutate = {module}",
        "pytest_add_cli_args = -p no:cacheprovider -q",
        "pytest_add_cli_args_test_selection =", *[f"    {t}" for t in tests],
        "also_copy =", *[f"    {name}" for name in COPIED],
        "process_isolation = forkserver", "forkserver_warmup = import",
        "preload_modules_file = preload.txt",
        "timeout_multiplier = 30", ""])


def _copy_repository(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in ("cbam_jax", "pyproject.toml", *COPIED):  # pyproject: pytest's settings (no [tool.mutmut])
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, work / name)


def run_target(name: str, rerun_survivors: bool = False, budget: float | None = None) -> str:
    """Mutate and test one target; with `rerun_survivors`, re-test only the mutants that survived or
    were not checked in the last run of this target (its scratch copy kept) against the current tests.
    After `budget` seconds mutmut is stopped; the mutants it did not reach stay 'not checked'."""
    module, patterns, tests = TARGETS[name]
    work = WORK / name
    environment = {**os.environ, "PYTHONPATH": str(work)}
    if rerun_survivors:
        previous = _statuses(work, patterns, environment)
        selection = [m for m, status in previous.items() if status in ("survived", "not checked")]
        for folder in (work, work / "mutants"):  # the current tests, in the copy and in mutmut's mutants/
            shutil.rmtree(folder / "tests")
            shutil.copytree(ROOT / "tests", folder / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    else:
        _copy_repository(work)
        (work / "setup.cfg").write_text(_setup_cfg(module, tests))
        (work / "preload.txt").write_text("\n".join(PRELOAD) + "\n")
        selection = patterns or []
    started = time.time()
    run = subprocess.CompletedProcess([], 0, "", "")  # nothing to re-run
    if selection or not rerun_survivors:
        run = _run_within(budget, [sys.executable, "-m", "mutmut", "run", "--max-children", "1", *selection],
                          cwd=work, env=environment)
    seconds = time.time() - started
    statuses = _statuses(work, patterns, environment)
    counts = collections.Counter(statuses.values())
    timing = f"re-ran the {len(selection)} survivors of the last run in {seconds:.0f} s" if rerun_survivors \
        else f"{seconds:.0f} s"
    lines = [f"== {name}: {module} ({', '.join(patterns) if patterns else 'every function'})",
             f"   tests: {' '.join(tests)}; {timing}; mutmut exit code {run.returncode}",
             f"   mutants: {len(statuses)}; " + ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))]
    if run.returncode != 0:
        lines.append("   mutmut's output (tail):\n" + _indent(run.stdout[-1500:] + run.stderr[-1500:]))
    for mutant, status in statuses.items():
        if status not in ("killed", "timeout", "not checked"):
            diff = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], cwd=work, capture_output=True,
                                  text=True, env=environment).stdout
            lines.append(f"   {status}: {mutant}\n{_indent(_diff_body(diff))}")
    return "\n".join(lines) + "\n"


def _run_within(budget: float | None, command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`command`'s output, its whole process group stopped after `budget` seconds (exit code -9 then)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr += f"\nstopped after the budget of {budget:.0f} s"
        return subprocess.CompletedProcess(command, -9, stdout, stderr)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _statuses(work: Path, patterns: list[str] | None, environment: dict) -> dict[str, str]:
    """{mutant name: status} from `mutmut results` in `work`, for the mutants `patterns` selects."""
    listing = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                             capture_output=True, text=True, env=environment).stdout
    statuses = {}
    for line in listing.splitlines():
        mutant, _, status = line.strip().rpartition(": ")
        if mutant and (not patterns or any(fnmatch.fnmatch(mutant, p) for p in patterns)):
            statuses[mutant] = status
    return statuses


def _diff_body(diff: str) -> str:
    return "\n".join(line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("---", "+++")))


def _indent(text: str) -> str:
    return "\n".join("      " + line for line in text.strip().splitlines())


TABLE_SCRIPT = """
import collections, sys
from cbam_jax.artifacts import onnx_graph
from tests import test_artifacts
table, handlers = dict(onnx_graph._ELEMENTWISE), onnx_graph._HANDLERS
ops = list(dict.fromkeys(table.values()))
survivors, counts = [], collections.Counter()
for primitive in test_artifacts.ELEMENTWISE_CASES:
    for op in ops:
        if op == table[primitive]:
            continue
        handlers[primitive] = onnx_graph._elementwise(op)
        try:
            test_artifacts.test_elementwise_table_entry_computes_its_primitive(primitive)
            status = "survived"
        except Exception:
            status = "killed"
        finally:
            handlers[primitive] = onnx_graph._elementwise(table[primitive])
        counts[status] += 1
        if status == "survived":
            survivors.append(f"{primitive}: {table[primitive]} -> {op}")
print(f"   mutants: {sum(counts.values())}; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
for line in survivors:
    print(f"   survived: {line}")
"""


def run_table() -> str:
    """Every entry of onnx_graph._ELEMENTWISE replaced by every other ONNX op of the table, one at a time,
    against test_artifacts.test_elementwise_table_entry_computes_its_primitive."""
    started = time.time()
    run = subprocess.run([sys.executable, "-c", TABLE_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    head = (f"== onnx-table: cbam_jax/artifacts/onnx_graph.py _ELEMENTWISE (each entry -> each other op)\n"
            f"   tests: tests/test_artifacts.py::test_elementwise_table_entry_computes_its_primitive; "
            f"{time.time() - started:.0f} s; exit code {run.returncode}\n")
    return head + (run.stdout if run.returncode == 0 else _indent(run.stdout[-1500:] + run.stderr[-1500:]) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=f"from {', '.join([*TARGETS, 'onnx-table'])} (default: "
                        f"{', '.join([*DEFAULT, 'onnx-table'])})")
    parser.add_argument("--report", type=Path, default=REPORT, help="where to write the summary")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="after adding tests: re-test only the last run's surviving (or unchecked) mutants")
    parser.add_argument("--budget", type=float, help="seconds per target; mutants not reached stay 'not checked'")
    args = parser.parse_args()
    names = args.targets or [*DEFAULT, "onnx-table"]
    unknown = [n for n in names if n not in TARGETS and n != "onnx-table"]
    if unknown:
        parser.error(f"unknown target(s) {unknown}")
    for name in names:
        section = run_table() if name == "onnx-table" else run_target(name, args.rerun_survivors, args.budget)
        print(section, flush=True)
        (WORK / f"{name}.txt").write_text(section)
    # The report holds the latest section of every target run so far (targets can run separately).
    order = [*TARGETS, "onnx-table"]
    sections = [(WORK / f"{n}.txt").read_text() for n in order if (WORK / f"{n}.txt").exists()]
    header = (f"mutation testing: tools/mutants.py (mutmut {importlib.metadata.version('mutmut')})\n"
              "statuses: killed = a test failed; timeout = the mutant ran past its limit (an endless loop counts "
              "as caught); survived = every covering test passed; no tests = no selected test runs the function\n\n")
    args.report.write_text(header + "\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
