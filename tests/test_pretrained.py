"""save_pretrained / load_pretrained: exact round trip, atomic writes, clear errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbam_jax import create_model
from cbam_jax.pretrained import CONFIG_FILE, load_metadata, load_pretrained, save_pretrained
from tests.helpers import randomize


@pytest.fixture(scope="module")
def tiny():
    model = create_model("cbam_resnet18", num_classes=10, stem="cifar", width=8, variant="timm",
                         reduction=4)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    # Random parameters and running statistics (none at its default), so the round trip checks them all.
    variables = randomize(jax.eval_shape(model.init, jax.random.key(0), x))
    return model, {"params": variables["params"], "batch_stats": variables["batch_stats"]}, x


def test_round_trip_is_exact(tmp_path, tiny):
    model, variables, x = tiny
    metadata = {"class_names": [str(i) for i in range(10)], "preprocessing": None}
    save_pretrained(tmp_path / "m", model, variables, metadata=metadata)
    loaded_model, loaded = load_pretrained(tmp_path / "m")
    assert loaded_model == model
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(apply(loaded, x), apply(variables, x))
    assert load_metadata(tmp_path / "m") == metadata
    document = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert document["format_version"] == 1 and document["model"]["attention"] == "cbam"


def test_bfloat16_params_and_no_batch_stats(tmp_path):
    model = create_model("resnet18", num_classes=3, stem="cifar", width=4, param_dtype=jnp.bfloat16)
    variables = randomize(jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8, 8, 1))))
    save_pretrained(tmp_path / "m", model, {"params": variables["params"]})
    with pytest.raises(ValueError, match="missing"):  # batch_stats were not saved: the model needs them
        load_pretrained(tmp_path / "m")
    save_pretrained(tmp_path / "full", model, variables)
    _, loaded = load_pretrained(tmp_path / "full")
    assert loaded["params"]["conv1"]["kernel"].dtype == jnp.bfloat16
    assert loaded["params"]["conv1"]["kernel"].shape == (3, 3, 1, 4)


def test_existing_path_is_not_overwritten(tmp_path, tiny):
    model, variables, _ = tiny
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        save_pretrained(tmp_path / "m", model, variables)
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"


def test_failed_save_leaves_nothing(tmp_path, tiny):
    model, variables, _ = tiny
    with pytest.raises(ValueError, match="JSON"):
        save_pretrained(tmp_path / "m", model, variables, metadata={"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")


def test_not_a_pretrained_directory(tmp_path):
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="not a cbam-jax pretrained directory"):
        load_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="not a cbam-jax pretrained directory"):
        load_metadata(tmp_path / "other")


@pytest.mark.parametrize("damage", ["json", "version", "model", "checkpoint", "no_checkpoint"])
def test_corrupt_directory(tmp_path, tiny, damage):
    model, variables, _ = tiny
    path = save_pretrained(tmp_path / "m", model, variables)
    config = path / CONFIG_FILE
    if damage == "json":
        config.write_text(config.read_text()[:40])
        expected = "not valid JSON"
    elif damage == "version":
        config.write_text(json.dumps({**json.loads(config.read_text()), "format_version": 99}))
        expected = "format_version 99"
    elif damage == "model":
        document = json.loads(config.read_text())
        document["model"]["block"] = "pyramid"
        config.write_text(json.dumps(document))
        expected = "invalid model"
    elif damage == "checkpoint":
        for file in (path / "variables").rglob("*"):
            if file.is_file():
                file.write_bytes(b"\0garbage")
        expected = "cannot read the checkpoint"
    else:
        for file in sorted((path / "variables").rglob("*"), reverse=True):
            file.unlink() if file.is_file() else file.rmdir()
        (path / "variables").rmdir()
        expected = "incomplete"
    with pytest.raises(ValueError, match=expected):
        load_pretrained(path)
