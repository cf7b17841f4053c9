"""The converter without numerics: detection of every layout and depth, exact round trips, the CLI,
and a clear error (and no output) for every kind of bad input. Parity is in test_convert_parity.py."""

import contextlib
import io
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

from cbam_jax.cli import main  # noqa: E402
from cbam_jax.convert import ConversionError, detect, from_torch, to_torch  # noqa: E402
from cbam_jax.pretrained import load_metadata, load_pretrained  # noqa: E402
from tests.torch_refs import common, official  # noqa: E402

DEPTHS = (18, 34, 50, 101)


def shapes_only(model):
    """A state_dict of zero-memory arrays with the model's key names and shapes."""
    return {k: np.broadcast_to(np.float32(0), v.shape) for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def on_meta(factory):
    with torch.device("meta"):
        return factory()


# (torch factory on the meta device, expected layout, expected arch, variant, stem)
DETECTION_CASES = (
    [(lambda d=d: official.ResidualNet("ImageNet", d, 1000, "CBAM"), "official", f"cbam_resnet{d}", "official",
      "imagenet") for d in DEPTHS]
    + [(lambda d=d: official.ResidualNet("CIFAR100", d, 100, "BAM"), "official", f"bam_resnet{d}", "official", "cifar")
       for d in DEPTHS]
    + [(lambda d=d: timm.create_model(f"resnet{d}", block_args=dict(attn_layer="cbam")), "timm",
        f"cbam_resnet{d}", "timm", "imagenet") for d in DEPTHS + (152,)]
    + [(lambda d=d: common.resnet_cbam(d), "common", f"cbam_resnet{d}", "common", "imagenet") for d in DEPTHS + (152,)]
    + [(lambda d=d: common.resnet_cbam(d, key_style="2018"), "common_2018", f"cbam_resnet{d}", "common", "imagenet")
       for d in DEPTHS + (152,)]
    + [(lambda d=d: getattr(torchvision.models, f"resnet{d}")(), "torchvision", f"resnet{d}", "official", "imagenet")
       for d in DEPTHS + (152,)]
)


@pytest.mark.parametrize("factory,layout,arch,variant,stem", [
    # ResNet-101/152 take seconds to build even on the meta device; their keys follow ResNet-50's.
    pytest.param(*case, id=f"{case[1]}-{case[2]}", marks=pytest.mark.slow if case[2].endswith(("101", "152")) else ())
    for case in DETECTION_CASES])
def test_detects_every_layout_and_depth(factory, layout, arch, variant, stem):
    state = shapes_only(on_meta(factory))
    found = detect(state)
    assert (found.layout, found.arch, found.variant, found.stem) == (layout, arch, variant, stem)
    assert found.num_classes == state["fc.weight"].shape[0]


@pytest.mark.slow  # builds the full-size official models
def test_official_release_keys_are_all_accounted_for():
    """The official ResNet-50 + CBAM layout: 411 float tensors (480 with num_batches_tracked), every one
    placed in the Flax model, 28,089,624 parameters as the paper reports."""
    from cbam_jax.convert import load_variables
    from cbam_jax.convert.layouts import get_layout
    reference = on_meta(lambda: official.ResidualNet("ImageNet", 50, 1000, "CBAM"))
    assert len(reference.state_dict()) == 480
    state = shapes_only(reference)
    assert len(state) == 411
    found = detect(state)
    variables = load_variables(state, found.build(), get_layout("official"), detected=found)
    assert sum(v.size for v in jax_leaves(variables["params"])) == 28_089_624


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def flat_paths(tree):
    """{'params/conv1/kernel': array, ...}"""
    from flax.traverse_util import flatten_dict
    return flatten_dict(tree, sep="/")


def randomized(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape) + 0.1)
    return model


