"""Attention maps, Grad-CAM, figures and `cbam-jax attention`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from cbam_jax import create_model
from cbam_jax.cli import main
from cbam_jax.pretrained import save_pretrained
from cbam_jax.resnet import ResNet
from cbam_jax.visualize import (attention_figure, attention_maps, block_names, colorize, grad_cam, last_block_name,
                                module_order, stage_of)
from tests import numpy_reference as ref
from tests.helpers import randomize, to_numpy

# Tiny two-stage networks; 'timm' options give the spatial gate a BatchNorm scale of 1, so its
# map is not the constant 0.5 of the official zero-initialised gate.
TINY = {"stage_sizes": (1, 2), "block": "basic", "width": 8, "stem": "cifar", "num_classes": 4}
ATTENTION = {
    "cbam": {"reduction": 4, "spatial_bn_zero_init": False, "pool_order": "mean_max"},
    "bam": {"reduction": 4, "dilation": 2},
    "se": {"reduction": 4},
    None: {},
}


def tiny_model(attention):
    model = ResNet(**TINY, attention=attention, attention_options=ATTENTION[attention])
    images = jax.random.normal(jax.random.key(0), (2, 20, 28, 3))  # non-square
    return model, randomize(jax.eval_shape(model.init, jax.random.key(1), images)), images


@pytest.mark.parametrize("attention", ["cbam", "bam", "se", None])
def test_maps_have_input_size_and_values_in_unit_range(attention):
    model, variables, images = tiny_model(attention)
    maps = attention_maps(model, variables, images)
    expected_names = {"cbam": ["layer1_0", "layer2_0", "layer2_1"], "se": ["layer1_0", "layer2_0", "layer2_1"],
                      "bam": ["bam1"], None: []}[attention]
    assert list(maps) == expected_names
    _, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, images)
    for name, entry in maps.items():
        assert set(entry) == ({"channel"} if attention == "se" else {"channel", "spatial"})
        assert entry["channel"].shape == (2, 8 * (2 if name.startswith("layer2") else 1))
        assert entry["channel"].min() >= 0 and entry["channel"].max() <= 1
        if "spatial" in entry:
            assert entry["spatial"].shape == (2, 20, 28)
            assert entry["spatial"].min() >= 0 and entry["spatial"].max() <= 1
            assert entry["spatial"].std() > 0  # a real map, not a constant
            # Without resizing, the map is the sown one at the feature map's resolution.
            raw = attention_maps(model, variables, images, resize=False)[name]["spatial"]
            sown = state["intermediates"][name]
            sown = sown["attention"]["spatial"] if attention == "cbam" else sown
            np.testing.assert_allclose(raw, sown["spatial_attention"][0], atol=1e-6)
            # Upsampling keeps the map's mean (bilinear, stride-aligned): same picture, larger.
            np.testing.assert_allclose(entry["spatial"].mean(axis=(1, 2)), raw.mean(axis=(1, 2)), atol=0.02)
    cam = grad_cam(model, variables, images)
    assert cam.maps.shape == (2, 20, 28) and cam.maps.min() >= 0 and cam.maps.max() <= 1
    np.testing.assert_array_equal(cam.class_index, np.argmax(cam.logits, axis=-1))
    np.testing.assert_allclose(cam.logits, jax.jit(model.apply)(variables, images), atol=1e-5)


def _module_input(model, variables, images, path):
    """The input (B, H, W, C) the module at `path` receives in an eval-mode forward pass."""
    captured = []

    def record(call, args, kwargs, context):
        if context.method_name == "__call__" and context.module.scope.path == path:
            captured.append(args[0])
        return call(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, images)
    assert len(captured) == 1
    return np.asarray(captured[0], np.float64)


def test_se_and_bam_maps_are_their_gates_sigmoids():
    """The SE channel map and BAM's channel and spatial maps against NumPy (tests/numpy_reference.py)
    from the input each module receives: sigmoid(fc2(relu(fc1(avgpool(x))))) for SE, and the
    sigmoids of BAM's two branches (at the feature map's resolution, resize=False)."""
    model, variables, images = tiny_model("se")
    x = _module_input(model, variables, images, ("layer1_0", "attention"))
    p = to_numpy(variables["params"]["layer1_0"]["attention"])
    hidden = np.maximum(x.mean(axis=(1, 2)) @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
    expected = ref.sigmoid(hidden @ p["fc2"]["kernel"] + p["fc2"]["bias"])
    np.testing.assert_allclose(attention_maps(model, variables, images)["layer1_0"]["channel"], expected, atol=1e-6)

    model, variables, images = tiny_model("bam")
    x = _module_input(model, variables, images, ("bam1",))
    p = {**to_numpy(variables["params"]["bam1"])}
    for name, stats in to_numpy(variables["batch_stats"]["bam1"]).items():
        p[name] = {**p[name], **stats}
    channel, spatial = ref.bam_logits(x, p, dilation=ATTENTION["bam"]["dilation"])
    maps = attention_maps(model, variables, images, resize=False)["bam1"]
    assert np.ptp(ref.sigmoid(spatial)) > 0.1 and np.ptp(ref.sigmoid(channel)) > 0.1  # maps with contrast
    np.testing.assert_allclose(maps["channel"], ref.sigmoid(channel[:, 0, 0, :]), atol=1e-6)
    np.testing.assert_allclose(maps["spatial"], ref.sigmoid(spatial[..., 0]), atol=1e-6)


def test_grad_cam_equals_the_class_activation_map_of_a_pooled_linear_head():
    """With global average pooling and a linear head, d y_c / d A_k = w_kc / (h w) at every position,
    so Grad-CAM is ReLU(A . w_c) up to scale (Zhou et al.'s CAM); features captured independently."""
    model, variables, images = tiny_model("cbam")
    layer = last_block_name(model)
    cam = grad_cam(model, variables, images, class_index=[1, 3], resize=False)
    def block_output(module, method):
        return method == "__call__" and module.scope.path == (layer,)

    _, state = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=block_output,
                                                mutable=["intermediates"]))(variables, images)
    features = state["intermediates"][layer]["__call__"][0]
    kernel = variables["params"]["fc"]["kernel"]
    for i, target in enumerate([1, 3]):
        expected = np.maximum(np.asarray(features[i] @ kernel[:, target]), 0)
        expected = expected / expected.max()
        np.testing.assert_allclose(cam.maps[i], expected, atol=1e-5)


