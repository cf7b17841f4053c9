"""save_pretrained / load_pretrained: exact round trip, atomic writes, clear errors."""

import hashlib
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbam_jax import create_model
from cbam_jax.pretrained import (CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, DamagedWeights, load_metadata,
                                 load_pretrained, process_local_checkpointer, save_pretrained)
from cbam_jax.registry import model_config
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
    with pytest.raises(ValueError, match="not a cbam-jax pretrained folder"):
        load_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="not a cbam-jax pretrained folder"):
        load_metadata(tmp_path / "other")


@pytest.mark.parametrize("damage", ["json", "version", "model", "weights", "truncated", "no_weights"])
def test_corrupt_directory(tmp_path, tiny, damage):
    model, variables, _ = tiny
    path = save_pretrained(tmp_path / "m", model, variables)
    config, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
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
    elif damage == "weights":
        weights.write_bytes(b"\0garbage")
        expected = "damaged"
    elif damage == "truncated":  # unreadable, and no digest to compare with: still one clear error
        document = json.loads(config.read_text())
        del document["weights_sha256"]
        config.write_text(json.dumps(document))
        weights.write_bytes(weights.read_bytes()[:100])
        expected = "unreadable"
    else:
        weights.unlink()
        expected = "no model.safetensors"
    with pytest.raises(ValueError, match=expected):
        load_pretrained(path)


def test_one_format_with_the_digest_of_its_weights(tmp_path, tiny):
    model, variables, _ = tiny
    path = save_pretrained(tmp_path / "m", model, variables, metadata={"source": {"name": "tiny"}})
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    document = json.loads((path / CONFIG_FILE).read_text())
    assert document["library_name"] == "cbam-jax" and document["format_version"] == FORMAT_VERSION
    assert document["weights_sha256"] == hashlib.sha256((path / WEIGHTS_FILE).read_bytes()).hexdigest()
    # hub=True writes the same folder, byte for byte.
    hub_path = save_pretrained(tmp_path / "hub", model, variables, metadata={"source": {"name": "tiny"}}, hub=True)
    assert {p.name: p.read_bytes() for p in hub_path.iterdir()} == {p.name: p.read_bytes() for p in path.iterdir()}


def test_a_flipped_bit_in_the_weights_is_refused(tmp_path, tiny):
    model, variables, _ = tiny
    path = save_pretrained(tmp_path / "m", model, variables)
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0x01  # a low mantissa bit of the last array: still a readable file of other numbers
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(DamagedWeights, match="damaged") as error:
        load_pretrained(path)
    assert "\n" not in str(error.value)


def save_old_format(path, model, variables, metadata):
    """A folder as cbam-jax 0.1 wrote it: cbam_jax.json + an orbax checkpoint in variables/."""
    path.mkdir()
    tree = {c: jax.tree.map(np.asarray, variables[c]) for c in ("params", "batch_stats")}
    process_local_checkpointer().save(path / "variables", tree)
    (path / "cbam_jax.json").write_text(json.dumps({"format_version": 1, "model": model_config(model),
                                                    "metadata": metadata}))


def test_the_old_orbax_format_still_loads_with_a_note(tmp_path, tiny):
    model, variables, x = tiny
    metadata = {"class_names": [str(i) for i in range(10)]}
    save_old_format(tmp_path / "old", model, variables, metadata)
    with pytest.warns(FutureWarning, match="old orbax format.*next minor version.*save_pretrained"):
        loaded_model, loaded = load_pretrained(tmp_path / "old")
    assert loaded_model == model
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    with pytest.warns(FutureWarning):
        assert load_metadata(tmp_path / "old") == metadata
    # Re-saved, it is in the one format and loads equal, without the note.
    save_pretrained(tmp_path / "new", loaded_model, loaded, metadata=metadata)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, again = load_pretrained(tmp_path / "new")
    jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_free_form_metadata_is_saved_as_given(tmp_path, tiny):
    """Training's export records its source as a sentence: the card reads only mappings, the metadata keeps it."""
    model, variables, _ = tiny
    metadata = {"source": "cbam_jax training run in /somewhere", "preprocessing": None}
    path = save_pretrained(tmp_path / "m", model, variables, metadata=metadata)
    assert load_metadata(path) == metadata and "cbam_resnet18" in (path / "README.md").read_text()
