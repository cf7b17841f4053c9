"""The library under the application: what a core install (pyproject's `dependencies`) can do, and the
one line a missing extra gives.

The core test runs the library's entry points in a subprocess where every extra's modules are blocked
(`sys.modules[name] = None`, which makes `import name` fail as if it were not installed), then checks
that every third-party module the process imported belongs to a declared core dependency or to one of
their own dependencies (read from the installed distributions' metadata).
"""

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import cbam_jax
from cbam_jax import cache, errors
from cbam_jax.errors import MissingExtra, check_extra, require

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Modules of the extras and of the test tools that the core must not need.
BLOCKED = sorted({module for modules in errors.EXTRA_MODULES.values() for module in modules} - {"absl"}
                 | {"matplotlib", "pycocotools", "psutil", "importlib_resources", "timm", "pytorchcv",
                    "torchvision", "tensorflow"})

CORE_SCRIPT = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
import jax, jax.numpy as jnp, numpy as np
import cbam_jax, cbam_jax.nnx
from flax import nnx

def variables_of(model):  # shapes without compiling an initialiser per parameter (slow on a busy CPU)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.1, 0.3, s.shape), s.dtype), shapes)  # > 0: variances too

model = cbam_jax.create_model("cbam_resnet18", num_classes=3, stem="cifar", width=16)
variables = variables_of(model)
logits = jax.jit(model.apply)(variables, jnp.ones((2, 8, 8, 3)))
assert logits.shape == (2, 3), logits.shape
backbone = cbam_jax.create_model("cbam_resnet18", features_only=True, stem="cifar", width=16, out_indices=(1, 2))
features = jax.jit(backbone.apply)(variables_of(backbone), jnp.ones((1, 8, 8, 3)))
assert [f.shape for f in features] == [(1, 8, 8, 16), (1, 4, 4, 32)], [f.shape for f in features]
cbam_jax.save_pretrained(sys.argv[1], model, variables)
loaded, loaded_variables = cbam_jax.load_pretrained(sys.argv[1])
assert jnp.allclose(jax.jit(loaded.apply)(loaded_variables, jnp.ones((2, 8, 8, 3))), logits)
abstract = nnx.eval_shape(lambda: cbam_jax.nnx.create_model("cbam_resnet18", num_classes=3, stem="cifar", width=16,
                                                             rngs=nnx.Rngs(0)))
assert isinstance(abstract, nnx.Module)
print("MODULES", sorted(name for name, module in sys.modules.items() if module is not None and name.startswith("cbam_jax")))
"""


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirements: list[str]) -> set[str]:
    """The distributions `requirements` bring, transitively (markers evaluated without extras)."""
    seen: set[str] = set()
    todo = [Requirement(text) for text in requirements]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = _normalise(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            todo.extend(Requirement(text) for text in importlib.metadata.requires(requirement.name) or [])
        except importlib.metadata.PackageNotFoundError:
            pass
    return seen


def _run(script: str, *args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=environment,
                          cwd=cwd, timeout=600)


@pytest.mark.slow  # a subprocess in a fresh environment
def test_the_core_runs_with_only_the_core_dependencies(tmp_path):
    done = _run(CORE_SCRIPT.format(blocked=BLOCKED), str(tmp_path / "folder"),
                env={"CBAM_JAX_CACHE": str(tmp_path / "cache"), "CBAM_JAX_NATIVE": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    core_modules = json.loads(done.stdout.split("MODULES", 1)[1].strip().replace("'", '"'))
    distributions = importlib.metadata.packages_distributions()
    allowed = _closure(PYPROJECT["project"]["dependencies"])
    undeclared = {}
    for module in core_modules:
        for name in _imported_names(module):
            if name not in sys.stdlib_module_names and name != "cbam_jax" and not any(
                    _normalise(dist) in allowed for dist in distributions.get(name, [name])):
                undeclared.setdefault(name, []).append(module)
    assert not undeclared, f"core modules import undeclared distributions (make the import lazy with " \
                           f"errors.require, or declare it): {undeclared}"


def _imported_names(module: str) -> set[str]:
    """The top-level names of every module `module`'s source imports (anywhere in the file), except
    imports inside a `try` that handles their ImportError."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text())
    handled = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                handler.type is None or any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError",
                                                                                  "Exception") for n in ast.walk(handler.type))
                for handler in node.handlers):
            handled.update(id(inner) for statement in node.body for inner in ast.walk(statement))
    names = set()
    for node in ast.walk(tree):
        if id(node) in handled:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_core_dependencies_are_the_libraries_and_the_rest_are_extras():
    core = {_normalise(Requirement(text).name) for text in PYPROJECT["project"]["dependencies"]}
    assert core == {"jax", "flax", "numpy", "safetensors", "optax", "orbax-checkpoint", "pillow"}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert set(errors.EXTRA_MODULES) <= set(extras)
    for extra in ("train", "cpu", "torch", "onnx", "export", "hub", "detection", "prepare", "test", "bench", "all"):
        assert extra in extras, extra
    # every module check_extra looks for is the import name of a distribution the extra declares
    for extra, modules in errors.EXTRA_MODULES.items():
        declared = _closure([text for text in extras[extra] if not text.startswith("cbam-jax[")])
        distributions = importlib.metadata.packages_distributions()
        for module in modules:
            assert any(_normalise(dist) in declared for dist in distributions.get(module, [module])), (extra, module)