def two_region_model():
    """A CBAM network that carries even input channels and odd ones in separate feature channels,
    position by position (every conv is a channel-group identity on its centre tap), with class 0
    reading the even group and class 1 the odd group. The spatial gates keep their random weights
    (they scale positions by positive factors, so the groups stay apart); the channel gates get a
    zero MLP weight, a constant gate, so that no global pooling lets one region reach the other's logit."""
    model = ResNet(stage_sizes=(1, 1), block="basic", width=8, stem="cifar", num_classes=2, attention="cbam",
                   attention_options=ATTENTION["cbam"])
    variables = randomize(jax.eval_shape(model.init, jax.random.key(2), jnp.zeros((1, 32, 32, 3))))

    def rewrite(path, leaf):
        names = [getattr(key, "key", None) for key in path]
        if "attention" in names:
            return jnp.zeros_like(leaf) if "channel" in names and names[-1] == "kernel" else leaf
        if names[-1] == "kernel" and leaf.ndim == 4:  # conv: centre tap, same parity in and out
            kh, kw, cin, cout = leaf.shape
            same_group = (np.arange(cin)[:, None] % 2 == np.arange(cout)[None] % 2).astype(np.float32)
            kernel = np.zeros(leaf.shape, np.float32)
            kernel[kh // 2, kw // 2] = same_group / same_group.sum(axis=0, keepdims=True)
            return jnp.asarray(kernel)
        if names[-1] == "kernel":  # head: class 0 <- even channels, class 1 <- odd channels
            return jnp.asarray((np.arange(leaf.shape[0])[:, None] % 2 == np.arange(2)[None]).astype(np.float32))
        if names[-1] in ("scale", "var"):  # BatchNorm as the identity
            return jnp.ones_like(leaf)
        return jnp.zeros_like(leaf)  # BatchNorm bias and mean, head bias

    return model, jax.tree_util.tree_map_with_path(rewrite, variables)


def test_grad_cam_highlights_the_region_a_logit_depends_on():
    model, variables = two_region_model()
    images = np.zeros((1, 32, 32, 3), np.float32)
    images[0, 4:12, 4:12, 0] = 4.0  # channel 0 (class 0's evidence, shared with the empty channel 2): top-left
    images[0, 20:28, 18:28, 1] = 1.0  # channel 1 (class 1's evidence): bottom-right, weaker
    top_left = (slice(4, 12), slice(4, 12))
    bottom_right = (slice(20, 28), slice(18, 28))

    cam = grad_cam(model, variables, images)  # the top class: the stronger top-left evidence
    assert cam.class_index.tolist() == [0] and cam.logits[0, 0] > cam.logits[0, 1] > 0
    for target, inside, outside in [(0, top_left, bottom_right), (1, bottom_right, top_left)]:
        heat = grad_cam(model, variables, images, class_index=target).maps[0]
        assert heat[inside].mean() > 0.5, (target, heat[inside].mean())
        assert heat[outside].max() < 0.05, (target, heat[outside].max())
        peak = np.unravel_index(np.argmax(heat), heat.shape)
        assert inside[0].start <= peak[0] < inside[0].stop and inside[1].start <= peak[1] < inside[1].stop
    # Only the logit's region matters: changing the other region leaves class 0's map as it is.
    changed = images.copy()
    changed[0, 20:28, 18:28, 1] = 0.3
    changed_cam = grad_cam(model, variables, changed, class_index=0)
    np.testing.assert_allclose(changed_cam.maps, cam.maps, atol=1e-6)
    np.testing.assert_allclose(changed_cam.logits[:, 0], cam.logits[:, 0], rtol=1e-6)
    assert changed_cam.logits[0, 1] < cam.logits[0, 1]


def test_grad_cam_rejects_a_bad_class_or_layer():
    model, variables, images = tiny_model(None)
    with pytest.raises(ValueError, match=r"class_index must be in \[0, 4\)"):
        grad_cam(model, variables, images, class_index=4)
    with pytest.raises(ValueError, match="no module 'layer9_0'"):
        grad_cam(model, variables, images, layer="layer9_0")
    headless = ResNet(**{**TINY, "num_classes": 0})
    with pytest.raises(ValueError, match="classification head"):
        grad_cam(headless, {}, images)


# ---- the other families: ResNeXt and Wide ResNet (options of ResNet), MobileNet -----------------------

# MobileNet v1's units per stage (Howard et al., Table 1): 1, 2, 2, 6, 2; each has an attention module
# after its depthwise conv ('/dw') and one after its pointwise conv ('/pw').
MOBILENET_UNITS = (1, 2, 2, 6, 2)
MOBILENET_MAPS = [f"stage{s}_{u}/{site}" for s, n in enumerate(MOBILENET_UNITS, 1) for u in range(n)
                  for site in ("dw", "pw")]


def test_map_names_order_and_grad_cam_blocks_of_every_family():
    mobilenet = create_model("cbam_mobilenet_w7d10")
    assert block_names(mobilenet) == [f"stage{s}_{u}" for s, n in enumerate(MOBILENET_UNITS, 1) for u in range(n)]
    assert last_block_name(mobilenet) == "stage5_1"
    assert last_block_name(create_model("resnext101_32x8d")) == "layer4_2"
    wide = create_model("cbam_wide_resnet18_2")
    assert block_names(wide) == [f"layer{s}_{b}" for s in (1, 2, 3, 4) for b in (0, 1)]
    shuffled = list(np.random.default_rng(0).permutation(MOBILENET_MAPS))
    assert sorted(shuffled, key=module_order) == MOBILENET_MAPS  # dw before pw, units and stages in order
    assert sorted(["bam2", "layer3_0", "layer2_1", "bam1", "layer1_0"], key=module_order) == [
        "layer1_0", "bam1", "layer2_1", "bam2", "layer3_0"]
    assert [stage_of(n) for n in ("stage4_5/pw", "stage1_0/dw", "layer2_1", "bam3")] == [4, 1, 2, 3]
    with pytest.raises(ValueError, match="ResNet or MobileNet"):
        block_names(nn.Dense(3))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward_capturing(model, variables, images, block):
    """Logits, {path of each attention module: the input it receives} and the output of `block`, from
    one eval-mode forward pass (method interception; independent of cbam_jax.visualize)."""
    inputs = {}

    def record(call, args, kwargs, context):
        path = context.module.scope.path if context.module.scope is not None else ()
        if context.method_name == "__call__" and path[-1:] in (("attention",), ("dw_attention",), ("pw_attention",)):
            inputs["/".join(path)] = args[0]
        return call(*args, **kwargs)

    with nn.intercept_methods(record):
        logits, state = model.apply(variables, images, mutable=["intermediates"], capture_intermediates=(
            lambda module, method: method == "__call__" and module.scope.path == (block,)))
    return logits, inputs, state["intermediates"][block]["__call__"][0]


def official_cbam_maps(x, params, stats):
    """The official CBAM's channel map (B, C) and spatial map (B, H, W) for its input x (NumPy,
    tests/numpy_reference.py): the spatial gate sees the channel-gated input."""
    channel = ref.sigmoid(ref.channel_logits(x, params["channel"]["fc1"]["kernel"], params["channel"]["fc2"]["kernel"],
                                             params["channel"]["fc1"]["bias"], params["channel"]["fc2"]["bias"]))
    bn = (params["spatial"]["bn"]["scale"], params["spatial"]["bn"]["bias"], stats["spatial"]["bn"]["mean"],
          stats["spatial"]["bn"]["var"])
    spatial = ref.sigmoid(ref.spatial_logits(x * channel, params["spatial"]["conv"]["kernel"], "max_mean", bn))
    return channel[:, 0, 0, :], spatial[..., 0]


def _attention_path(name):
    """'stage2_0/dw' -> 'stage2_0/dw_attention' (a MobileNet unit's modules); 'layer1_0' -> 'layer1_0/attention'."""
    return f"{name}_attention" if "/" in name else f"{name}/attention"


def _check_maps_and_grad_cam(model, expected_maps, expected_last):
    """Every attention map against NumPy from the input its module receives, and Grad-CAM at the last
    block against ReLU(A . w_c) / max (a pooled linear head: Zhou et al.'s CAM, as the ResNet test)."""
    images = jax.random.normal(jax.random.key(0), (2, 20, 28, 3))  # non-square
    variables = randomize(jax.eval_shape(model.init, jax.random.key(1), images))
    assert last_block_name(model) == expected_last
    logits, inputs, features = _forward_capturing(model, variables, images, expected_last)
    maps = attention_maps(model, variables, images, resize=False)
    assert list(maps) == expected_maps
    params, stats = to_numpy(variables["params"]), to_numpy(variables["batch_stats"])
    contrast = []
    for name, entry in maps.items():
        path = _attention_path(name).split("/")
        channel, spatial = official_cbam_maps(np.asarray(inputs["/".join(path)], np.float64),
                                              functools.reduce(dict.get, path, params),
                                              functools.reduce(dict.get, path, stats))
        np.testing.assert_allclose(entry["channel"], channel, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(entry["spatial"], spatial, atol=1e-5, err_msg=name)
        contrast.append(np.ptp(spatial))
    assert np.median(contrast) > 0.1  # maps with contrast, not saturated constants

    cam = grad_cam(model, variables, images, class_index=[1, 3], resize=False)
    np.testing.assert_allclose(cam.logits, logits, atol=1e-5)
    kernel = np.asarray(variables["params"]["fc"]["kernel"], np.float64)
    for i, target in enumerate([1, 3]):
        expected = np.maximum(np.asarray(features[i], np.float64) @ kernel[:, target], 0)
        np.testing.assert_allclose(cam.maps[i], expected / expected.max(), atol=1e-5)


def test_resnext_maps_and_grad_cam_against_a_direct_computation():
    """A CBAM-ResNeXt-50 (grouped 3x3 convs) shortened to two stages of one block."""
    model = create_model("cbam_resnext50_32x4d", num_classes=4, stem="cifar", width=16, reduction=4)
    _check_maps_and_grad_cam(model.clone(stage_sizes=(1, 1)), ["layer1_0", "layer2_0"], "layer2_0")


@pytest.mark.slow  # three compilations of the 13-unit MobileNet (about 12 s on two busy cores)
def test_mobilenet_maps_and_grad_cam_against_a_direct_computation():
    """Both attention modules of every unit (after the depthwise and after the pointwise conv), each under
    its own name, and Grad-CAM at the last unit's output, the feature map the global pool averages."""
    model = create_model("cbam_mobilenet_w1", num_classes=4, stem="cifar", width=8, reduction=4)
    _check_maps_and_grad_cam(model, MOBILENET_MAPS, "stage5_1")

def test_color_scale_and_figure():
    scale = colorize(np.linspace(0, 1, 50))
    assert scale.shape == (50, 3) and scale.dtype == np.uint8
    assert (scale[0] != scale[-1]).any() and scale[0].sum() < 200  # dark low end
    model, variables, images = tiny_model("cbam")
    maps = attention_maps(model, variables, images)
    picture = np.zeros((20, 28, 3), np.uint8)
    one = {name: {kind: value[0] for kind, value in entry.items()} for name, entry in maps.items()}
    small = attention_figure(picture, one, grad_cam(model, variables, images).maps[0], "class 1 (p=0.30)")
    large = attention_figure(picture, one, np.zeros((20, 28)), "class 1", all_blocks=True, footer="a\nb")
    assert small.mode == "RGB" and large.height > small.height
    assert small.width == large.width  # one column each for input, Grad-CAM and the two stages


# ---- the command ------------------------------------------------------------------------------

METADATA = {"class_names": ["a", "b", "c", "d"],
            "preprocessing": {"resize": 36, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3}}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    model = ResNet(**TINY, attention="cbam", attention_options=ATTENTION["cbam"])
    variables = randomize(jax.eval_shape(model.init, jax.random.key(3), jnp.zeros((1, 32, 32, 3))))
    return save_pretrained(tmp_path_factory.mktemp("models") / "tiny_cbam", model, variables, metadata=METADATA)


def write_photo(path, height=40, width=50, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_attention_cli_writes_a_figure_per_image(pretrained, tmp_path, capsys):
    images = [write_photo(tmp_path / "one.png"), write_photo(tmp_path / "two.jpg", 60, 45, seed=1)]
    sub = tmp_path / "sub"
    sub.mkdir()
    images.append(write_photo(sub / "one.png", seed=2))  # same name, other folder
    out = tmp_path / "figures"
    assert main(["attention", "--pretrained", str(pretrained), "--out", str(out), "--class-index", "2",
                 "--all-blocks", "--batch-size", "1", *images]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["one_2_attention.png", "one_attention.png", "two_attention.png"]
    for name in written:
        with Image.open(out / name) as figure:
            figure.verify()  # a complete, valid PNG
        with Image.open(out / name) as figure:
            assert figure.format == "PNG" and figure.width > 4 * 224 and figure.height > 224
    assert capsys.readouterr().out.count("Grad-CAM class: c (p=") == 3


def test_attention_cli_reports_bad_input_and_still_processes_the_rest(pretrained, tmp_path, capsys):
    good = write_photo(tmp_path / "good.png")
    (tmp_path / "data.png").write_bytes(b"\x00" * 100)
    out = tmp_path / "figures"
    code = main(["attention", "--pretrained", str(pretrained), "--out", str(out), str(tmp_path / "missing.jpg"),
                 str(tmp_path / "data.png"), good])
    captured = capsys.readouterr()
    assert code == 1
    assert [p.name for p in out.iterdir()] == ["good_attention.png"]
    assert "missing.jpg: no such file" in captured.err and "data.png: not an image" in captured.err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["attention", "--pretrained", str(empty), "--out", str(out), good]) == 2
    assert "no cbam-jax model could be loaded" in capsys.readouterr().err
    assert main(["attention", "--pretrained", str(pretrained), "--out", str(out), "--class-index", "7", good]) == 2
    assert "--class-index must be in [0, 4)" in capsys.readouterr().err
    assert main(["attention", "--pretrained", str(pretrained), "--out", str(out), "--grad-cam-block", "layer9_0",
                 good]) == 2
    assert "--grad-cam-block must be one of this model's blocks" in capsys.readouterr().err
    assert main(["attention", "--pretrained", str(pretrained), "--out", str(tmp_path / "early"),
                 "--grad-cam-block", "layer1_0", good]) == 0
    assert "Grad-CAM class:" in capsys.readouterr().out and (tmp_path / "early" / "good_attention.png").exists()


@pytest.mark.slow  # compiles a 13-unit MobileNet's maps and Grad-CAM (twice: two Grad-CAM blocks)
def test_attention_cli_takes_a_mobilenet(tmp_path, capsys):
    model = create_model("cbam_mobilenet_w1", num_classes=4, stem="cifar", width=8, reduction=4)
    variables = randomize(jax.eval_shape(model.init, jax.random.key(3), jnp.zeros((1, 32, 32, 3))))
    path = str(save_pretrained(tmp_path / "mobilenet", model, variables, metadata=METADATA))
    photo = write_photo(tmp_path / "photo.png")
    out = tmp_path / "figures"
    assert main(["attention", "--pretrained", path, "--out", str(out), "--all-blocks", photo]) == 0
    assert "Grad-CAM class:" in capsys.readouterr().out
    with Image.open(out / "photo_attention.png") as figure:
        # The widest row is stage 4's: six units, a panel for each of their two attention modules.
        assert figure.width > 12 * 224 and figure.height > 6 * 224
    assert main(["attention", "--pretrained", path, "--out", str(out), "--grad-cam-block", "layer4_1", photo]) == 2
    assert "this model's blocks (stage1_0 ... stage5_1); got 'layer4_1'" in capsys.readouterr().err
    assert main(["attention", "--pretrained", path, "--out", str(out), "--grad-cam-block", "stage4_5", photo]) == 0
