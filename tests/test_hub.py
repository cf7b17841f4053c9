"""The Hugging Face Hub path, offline: Hub-ready folders, `hf-hub:` ids resolved in a Hub cache built
here (revision pins by tag, branch and commit), PyTorch safetensors repos, pickles refused and never
unpickled, and `push_to_hub` against a fake HfApi."""

import json
import pickle
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("huggingface_hub")

from huggingface_hub import constants as hub_constants  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from cbam_jax import create_model, hub, load_pretrained, save_pretrained  # noqa: E402
from cbam_jax.convert import to_numpy_state_dict  # noqa: E402
from cbam_jax.hub import load_metadata  # noqa: E402
from tests.helpers import random_variables  # noqa: E402

COMMIT_V1, COMMIT_MAIN = "1" * 40, "2" * 40
METADATA = {"class_names": ["a", "b", "c"], "preprocessing": {"resize": 36, "crop": 32, "mean": [0.5] * 3,
                                                              "std": [0.25] * 3},
            "source": {"name": "cbam_resnet18.tiny", "license": "MIT", "url": "https://example.org/w.pth"},
            "metrics": {"top1": 91.25, "top5": 99.5, "dataset": "tiny val", "reported_by": "tests"}}


def tiny(seed):
    model = create_model("cbam_resnet18", num_classes=3, stem="cifar", width=8, reduction=4)
    return model, random_variables(model, (1, 16, 16, 3), seed)


@pytest.fixture(scope="module")
def models():
    return {seed: tiny(seed) for seed in (1, 2)}


def assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline: nothing can reach the network."""
    cache = tmp_path / "hf"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, Path | bytes], refs=()):
    """A snapshot in the Hub cache layout: models--ORG--NAME/{snapshots/COMMIT/..., refs/REF}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copy(content, snapshot / name)
        else:
            (snapshot / name).write_bytes(content)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


def hub_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir()}


def test_hub_ready_folder_round_trip_and_card(tmp_path, models):
    model, variables = models[1]
    folder = save_pretrained(tmp_path / "out", model, variables, metadata=METADATA, hub=True)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded_model, loaded = load_pretrained(folder)
    assert loaded_model == model
    assert_same(loaded, variables)
    assert load_metadata(folder) == METADATA
    card = (folder / "README.md").read_text()
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
    assert card.startswith("---\nlibrary_name: cbam-jax\n") and "license: mit" in card
    assert f"| parameters | {num_params:,} |" in card and "91.25%" in card and "99.5%" in card
    assert "resize 36" in card and "cbam_resnet18" in card
    config = json.loads((folder / "config.json").read_text())
    assert config["library_name"] == "cbam-jax" and config["model"]["attention"] == "cbam"
    with pytest.raises(FileExistsError):
        save_pretrained(folder, model, variables, hub=True)


def test_hf_hub_ids_with_revision_pins(tmp_path, models, hub_cache):
    folders = {seed: save_pretrained(tmp_path / str(seed), *models[seed], metadata=METADATA, hub=True)
               for seed in models}
    add_snapshot(hub_cache, "someone/cbam18", COMMIT_V1, hub_files(folders[1]), refs=["v1.0"])
    add_snapshot(hub_cache, "someone/cbam18", COMMIT_MAIN, hub_files(folders[2]), refs=["main"])
    for spec, seed in [("hf-hub:someone/cbam18", 2), ("hf-hub:someone/cbam18@main", 2),
                       ("hf-hub:someone/cbam18@v1.0", 1), (f"hf-hub:someone/cbam18@{COMMIT_V1}", 1)]:
        model, variables = load_pretrained(spec)
        assert model == models[seed][0]
        assert_same(variables, models[seed][1])
    assert load_metadata("hf-hub:someone/cbam18@v1.0") == METADATA
    for spec, needle in [("hf-hub:someone/cbam18@v9", "Cannot get hf-hub:someone/cbam18@v9"),
                         ("hf-hub:nobody/nothing", "Cannot get hf-hub:nobody/nothing"),
                         ("hf-hub:someone/cbam18@", "not a Hub id"), ("hf-hub:a/b/c", "not a Hub id")]:
        with pytest.raises(hub.HubError, match=needle) as error:
            load_pretrained(spec)
        assert "\n" not in str(error.value)


