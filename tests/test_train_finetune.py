"""Fine-tuning (config.init_from, config.freeze, config.new_lr_factor): pretrained weights of any source
through `transfer.init_from`, a head for another class count and attention a plain ResNet lacks are
fresh; frozen parts keep their parameters and BatchNorm statistics; new parameters get their own
learning rate; end to end through train.py; `cbam-jax eval --pretrained`."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from cbam_jax.data import digits_source
from cbam_jax import create_model
from cbam_jax.factory import init_from
from cbam_jax.pretrained import save_pretrained
from cbam_jax.training import optim
from cbam_jax.training.config import base_config, validate
from tests.helpers import randomize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _variables(model, seed=0):
    """Variables of the model's shapes filled with random numbers (no compile: only shapes are traced)."""
    return randomize(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)), seed)


def test_init_from_a_pretrained_directory_copies_all_but_a_new_head(tmp_path):
    pretrained_model = create_model("cbam_resnet18", num_classes=5, stem="cifar", width=8, reduction=4)
    pretrained = _variables(pretrained_model, seed=1)
    save_pretrained(tmp_path / "pretrained", pretrained_model, pretrained)
    model = create_model("cbam_resnet18", num_classes=10, stem="cifar", width=8, reduction=4)
    fresh = _variables(model)
    variables, report = init_from(str(tmp_path / "pretrained"), model, initial=fresh)
    merged = traverse_util.flatten_dict(variables, sep="/")
    source = traverse_util.flatten_dict(pretrained, sep="/")
    target = traverse_util.flatten_dict(fresh, sep="/")
    assert set(merged) == set(target)
    assert set(report.new) == {"params/fc/kernel", "params/fc/bias"}
    for key, value in merged.items():
        expected = target[key] if key.startswith("params/fc/") else source[key]
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), err_msg=key)


def test_init_from_a_pretrained_model_of_another_width_fails(tmp_path):
    other = create_model("cbam_resnet18", num_classes=10, stem="cifar", width=16, reduction=4)
    save_pretrained(tmp_path / "other", other, _variables(other))
    model = create_model("cbam_resnet18", num_classes=10, stem="cifar", width=8, reduction=4)
    with pytest.raises(ValueError, match="do not fit the target model"):
        init_from(str(tmp_path / "other"), model, initial=_variables(model))


def test_config_init_from_is_checked_without_loading(tmp_path):
    config = base_config()
    config.init_from = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="config.init_from: .*missing.*no registered pretrained model"):
        validate(config)
    for source in ("resnet18", "resnet18.tv_in1k", "hf-hub:org/name@v1", str(tmp_path)):
        config = base_config()
        config.init_from = source
        validate(config)  # names and paths only: nothing is downloaded
    config = base_config()
    config.new_lr_factor = 10.0
    with pytest.raises(ValueError, match="new_lr_factor = 10.0 .* set config.init_from"):
        validate(config)


def test_freeze_patterns_name_module_paths():
    assert optim.is_frozen("conv1/kernel", ["conv1"]) and optim.is_frozen("bn1/scale", ["conv1", "bn1"])
    assert not optim.is_frozen("layer1_0/conv1/kernel", ["conv1"])  # the stem only
    assert optim.is_frozen("layer1_1/bn2/mean", ["layer1_*"]) and not optim.is_frozen("layer2_0/bn2/mean", ["layer1_*"])
    assert optim.is_frozen("layer3_0/attention/channel/fc1/kernel", ["*/attention"])
    params = _variables(create_model("cbam_resnet18", num_classes=10, stem="cifar", width=8, reduction=4))["params"]
    with pytest.raises(ValueError, match="config.freeze pattern 'stem' names no part of the model"):
        optim.parameter_labels(params, ["stem"], [], 1.0)
    assert optim.parameter_labels(params, [], ["params/fc/bias"], 1.0) is None  # one group: the plain optimizer


def test_frozen_parameters_get_no_update_and_new_ones_a_scaled_one():
    config = ml_collections.ConfigDict(dict(grad_clip_norm=0.0, optimizer="sgd", momentum=0.0, weight_decay=1e-2,
                                            decay_norm_and_bias=True, new_lr_factor=10.0))
    params = {"conv1": {"kernel": jnp.ones((3, 3, 1, 2))}, "layer1_0": {"conv1": {"kernel": jnp.ones((3, 3, 2, 2))}},
              "fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}}
    labels = optim.parameter_labels(params, ["conv1"], ["params/fc/kernel", "params/fc/bias"], 10.0)
    assert labels == {"conv1": {"kernel": "frozen"}, "layer1_0": {"conv1": {"kernel": "trained"}},
                      "fc": {"kernel": "new", "bias": "new"}}
    tx = optim.make_optimizer(config, optax.constant_schedule(0.1), labels)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    expected = -0.1 * (1 + 1e-2)  # SGD on gradient + decay
    np.testing.assert_array_equal(updates["conv1"]["kernel"], 0.0)
    np.testing.assert_allclose(updates["layer1_0"]["conv1"]["kernel"], expected, rtol=1e-6)
    np.testing.assert_allclose(updates["fc"]["kernel"], 10 * expected, rtol=1e-6)


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


@pytest.mark.slow
def test_train_py_fine_tunes_a_cbam_resnet_from_a_plain_one_with_the_stem_frozen(tmp_path):
    """train.py: init_from a plain ResNet-18 directory, the stem (conv1, bn1) frozen, attention and head
    at 10x the learning rate; stopped after 2 steps and resumed (the parameter groups come back)."""
    plain = create_model("resnet18", num_classes=10, stem="cifar", width=8)
    source = jax.tree.map(np.asarray, _variables(plain, seed=3))
    save_pretrained(tmp_path / "plain", plain, source)
    command = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"),
               f"--config.init_from={tmp_path / 'plain'}", "--config.freeze=conv1,bn1", "--config.new_lr_factor=10",
               "--config.num_train_steps=4", "--config.eval_every_steps=4", "--config.checkpoint_every_steps=2"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = subprocess.run([*command, "--config.stop_at_step=2"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "init_from" in first.stderr and "new (attention" in first.stderr
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "init_from" not in second.stderr  # resumed from the workdir, not from the source again

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["split"] == "init_from"]
    assert len(logged) == 1 and logged[0]["source"] == str(tmp_path / "plain")
    assert logged[0]["new"] and all("/attention/" in path for path in logged[0]["new"])  # same class count: no head
    from cbam_jax.training.checkpoint import restore_variables
    trained, meta = restore_variables(tmp_path / "run", "latest")
    assert meta["step"] == 4 and meta["new_params"] == [p for p in logged[0]["new"] if p.startswith("params/")]
    before = traverse_util.flatten_dict(source, sep="/")
    after = traverse_util.flatten_dict(jax.tree.map(np.asarray, trained), sep="/")
    for path, value in before.items():
        if path.split("/")[1] in ("conv1", "bn1"):  # frozen: parameters and BatchNorm statistics, bit for bit
            np.testing.assert_array_equal(after[path], value, err_msg=path)
        else:
            assert not np.array_equal(after[path], value), path


@pytest.mark.slow
def test_train_py_refuses_a_freeze_pattern_that_names_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir",
                             str(tmp_path / "run"), "--config.freeze=conv1,stem"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
    assert "config.freeze pattern 'stem' names no part of the model" in result.stderr
    assert not (tmp_path / "run").exists()  # checked before the workdir is made