# (torch model, arch, variant, layout to write back)
ROUND_TRIPS = {
    "official_cbam": (lambda: official.ResidualNet("CIFAR10", 18, 10, "CBAM"), "cbam_resnet18", "official", None),
    "official_bam": (lambda: official.ResidualNet("ImageNet", 18, 7, "BAM"), "bam_resnet18", "official", None),
    "timm": (lambda: timm.create_model("resnet18", block_args=dict(attn_layer="cbam"), num_classes=5),
             "cbam_resnet18", "timm", None),
    "common": (lambda: common.resnet_cbam(18, 3), "cbam_resnet18", "common", None),
    "common_2018": (lambda: common.resnet_cbam(18, 3, key_style="2018"), "cbam_resnet18", "common", "common_2018"),
    "torchvision": (lambda: torchvision.models.resnet18(num_classes=6), "resnet18", "official", "torchvision"),
}


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_round_trip_torch_flax_torch_is_exact(name):
    factory, arch, variant, layout = ROUND_TRIPS[name]
    reference = randomized(factory())
    model, variables = from_torch(reference.state_dict())
    state = to_torch(variables, arch=arch, variant=variant, layout=layout)
    original = reference.state_dict()
    assert set(state) == set(original)
    for key, value in original.items():
        if key.endswith("num_batches_tracked"):
            assert int(state[key]) == 0
        else:
            assert torch.equal(state[key], value), key
    factory().load_state_dict(state, strict=True)


def test_to_torch_refuses_another_variant():
    _, variables = from_torch(randomized(official.ResidualNet("CIFAR10", 18, 10, "CBAM")).state_dict())
    with pytest.raises(ConversionError, match="do not fit cbam_resnet18"):
        to_torch(variables, arch="cbam_resnet18", variant="timm")
    with pytest.raises(ConversionError, match="do not fit cbam_resnet34"):
        to_torch(variables, arch="cbam_resnet34")


# ---- bad input: every case gives a clear error, a non-zero exit code and no output -------------------------

@pytest.fixture(scope="module")
def official_state():
    return randomized(official.ResidualNet("CIFAR10", 18, 10, "CBAM")).state_dict()


def write_checkpoint(tmp_path, state, name="model.pth"):
    torch.save(state, tmp_path / name)
    return tmp_path / name


def convert_fails(tmp_path, source, expected, *extra):
    destination = tmp_path / "out"
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        assert main(["convert", str(source), str(destination), *extra]) == 1
    assert len(stderr.getvalue().splitlines()) == 1 and stderr.getvalue().startswith("cbam-jax convert: error: ")
    assert not destination.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    with pytest.raises(ConversionError, match="(?s)" + expected):  # messages span lines
        kwargs = {"arch": extra[1]} if extra[:1] == ("--arch",) else {}
        from_torch(source, **kwargs)


def test_truncated_file(tmp_path, official_state):
    data = write_checkpoint(tmp_path, official_state).read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    convert_fails(tmp_path, tmp_path / "cut.pth", "truncated or not a PyTorch checkpoint")


def test_truncated_safetensors(tmp_path, official_state):
    from safetensors.torch import save_file
    save_file(dict(official_state), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    convert_fails(tmp_path, tmp_path / "cut.safetensors", "Cannot read .* as safetensors")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pth").write_text("these are not weights")
    convert_fails(tmp_path, tmp_path / "notes.pth", "not a PyTorch checkpoint")
    (tmp_path / "list.pth").unlink(missing_ok=True)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    convert_fails(tmp_path, tmp_path / "list.pth", "not a state_dict")
    convert_fails(tmp_path, tmp_path / "missing.pth", "No checkpoint file")


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"conv1.weight": RunsCode(marker)}, handle)
    torch.save({"state_dict": {"conv1.weight": RunsCode(marker)}}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        convert_fails(tmp_path, tmp_path / name, "Refusing to load|not a PyTorch checkpoint")
    assert not marker.exists()


def test_wrong_architecture(tmp_path, official_state):
    source = write_checkpoint(tmp_path, official_state)
    convert_fails(tmp_path, source, r"152 missing.*layer1\.2\.conv1\.weight", "--arch", "cbam_resnet34")


def test_missing_layer(tmp_path, official_state):
    state = {k: v for k, v in official_state.items() if not k.startswith("layer3.1.cbam.SpatialGate.spatial.bn.")}
    convert_fails(tmp_path, write_checkpoint(tmp_path, state), r"4 missing.*layer3\.1\.cbam\.SpatialGate\.spatial\.bn")


def test_wrong_shape(tmp_path, official_state):
    state = dict(official_state)
    state["layer2.0.cbam.ChannelGate.mlp.1.weight"] = torch.zeros(8, 100)
    convert_fails(tmp_path, write_checkpoint(tmp_path, state),
                  r"layer2\.0\.cbam\.ChannelGate\.mlp\.1\.weight: checkpoint \(8, 100\), model \(8, 128\)")


def test_unexpected_key(tmp_path, official_state):
    state = {**official_state, "layer1.0.cbam.extra.weight": torch.zeros(3)}
    convert_fails(tmp_path, write_checkpoint(tmp_path, state), r"1 unexpected.*layer1\.0\.cbam\.extra\.weight")


def test_unknown_key_prefix(tmp_path, official_state):
    state = {f"model.backbone.{k}": v for k, v in official_state.items()}
    source = write_checkpoint(tmp_path, state)
    convert_fails(tmp_path, source, r"unknown prefix 'model\.backbone\.'.*strip_prefix")
    model, _ = from_torch(source, strip_prefix="model.backbone.")
    assert model.attention == "cbam"
    assert main(["convert", str(source), str(tmp_path / "ok"), "--strip-prefix", "model.backbone."]) == 0


def test_not_a_resnet(tmp_path):
    torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / "linear.pth")
    convert_fails(tmp_path, tmp_path / "linear.pth", "No known PyTorch ResNet layout")