def test_train_py_without_the_train_extra_says_which_extra_in_one_line(tmp_path):
    script = ("import runpy, sys; sys.modules['ml_collections'] = None; sys.argv = ['train.py', '--workdir', "
              f"{str(tmp_path / 'run')!r}]; runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')")
    done = _run(script, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["train.py: error: ml_collections is not installed: pip install 'cbam-jax[train]'"]
    assert not (tmp_path / "run").exists()


def test_require_and_check_extra_name_the_extra(monkeypatch):
    with pytest.raises(MissingExtra, match=r"^no_such_module_x is not installed: pip install 'cbam-jax\[hub\]'$"):
        require("no_such_module_x", "hub")
    assert require("json", "train") is json
    monkeypatch.setitem(sys.modules, "grain", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(MissingExtra, match=r"^grain, tqdm are not installed: pip install 'cbam-jax\[train\]'$"):
        check_extra("train")


def test_the_lazy_import_points_name_their_extra(monkeypatch, tmp_path):
    from cbam_jax.data import sources
    from cbam_jax.training.metrics_log import MetricLog

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # another test may have imported it already
    with pytest.raises(MissingExtra, match=r"cbam-jax\[train\]"):
        sources.digits_source("train")
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(MissingExtra, match=r"tensorboardX is not installed: pip install 'cbam-jax\[train\]'"):
        MetricLog(str(tmp_path), tensorboard=True)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MissingExtra, match=r"huggingface_hub is not installed: pip install 'cbam-jax\[hub\]'"):
        cbam_jax.load_pretrained("hf-hub:org/name")


def test_one_cache_root(monkeypatch, tmp_path):
    from cbam_jax.layers import native

    monkeypatch.delenv("CBAM_JAX_CACHE", raising=False)
    assert cache.cache_root() == Path("~/.cache/cbam_jax").expanduser().absolute()
    monkeypatch.setenv("CBAM_JAX_CACHE", str(tmp_path / "c"))
    assert cache.cache_root() == tmp_path / "c"
    assert native.cache_dir() == tmp_path / "c" / "kernels"
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("CBAM_JAX_CACHE", str(tmp_path / "file"))
    with pytest.raises(errors.InvalidInput) as raised:
        cache.cache_root()
    assert errors.one_line(raised.value) == str(raised.value)
    assert "CBAM_JAX_CACHE" in str(raised.value) and str(tmp_path / "file") in str(raised.value)


@pytest.mark.slow
def test_tfds_preparation_of_cifar10_gets_to_its_download_offline(tmp_path):
    """The `prepare` extra brings what tfds needs but does not declare (importlib_resources): the builder
    gets as far as fetching the archive, which fails offline."""
    script = textwrap.dedent(f"""
        import tensorflow_datasets as tfds

        class ReachedTheDownload(Exception):
            pass

        def stop(self, *args, **kwargs):
            raise ReachedTheDownload()

        # the download step itself is stopped: no network in the tests
        tfds.download.DownloadManager.download = tfds.download.DownloadManager.download_and_extract = stop
        builder = tfds.builder("cifar10", data_dir={str(tmp_path / 'tfds')!r})
        try:
            builder.download_and_prepare(file_format="array_record")
        except ReachedTheDownload:
            print("REACHED THE DOWNLOAD")
    """)
    done = _run(script, cwd=tmp_path)
    assert done.returncode == 0 and "REACHED THE DOWNLOAD" in done.stdout, done.stderr[-3000:]
