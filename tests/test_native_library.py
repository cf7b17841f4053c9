"""The compiled native kernel library in the cache is loaded only if it is what was built.

Each case runs in a fresh interpreter (a bad library could crash it: a truncated one dies with a bus
error when loaded), with its own `$CBAM_JAX_CACHE`. The library is compiled once for the module.
"""

import ctypes.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cbam_jax.layers import native

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import warnings
warnings.simplefilter("always")
from cbam_jax.layers import native
print("AVAILABLE", native.available())
"""

pytestmark = pytest.mark.slow  # compiles the library (about 10-20 s on a CPU) three times


def probe(cache: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "CBAM_JAX_CACHE": str(cache), **env}
    environment.pop("CBAM_JAX_NATIVE", None)
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environment, timeout=600)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A cache holding a freshly built library and its digest record."""
    try:
        native._package_paths()
    except native.Unavailable as error:
        pytest.skip(f"oneDNN is not installed (the cpu extra): {error}")
    cache = tmp_path_factory.mktemp("cache")
    done = probe(cache)
    assert done.returncode == 0 and "AVAILABLE True" in done.stdout, done.stderr[-3000:]
    return cache


def libraries(cache: Path) -> list[Path]:
    return sorted((cache / "kernels").glob("native_ops-*.so"))


def fresh_copy(built: Path, tmp_path: Path) -> tuple[Path, Path]:
    cache = tmp_path / "cache"
    shutil.copytree(built, cache)
    (library,) = libraries(cache)
    assert native._verified(library)
    return cache, library


def warnings_of(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if "Warning" in line]


def test_a_truncated_library_is_rebuilt_not_loaded(built, tmp_path):
    cache, library = fresh_copy(built, tmp_path)
    library.write_bytes(library.read_bytes()[:4096])  # loading this one dies with a bus error
    done = probe(cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "AVAILABLE True" in done.stdout and "Traceback" not in done.stderr
    (line,) = warnings_of(done)
    assert f"{library} does not match the digest recorded when it was built" in line and "rebuilding" in line
    assert native._verified(library) and library.stat().st_size > 4096


def test_a_foreign_library_in_the_cache_is_rebuilt_not_loaded(built, tmp_path):
    cache, library = fresh_copy(built, tmp_path)
    foreign = ctypes.util.find_library("m") or "libm.so.6"
    located = next(Path(d) / foreign for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64")
                   if (Path(d) / foreign).exists())
    shutil.copyfile(located, library)  # a valid shared library, but not ours
    done = probe(cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "AVAILABLE True" in done.stdout and "Traceback" not in done.stderr
    assert any("does not match the digest recorded" in line for line in warnings_of(done)), done.stderr
    assert native._verified(library) and library.read_bytes() != located.read_bytes()


def test_a_cache_root_that_is_a_file_falls_back_in_one_warning(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    done = probe(tmp_path / "file")
    assert done.returncode == 0 and "AVAILABLE False" in done.stdout, done.stderr[-3000:]
    (line,) = [line for line in warnings_of(done)]
    assert "is not a directory" in line and "CBAM_JAX_CACHE" in line


def test_a_changed_source_is_built_into_a_library_of_its_own(built, tmp_path, monkeypatch):
    """The library's name carries a digest of native_ops.cc (and of the jax version, the oneDNN paths and
    the compiler): an edited shim (e.g. grouped convolutions added) never loads the old library."""
    cache, library = fresh_copy(built, tmp_path)
    source = tmp_path / "native_ops.cc"
    source.write_text(native.SOURCE.read_text() + "\n// edited\n")
    monkeypatch.setattr(native, "SOURCE", source)
    monkeypatch.setenv("CBAM_JAX_CACHE", str(cache))
    rebuilt = native.build()  # compiles only; nothing is loaded into this process
    assert rebuilt != library and sorted(libraries(cache)) == sorted([library, rebuilt])
    assert native._verified(rebuilt) and native._verified(library)
