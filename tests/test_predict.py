"""`cbam-jax predict` and the image loading/preprocessing it shares with `cbam-jax attention`."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from cbam_jax.cli import main
from cbam_jax.predict import InputError, Preprocessing, load_image, preprocess, resize_and_crop, to_model_channels
from cbam_jax.pretrained import save_pretrained
from cbam_jax.resnet import ResNet
from tests.helpers import randomize

IMAGENET = {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
SMALL = {"resize": 40, "crop": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
CLASS_NAMES = ["cat", "dog", "owl", "fox", "eel", "yak"]


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB uint8 picture (smooth, so that JPEG keeps it close)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny CBAM-ResNet saved with class names and a small preprocessing, and a perturbed head
    so that the classes are well separated."""
    model = ResNet(stage_sizes=(1, 1), block="basic", width=8, stem="cifar", num_classes=len(CLASS_NAMES),
                   attention="cbam", attention_options={"reduction": 4})
    variables = randomize(jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))
    variables["params"]["fc"]["kernel"] = variables["params"]["fc"]["kernel"] * 20.0
    path = save_pretrained(tmp_path_factory.mktemp("models") / "tiny", model, variables,
                           metadata={"class_names": CLASS_NAMES, "preprocessing": SMALL})
    return path, model, variables


def reference_input(path, spec) -> np.ndarray:
    """Preprocessing written out step by step with PIL and numpy, independent of cbam_jax.predict."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    scale = spec["resize"] / min(width, height)
    size = (spec["resize"], int(height * scale)) if width <= height else (int(width * scale), spec["resize"])
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = round((size[0] - spec["crop"]) / 2), round((size[1] - spec["crop"]) / 2)
    array = np.asarray(image.crop((left, top, left + spec["crop"], top + spec["crop"])), np.float32) / 255
    return (array - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)


# ---- loading images ---------------------------------------------------------------------------

def test_load_image_turns_every_mode_into_rgb(tmp_path):
    grey = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    np.testing.assert_array_equal(load_image(tmp_path / "grey.png"), np.repeat(grey[..., None], 3, -1))

    deep = (grey.astype(np.uint16) * 257)  # 16-bit greyscale PNG with the same levels
    Image.fromarray(deep).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    np.testing.assert_array_equal(load_image(tmp_path / "grey16.png"), np.repeat(grey[..., None], 3, -1))

    rgba = np.zeros((6, 10, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:, :5, 3] = 255  # left half opaque, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    loaded = load_image(tmp_path / "rgba.png")
    assert loaded.shape == (6, 10, 3) and loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded[:, :5], np.broadcast_to([10, 20, 30], (6, 5, 3)))
    np.testing.assert_array_equal(loaded[:, 5:], np.full((6, 5, 3), 255))  # over white

    picture = photo(30, 40)
    Image.fromarray(picture).save(tmp_path / "photo.jpg", quality=95)
    assert np.abs(load_image(tmp_path / "photo.jpg").astype(int) - picture).mean() < 3
    Image.fromarray(picture).convert("P").save(tmp_path / "palette.png")
    assert load_image(tmp_path / "palette.png").shape == (30, 40, 3)


def test_load_image_errors_name_the_file_and_the_problem(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    Image.fromarray(photo(64, 64)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    cases = {tmp_path / "missing.jpg": "no such file", tmp_path: "is a directory",
             tmp_path / "notes.png": "not an image", tmp_path / "cut.png": "cannot be decoded"}
    for path, message in cases.items():
        with pytest.raises(InputError, match=message) as error:
            load_image(path)
        assert str(path) in str(error.value)


# ---- preprocessing ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(427, 640), (300, 200), (224, 224)])
def test_preprocess_is_resize_short_side_center_crop_normalize(tmp_path, shape):
    Image.fromarray(photo(*shape)).save(tmp_path / "image.png")
    result = preprocess(load_image(tmp_path / "image.png"), Preprocessing.from_dict(IMAGENET))
    assert result.shape == (224, 224, 3) and result.dtype == np.float32
    np.testing.assert_allclose(result, reference_input(tmp_path / "image.png", IMAGENET), atol=1e-6)


def test_preprocess_matches_torchvision(tmp_path):
    transforms = pytest.importorskip("torchvision.transforms")
    pytest.importorskip("torch")
    image = Image.fromarray(photo(333, 517, seed=3))
    pipeline = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize(IMAGENET["mean"], IMAGENET["std"])])
    expected = pipeline(image).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(preprocess(np.asarray(image), Preprocessing.from_dict(IMAGENET)), expected, atol=1e-5)


def test_crop_larger_than_image_pads_with_zeros():
    result = resize_and_crop(np.full((10, 20, 3), 200, np.uint8), Preprocessing(None, 16, (0, 0, 0), (1, 1, 1)))
    assert result.shape == (16, 16, 3)
    assert (result[:3] == 0).all() and (result[13:] == 0).all() and (result[3:13] == 200).all()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("resize", [20, [16, 16]])
def test_geometry_equals_the_training_eval_transform(rng, channels, resize):
    from cbam_jax.data import ArraySource, eval_batches
    from cbam_jax.training.config import base_config

    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    preprocessing = Preprocessing.from_dict({"resize": resize, "crop": 16, "mean": [0.5] * channels,
                                             "std": [0.5] * channels, "channels": channels})
    ours = resize_and_crop(to_model_channels(image, preprocessing), preprocessing)
    dataset = base_config().dataset
    dataset.update(image_size=16, channels=channels, eval_resize=0 if isinstance(resize, list) else resize,
                   mean=(0.5,) * channels, std=(0.5,) * channels, num_threads=1)
    training = next(eval_batches(ArraySource(image[None], np.zeros(1)), dataset, global_batch=1))["image"][0]
    assert ours.shape == (16, 16, channels)
    np.testing.assert_array_equal(ours, training)


@pytest.mark.parametrize("values, message", [
    ({"resize": 256, "crop": 224, "mean": [0.5] * 3}, "lacks \\['std'\\]"),
    ({**IMAGENET, "crop": -1}, "crop must be a positive integer"),
    ({**IMAGENET, "mean": [0.5, 0.5]}, "mean must be three numbers"),
    ({**IMAGENET, "std": [0.2, 0.0, 0.2]}, "std must be positive"),
    ({**IMAGENET, "channels": 1}, "mean must be one number \\(grey"),
    ({**IMAGENET, "channels": 2}, "channels must be 1 \\(greyscale\\) or 3"),
    ({**IMAGENET, "resize": [8, 0]}, "pair \\[height, width\\]"),
])
def test_bad_preprocessing_is_rejected(values, message):
    with pytest.raises(InputError, match=message):
        Preprocessing.from_dict(values)


# ---- the command ------------------------------------------------------------------------------

def test_predict_cli_equals_a_direct_apply(pretrained, tmp_path, capsys):
    path, model, variables = pretrained
    images = []
    for seed, shape in enumerate([(48, 64), (64, 40), (50, 50)]):
        images.append(tmp_path / f"image{seed}.png")
        Image.fromarray(photo(*shape, seed=seed)).save(images[-1])
    assert main(["predict", "--pretrained", str(path), "--json", "--top-k", "3", "--batch-size", "2",
                 *map(str, images)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == list(map(str, images))

    logits = jax.jit(model.apply)(variables, np.stack([reference_input(p, SMALL) for p in images]))
    probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
    for line, probs in zip(lines, probabilities):
        expected = np.argsort(-probs)[:3]
        assert [entry["index"] for entry in line["top_k"]] == expected.tolist()
        assert [entry["class"] for entry in line["top_k"]] == [CLASS_NAMES[i] for i in expected]
        np.testing.assert_allclose([entry["probability"] for entry in line["top_k"]], probs[expected], atol=1e-5)


def test_predict_cli_reports_bad_images_and_still_processes_the_rest(pretrained, tmp_path, capsys):
    path, _, _ = pretrained
    good = tmp_path / "good.png"
    Image.fromarray(photo(40, 40)).save(good)
    (tmp_path / "text.jpg").write_text("hello")
    code = main(["predict", "--pretrained", str(path), str(tmp_path / "missing.png"), str(tmp_path / "text.jpg"),
                 str(good)])
    captured = capsys.readouterr()
    assert code == 1
    assert str(good) in captured.out and "1. " in captured.out
    assert "missing.png: no such file" in captured.err and "text.jpg: not an image" in captured.err
    assert "2 of 3 image(s)" in captured.err


def test_predict_cli_without_a_model_explains_and_fails(tmp_path, capsys):
    image = tmp_path / "image.png"
    Image.fromarray(photo(40, 40)).save(image)
    empty = tmp_path / "empty"
    empty.mkdir()
    for directory, message in [(empty, "no cbam-jax model could be loaded"), (tmp_path / "nowhere", "no existing directory")]:
        assert main(["predict", "--pretrained", str(directory), str(image)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(directory) in err and "cbam-jax convert" in err


def test_predict_cli_needs_recorded_or_given_preprocessing(pretrained, tmp_path, capsys):
    _, model, variables = pretrained
    path = save_pretrained(tmp_path / "bare", model, variables)  # no metadata
    image = tmp_path / "image.png"
    Image.fromarray(photo(20, 30)).save(image)
    assert main(["predict", "--pretrained", str(path), str(image)]) == 2
    assert "records no preprocessing" in capsys.readouterr().err
    assert main(["predict", "--pretrained", str(path), "--resize", "40", "--crop", "32", "--mean", "0.5", "0.5", "0.5",
                 "--std", "0.25", "0.25", "0.25", str(image)]) == 0
    assert "class 0" in capsys.readouterr().out  # no class names saved: numbered classes