def test_pytorch_safetensors_repo_is_converted(tmp_path, hub_cache):
    """timm-style repo: timm's own config.json and PyTorch (torchvision-layout) weights in safetensors."""
    model = create_model("resnet18", num_classes=5, width=8)
    variables = random_variables(model, seed=3)
    save_file(to_numpy_state_dict(variables, arch=model), tmp_path / "model.safetensors")
    pretrained_cfg = {"input_size": [3, 40, 40], "crop_pct": 0.8, "interpolation": "bicubic",
                      "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "num_classes": 5}
    add_snapshot(hub_cache, "timm/resnet18.tiny", COMMIT_MAIN, {
        "model.safetensors": tmp_path / "model.safetensors",
        "config.json": json.dumps({"architecture": "resnet18", "num_classes": 5,
                                   "pretrained_cfg": pretrained_cfg}).encode()}, refs=["main"])
    loaded_model, loaded = load_pretrained("hf-hub:timm/resnet18.tiny")
    assert loaded_model.attention is None and loaded_model.num_classes == 5 and loaded_model.width == 8
    assert_same(loaded, variables)
    # timm's eval transform: short side to floor(40 / 0.8) = 50, center crop 40, its mean and std.
    assert load_metadata("hf-hub:timm/resnet18.tiny")["preprocessing"] == {
        "resize": 50, "crop": 40, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "channels": 3,
        "interpolation": "bicubic"}


def test_predict_takes_a_timm_style_repo(tmp_path, hub_cache, capsys):
    """predict reads the preprocessing of a timm repo's pretrained_cfg (it refused the repo before)."""
    from PIL import Image

    from cbam_jax.cli import main

    model = create_model("resnet18", num_classes=5, width=8)
    save_file(to_numpy_state_dict(random_variables(model, seed=4), arch=model), tmp_path / "model.safetensors")
    pretrained_cfg = {"input_size": [3, 32, 32], "crop_pct": 0.875, "mean": [0.5] * 3, "std": [0.25] * 3}
    add_snapshot(hub_cache, "timm/resnet18.cfg", COMMIT_MAIN, {
        "model.safetensors": tmp_path / "model.safetensors",
        "config.json": json.dumps({"architecture": "resnet18", "pretrained_cfg": pretrained_cfg}).encode()},
        refs=["main"])
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
    assert main(["predict", "--pretrained", "hf-hub:timm/resnet18.cfg", "--json", str(image)]) == 0, \
        capsys.readouterr().err
    assert len(json.loads(capsys.readouterr().out)["top_k"]) == 5


def test_an_offline_id_not_in_the_cache_says_so(tmp_path, hub_cache, capsys):
    from cbam_jax.cli import main

    with pytest.raises(hub.HubError) as error:
        load_pretrained("hf-hub:someone/absent")
    message = str(error.value)
    assert "\n" not in message
    for needle in ("hf-hub:someone/absent", "offline", "HF_HUB_OFFLINE", "not in the Hugging Face cache",
                   "huggingface-cli download someone/absent"):
        assert needle in message, (needle, message)
    image = tmp_path / "photo.png"
    image.write_bytes(b"not read")
    assert main(["predict", "--pretrained", "hf-hub:someone/absent", str(image)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offline" in err and "no cbam-jax model could be loaded" not in err


class Exploit:
    """Unpickling this creates a file: proof that something was unpickled."""

    marker = None

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_repo_is_refused_and_never_unpickled(tmp_path, hub_cache, monkeypatch):
    exploit = Exploit()
    exploit.marker = str(tmp_path / "unpickled")
    add_snapshot(hub_cache, "someone/pickled", COMMIT_MAIN, {
        "pytorch_model.bin": pickle.dumps({"conv1.weight": exploit}),
        "config.json": json.dumps({"architecture": "resnet18"}).encode()}, refs=["main"])

    def no_unpickling(*args, **kwargs):
        raise AssertionError("something was unpickled")
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    with pytest.raises(hub.HubError, match=r"Refusing hf-hub:someone/pickled: .*pytorch_model\.bin") as error:
        load_pretrained("hf-hub:someone/pickled")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "unpickled").exists()


def test_loading_a_hub_model_reads_no_pickle(tmp_path, models, hub_cache, monkeypatch):
    folder = save_pretrained(tmp_path / "m", *models[1], hub=True)
    add_snapshot(hub_cache, "someone/safe", COMMIT_MAIN, hub_files(folder), refs=["main"])

    def no_unpickling(*args, **kwargs):
        raise AssertionError("something was unpickled")
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    assert_same(load_pretrained("hf-hub:someone/safe")[1], models[1][1])


class FakeApi:
    """Records what push_to_hub asks of huggingface_hub.HfApi."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kwargs, files))
        return "commit-info"


def test_push_to_hub_with_a_fake_api(tmp_path, models):
    folder = save_pretrained(tmp_path / "m", *models[1], metadata=METADATA, hub=True)
    api = FakeApi()
    assert hub.push_to_hub(folder, "someone/cbam18", private=True, revision="dev", api=api) == "commit-info"
    (create, repo_id, create_kwargs), (upload, upload_kwargs, files) = api.calls
    assert (create, repo_id, create_kwargs) == ("create_repo", "someone/cbam18", {"private": True, "exist_ok": True})
    assert upload_kwargs["repo_id"] == "someone/cbam18" and upload_kwargs["revision"] == "dev"
    assert files == ["README.md", "config.json", "model.safetensors"]
    with pytest.raises(hub.HubError, match="ORG/NAME"):
        hub.push_to_hub(folder, "no-org", api=api)
    with pytest.raises(hub.HubError, match="not a cbam-jax pretrained folder"):
        hub.push_to_hub(tmp_path, "someone/x", api=api)
    assert len(api.calls) == 2


def test_predict_takes_an_hf_hub_id(tmp_path, models, hub_cache, capsys):
    from PIL import Image

    from cbam_jax.cli import main

    folder = save_pretrained(tmp_path / "1", *models[1], metadata=METADATA, hub=True)
    add_snapshot(hub_cache, "someone/cbam18", COMMIT_V1, hub_files(folder), refs=["v1.0"])
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
    outputs = []
    for source in ("hf-hub:someone/cbam18@v1.0", str(folder)):
        assert main(["predict", "--pretrained", source, "--json", str(image)]) == 0, capsys.readouterr().err
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and outputs[0]["top_k"][0]["class"] in METADATA["class_names"]
