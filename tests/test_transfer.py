"""Transfer between models: a plain ResNet's backbone into CBAM/SE/BAM-ResNets (attention initialised as
the variant prescribes, a report of what was new), classifiers into backbones or under new heads,
clear errors for what does not fit, `init_from` and `cbam-jax convert --arch`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

from cbam_jax import create_model, save_pretrained
from cbam_jax.cli import main
from cbam_jax.convert import ConversionError, from_torch, to_numpy_state_dict
from cbam_jax.convert.transfer import part_of, transfer_variables
from cbam_jax.factory import init_from
from cbam_jax.pretrained import load_metadata, load_pretrained
from tests.helpers import random_variables

SMALL = {"stem": "cifar", "width": 8, "num_classes": 5}


def flat(variables):
    return {k: np.asarray(v) for k, v in flatten_dict(variables, sep="/").items()}


@pytest.fixture(scope="module")
def plain():
    model = create_model("resnet18", **SMALL)
    return model, random_variables(model, (1, 16, 16, 3), seed=1)


@pytest.mark.slow  # eager inits of five models: ~30 s on 2 cores
@pytest.mark.parametrize("arch, variant", [("cbam_resnet18", "official"), ("cbam_resnet18", "timm"),
                                           ("cbam_resnet18", "common"), ("se_resnet18", "official"),
                                           ("bam_resnet18", "official")])
def test_plain_backbone_into_attention_models(plain, arch, variant):
    _, source = plain
    target = create_model(arch, variant=variant, reduction=4, **SMALL)
    initial = target.init(jax.random.key(7), jnp.zeros((1, 16, 16, 3)))  # eager: cheap once XLA's op cache is warm
    variables, report = transfer_variables(source, target, initial=initial)
    got, given, fresh = flat(variables), flat(source), flat(initial)
    assert set(got) == set(fresh)
    # Every tensor of the plain ResNet is loaded; everything new is attention, as the target's init makes it.
    assert sorted(report.loaded) == sorted(given) and not report.dropped
    assert set(report.new) == set(fresh) - set(given) and report.new
    assert {part_of(path) for path in report.new} == {"attention"}
    for path in given:
        np.testing.assert_array_equal(got[path], given[path])
    for path in report.new:
        np.testing.assert_array_equal(got[path], fresh[path])
    if arch == "cbam_resnet18" and variant != "common":  # the official spatial BN scale starts at 0, timm's at 1
        scale = got["params/layer1_0/attention/spatial/bn/scale"]
        np.testing.assert_array_equal(scale, 0.0 if variant == "official" else 1.0)
    assert report.summary() == f"{len(given)} tensors loaded, {len(report.new)} new (attention {len(report.new)}), 0 dropped"


@pytest.mark.slow
def test_new_head_and_backbone(plain):
    _, source = plain
    target = create_model("resnet18", stem="cifar", width=8, num_classes=3)
    variables, report = transfer_variables(source, target)
    assert sorted(report.new) == ["params/fc/bias", "params/fc/kernel"] == sorted(report.dropped)
    assert variables["params"]["fc"]["kernel"].shape == (64, 3)

    backbone = create_model("resnet18", stem="cifar", width=8, features_only=True, out_indices=(1, 2))
    variables, report = transfer_variables(source, backbone)
    assert not report.new and set(variables["params"]) == {"conv1", "bn1", "layer1_0", "layer1_1", "layer2_0",
                                                           "layer2_1"}
    assert {path.split("/")[1] for path in report.dropped} == {"layer3_0", "layer3_1", "layer4_0", "layer4_1", "fc"}
    features = backbone.apply(variables, jnp.ones((1, 16, 16, 3)))
    assert [f.shape for f in features] == [(1, 16, 16, 8), (1, 8, 8, 16)]


def test_what_does_not_fit_is_one_error(plain):
    model, source = plain
    cases = [
        (create_model("cbam_resnet34", reduction=4, **SMALL), "backbone tensors the source lacks .*layer1_2"),
        (create_model("cbam_resnet18", stem="imagenet", width=8, num_classes=5, reduction=4),
         r"of another shape \(params/conv1/kernel: source \(3, 3, 3, 8\), target \(7, 7, 3, 8\)"),
        (create_model("cbam_resnet18", stem="cifar", width=16, num_classes=5), "of another shape"),
    ]
    for target, message in cases:
        with pytest.raises(ConversionError, match=message) as error:
            transfer_variables(source, target)
        assert "\n" not in str(error.value)
    # Attention the target has no place for, and new attention where the weights should fit exactly.
    cbam = create_model("cbam_resnet18", reduction=4, **SMALL)
    with pytest.raises(ConversionError, match="no place for .*attention"):
        transfer_variables(random_variables(cbam, (1, 16, 16, 3)), model)
    with pytest.raises(ConversionError, match="tensors the source lacks .*attention"):
        transfer_variables(source, cbam, new_attention=False)


@pytest.mark.slow
def test_init_from_directory_hub_folder_and_file(tmp_path, plain):
    model, source = plain
    target = create_model("bam_resnet18", reduction=4, **SMALL)
    save_pretrained(tmp_path / "dir", model, source)
    save_pretrained(tmp_path / "hub", model, source, hub=True)
    save_file(to_numpy_state_dict(source, arch=model), tmp_path / "plain.safetensors")
    for spec in (tmp_path / "dir", tmp_path / "hub", tmp_path / "plain.safetensors"):
        variables, report = init_from(spec, target)
        assert {path.split("/")[1] for path in report.new} == {"bam1", "bam2", "bam3"}
        np.testing.assert_array_equal(variables["params"]["layer4_1"]["conv2"]["kernel"],
                                      source["params"]["layer4_1"]["conv2"]["kernel"])
    with pytest.raises(ValueError, match="no registered pretrained model"):
        init_from(tmp_path / "missing", target)


# ---- from PyTorch: torchvision and timm ResNets, and the CLI ---------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_cli_starts_a_cbam_resnet_from_a_plain_checkpoint(tmp_path, capsys, library):
    torch = pytest.importorskip("torch")
    if library == "torchvision":
        reference = pytest.importorskip("torchvision").models.resnet18(num_classes=7)
    else:
        reference = pytest.importorskip("timm").create_model("resnet18", num_classes=7)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    assert main(["convert", "--arch", "cbam_resnet18", str(tmp_path / "resnet18.pth"), str(tmp_path / "out")]) == 0
    summary = capsys.readouterr().out
    model, variables = load_pretrained(tmp_path / "out")
    _, plain_variables = from_torch(tmp_path / "resnet18.pth")
    assert (model.attention, model.num_classes, model.stem) == ("cbam", 7, "imagenet")
    got, given = flat(variables), flat(plain_variables)
    assert all(np.array_equal(got[path], value) for path, value in given.items())
    new = sorted(set(got) - set(given))
    assert new == sorted(load_metadata(tmp_path / "out")["source"]["new"]) and len(new) == 8 * 9  # 8 CBAMs
    assert f"as cbam_resnet18 (variant official): {len(given)} tensors loaded, {len(new)} new (attention " \
           f"{len(new)}), 0 dropped." in summary
    # As the official init makes them: zero spatial-BN scale, zero MLP biases.
    assert all(np.all(got[path] == 0) for path in new if path.endswith(("spatial/bn/scale", "fc1/bias")))
    # The plain directory works as a source too; a CBAM source, a misfit and a plain directory without --arch fail.
    assert main(["convert", "--arch", "se_resnet18", str(tmp_path / "out"), str(tmp_path / "se")]) == 1
    assert main(["convert", "--arch", "cbam_resnet34", str(tmp_path / "resnet18.pth"), str(tmp_path / "r34")]) == 1
    assert main(["convert", "--arch", "cbam_resnet77", str(tmp_path / "resnet18.pth"), str(tmp_path / "r77")]) == 1
    assert main(["convert", str(tmp_path / "out"), str(tmp_path / "again")]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 4 and all(line.startswith("cbam-jax convert: error: ") for line in errors)
    assert "can start only from a plain ResNet" in errors[0] and "backbone tensors the source lacks" in errors[1]
    assert "cbam_resnet77" in errors[2] and "give --arch" in errors[3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "resnet18.pth"]