def test_unregistered_depth(tmp_path):
    from timm.models.resnet import BasicBlock, ResNet
    state = ResNet(block=BasicBlock, layers=[1, 1, 1, 1], num_classes=4).state_dict()
    convert_fails(tmp_path, write_checkpoint(tmp_path, state), r"basic blocks per stage \(1, 1, 1, 1\)")


# ---- the CLI, both ways ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_converts_official_release_format_and_back(tmp_path, capsys):
    reference = randomized(official.ResidualNet("CIFAR10", 18, 10, "CBAM"))
    wrapped = {"epoch": -1, "arch": "resnet", "best_prec1": 0,
               "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pth.tar")
    (tmp_path / "classes.txt").write_text("\n".join(f"class{i}" for i in range(10)))
    assert main(["convert", str(tmp_path / "ckpt.pth.tar"), str(tmp_path / "jax"),
                 "--class-names", str(tmp_path / "classes.txt")]) == 0
    assert "cbam_resnet18" in capsys.readouterr().out
    model, converted = load_pretrained(tmp_path / "jax")
    assert (model.attention, model.stem, model.num_classes) == ("cbam", "cifar", 10)
    metadata = load_metadata(tmp_path / "jax")
    assert metadata["class_names"][3] == "class3" and "preprocessing" not in metadata
    assert metadata["source"]["layout"] == "official"

    assert main(["convert", str(tmp_path / "ckpt.pth.tar"), str(tmp_path / "jax")]) == 1  # no overwrite
    captured = capsys.readouterr()
    assert "already exists" in captured.err and len(captured.err.splitlines()) == 1 and not captured.out

    for name in ("back.pth", "back.safetensors"):
        assert main(["convert", "--to-torch", str(tmp_path / "jax"), str(tmp_path / name)]) == 0
        back = from_torch(tmp_path / name)[1]
        restored = official.ResidualNet("CIFAR10", 18, 10, "CBAM")
        if name.endswith(".pth"):
            restored.load_state_dict(torch.load(tmp_path / name, weights_only=True), strict=True)
            for key, value in reference.state_dict().items():
                if not key.endswith("num_batches_tracked"):
                    assert torch.equal(restored.state_dict()[key], value), key
        # Back in Flax: the same tree with the same values as the first conversion.
        assert flat_paths(back).keys() == flat_paths(converted).keys()
        for path, value in flat_paths(converted).items():
            np.testing.assert_array_equal(flat_paths(back)[path], value, err_msg=path)
    assert main(["convert", "--to-torch", str(tmp_path / "jax"), str(tmp_path / "cv.pth"), "--layout", "pytorchcv"]) == 0
    assert "features.stage1.unit1.cbam.ch_gate.mlp.fc1.weight" in torch.load(tmp_path / "cv.pth", weights_only=True)
    assert main(["convert", "--to-torch", str(tmp_path / "jax"), str(tmp_path / "t.pth"), "--variant", "timm"]) == 1
    assert not (tmp_path / "t.pth").exists()


def test_cli_records_imagenet_preprocessing(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    assert main(["convert", str(tmp_path / "r18.pth"), str(tmp_path / "jax")]) == 0
    preprocessing = load_metadata(tmp_path / "jax")["preprocessing"]
    assert (preprocessing["resize"], preprocessing["crop"], preprocessing["mean"][0]) == (256, 224, 0.485)
