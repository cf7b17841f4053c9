"""Fine-tuning start (config.init_from): pretrained weights are copied, a head for another class
count is re-initialised, and a pretrained model of another architecture is refused; `cbam-jax eval --pretrained`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cbam_jax.data import digits_source
from cbam_jax import create_model
from cbam_jax.pretrained import save_pretrained
from cbam_jax.training.trainer import init_from_pretrained
from tests.helpers import randomize


def _variables(model, seed=0):
    """Variables of the model's shapes filled with random numbers (no compile: only shapes are traced)."""
    return randomize(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)), seed)


def test_init_from_pretrained_copies_all_but_a_new_head(tmp_path):
    pretrained_model = create_model("cbam_resnet18", num_classes=5, stem="cifar", width=8, reduction=4)
    pretrained = _variables(pretrained_model, seed=1)
    save_pretrained(tmp_path / "pretrained", pretrained_model, pretrained)
    fresh = _variables(create_model("cbam_resnet18", num_classes=10, stem="cifar", width=8, reduction=4))
    merged = traverse_util.flatten_dict(init_from_pretrained(str(tmp_path / "pretrained"), fresh), sep="/")
    source = traverse_util.flatten_dict(pretrained, sep="/")
    target = traverse_util.flatten_dict(fresh, sep="/")
    assert set(merged) == set(target)
    for key, value in merged.items():
        expected = target[key] if key.startswith("params/fc/") else source[key]
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), err_msg=key)


def test_init_from_pretrained_of_another_architecture_fails(tmp_path):
    other = create_model("cbam_resnet18", num_classes=10, stem="cifar", width=16, reduction=4)
    save_pretrained(tmp_path / "other", other, _variables(other))
    fresh = _variables(create_model("cbam_resnet18", num_classes=10, stem="cifar", width=8, reduction=4))
    with pytest.raises(ValueError, match="does not match config.model"):
        init_from_pretrained(str(tmp_path / "other"), fresh)


def test_eval_subcommand_on_a_pretrained_directory(tmp_path, capsys):
    from cbam_jax.cli import main

    model = create_model("cbam_resnet18", num_classes=10, stem="cifar", width=8, reduction=4)
    variables = _variables(model)  # (variances positive)
    # A head that predicts class 3 for every image, with logit 5 against 0: the accuracy and loss
    # are then known from the labels alone, independently of the pipeline and the network.
    variables["params"]["fc"]["kernel"] = np.zeros_like(variables["params"]["fc"]["kernel"])
    variables["params"]["fc"]["bias"] = np.where(np.arange(10) == 3, 5.0, 0.0).astype(np.float32)
    save_pretrained(tmp_path / "pretrained", model, variables)
    assert main(["eval", "--pretrained", str(tmp_path / "pretrained"), "--config", "configs/tiny.py",
                 "--batch-size", "100"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    labels = digits_source("test").labels
    hits = int(np.sum(labels == 3))
    log_partition = np.log(np.exp(5.0) + 9.0)
    expected_loss = (hits * (log_partition - 5.0) + (len(labels) - hits) * log_partition) / len(labels)
    assert result["count"] == 359 == len(labels) and result["split"] == "test"
    assert result["accuracy"] == pytest.approx(hits / len(labels), abs=1e-9)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert main(["eval", "--pretrained", str(tmp_path / "pretrained")]) == 2
    assert "needs --config" in capsys.readouterr().err
