"""Data: the embedded digits, the grain training stream (determinism, resume, per-process slices),
padded evaluation, transforms, an image folder and tfds mock data for cifar10/imagenet2012."""

import os
import warnings

import numpy as np
import pytest
from PIL import Image

from cbam_jax.data import (ArraySource, ImageFolderSource, digits_source, eval_batches, eval_preprocessing, tfds_source,
                           train_dataset)
from cbam_jax.data import transforms
from cbam_jax.images import ensure_channels, resize_and_crop
from cbam_jax.training.config import base_config


def dataset_config(**changes):
    config = base_config().dataset
    config.num_threads = 1
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def test_digits_split_is_fixed_disjoint_and_real():
    train, test = digits_source("train"), digits_source("test")
    assert len(train) + len(test) == 1797 and 350 <= len(test) <= 370
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (8, 8, 1)
    assert np.bincount(test.labels).min() >= 30  # stratified: every digit in the test split
    train_rows = {row.tobytes() for row in train.images}
    assert sum(row.tobytes() in train_rows for row in test.images) < 5  # (a few duplicate digits exist)
    np.testing.assert_array_equal(digits_source("test").images, test.images)
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        digits_source("validation")


def test_train_stream_is_deterministic_and_resumes_exactly():
    source = digits_source("train")
    config = dataset_config(flip=True)
    straight = iter(train_dataset(source, config, global_batch=32, seed=3))
    expected = [next(straight) for _ in range(6)]
    first = iter(train_dataset(source, config, global_batch=32, seed=3))
    for _ in range(3):
        next(first)
    state = first.get_state()
    resumed = iter(train_dataset(source, config, global_batch=32, seed=3))
    resumed.set_state(state)
    for batch in expected[3:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], batch["image"])
        np.testing.assert_array_equal(got["label"], batch["label"])
    other_seed = next(iter(train_dataset(source, config, global_batch=32, seed=4)))
    assert not np.array_equal(other_seed["label"], expected[0]["label"])


def test_epochs_are_reshuffled_and_processes_read_disjoint_slices():
    source = ArraySource(np.arange(24, dtype=np.uint8).reshape(24, 1, 1, 1).repeat(8, 1).repeat(8, 2), np.arange(24))
    config = dataset_config(train_augment="none")
    stream = iter(train_dataset(source, config, global_batch=8, seed=0))
    epoch1 = np.concatenate([next(stream)["label"] for _ in range(3)])
    epoch2 = np.concatenate([next(stream)["label"] for _ in range(3)])
    assert sorted(epoch1) == list(range(24)) and sorted(epoch2) == list(range(24))
    assert not np.array_equal(epoch1, epoch2)
    # Two processes read the two halves of each global batch of the single-process stream.
    streams = [iter(train_dataset(source, config, global_batch=8, seed=0, process_index=i, process_count=2))
               for i in range(2)]
    together = np.concatenate([np.concatenate([next(stream)["label"] for stream in streams]) for _ in range(3)])
    np.testing.assert_array_equal(together, epoch1)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        train_dataset(source, config, global_batch=8, seed=0, process_count=3)


@pytest.mark.parametrize("size, batch, processes", [(37, 8, 1), (37, 8, 2), (5, 16, 1), (10, 6, 3)])
def test_eval_counts_every_example_exactly_once(size, batch, processes):
    source = ArraySource(np.zeros((size, 8, 8, 1), np.uint8), np.arange(size))
    seen, batch_counts = [], []
    for process in range(processes):
        batches = list(eval_batches(source, dataset_config(), global_batch=batch, process_index=process,
                                    process_count=processes))
        batch_counts.append(len(batches))
        for item in batches:
            assert item["image"].shape == (batch // processes, 8, 8, 1)
            seen.extend(item["label"][item["mask"]].tolist())
    assert sorted(seen) == list(range(size))
    assert len(set(batch_counts)) == 1  # every process runs the same number of steps


def test_transforms_shapes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)
    assert transforms.random_resized_crop(image, rng, 24).shape == (24, 24, 3)
    for eval_resize in (28, 0):
        preprocessing = eval_preprocessing(dataset_config(image_size=24, eval_resize=eval_resize))
        assert resize_and_crop(image, preprocessing).shape == (24, 24, 3)
    crop = transforms.pad_crop(image[:16, :16], rng, 16, 4)
    assert crop.shape == (16, 16, 3)
    flips = [transforms.maybe_flip(image, np.random.default_rng(seed)) for seed in range(20)]
    mirrored = [np.array_equal(f, image[:, ::-1]) for f in flips]
    assert all(m or np.array_equal(f, image) for m, f in zip(mirrored, flips)) and 0 < sum(mirrored) < 20
    assert ensure_channels(image[..., :1], 3).shape == (50, 80, 3)
    assert ensure_channels(image, 1).shape == (50, 80, 1)


def _write_folder(root, bad: bool):
    rng = np.random.default_rng(0)
    for label, name in enumerate(["cat", "dog"]):
        os.makedirs(os.path.join(root, "train", name))
        for index in range(3):
            size = (20 + 5 * index, 30)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
                os.path.join(root, "train", name, f"{index}.png"))
    with open(os.path.join(root, "train", "cat", "notes.txt"), "w") as f:
        f.write("not an image, ignored")
    if bad:
        with open(os.path.join(root, "train", "dog", "broken.jpg"), "wb") as f:
            f.write(b"this is not a jpeg")


def test_image_folder_source_and_pipeline(tmp_path):
    _write_folder(tmp_path, bad=False)
    source = ImageFolderSource(str(tmp_path / "train"))
    assert source.classes == ["cat", "dog"] and len(source) == 6
    config = dataset_config(channels=3, mean=(0.5,) * 3, std=(0.5,) * 3, image_size=16,
                            train_augment="random_resized_crop", flip=True)
    batch = next(iter(train_dataset(source, config, global_batch=4, seed=0)))
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
    evaluated = list(eval_batches(source, config, global_batch=4))
    assert sum(int(b["mask"].sum()) for b in evaluated) == 6
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderSource(str(tmp_path / "nope"))


def test_image_folder_unreadable_image(tmp_path):
    _write_folder(tmp_path, bad=True)
    source = ImageFolderSource(str(tmp_path / "train"))
    broken = [i for i, (path, _) in enumerate(source.files) if path.endswith("broken.jpg")]
    with pytest.raises(ValueError, match="broken.jpg.*verify_images"):
        source[broken[0]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        verified = ImageFolderSource(str(tmp_path / "train"), verify=True)
    assert len(verified) == 6 and any("broken.jpg" in str(w.message) for w in caught)


@pytest.mark.parametrize("name, augment, resize", [("cifar10", "pad_crop", 0), ("imagenet2012", "random_resized_crop", 40)])
def test_tfds_mock_data(name, augment, resize):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = dataset_config(source="tfds", name=name, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3, image_size=32,
                            train_augment=augment, crop_padding=4, flip=True, eval_resize=resize)
    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        source = tfds_source(name, "train")
        batch = next(iter(train_dataset(source, config, global_batch=4, seed=0)))
        assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].shape == (4,)
        evaluated = list(eval_batches(tfds_source(name, "train"), config, global_batch=4))
        assert sum(int(b["mask"].sum()) for b in evaluated) == len(source)


def test_missing_tfds_dataset_says_how_to_prepare(tmp_path, capfd):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match="download_and_prepare") as caught:
        tfds_source("cifar10", "train", data_dir=str(tmp_path))
    cause = caught.value.__cause__
    # The cause is tfds finding no prepared data in tmp_path, not an unrelated failure on the way
    # (an import error of a download dependency once passed this test).
    assert not isinstance(cause, ImportError) and str(tmp_path / "cifar10") in str(cause), repr(cause)
    assert list(tmp_path.iterdir()) == []  # opened without downloading or preparing anything
    assert "Downloading" not in capfd.readouterr().out


def test_data_that_does_not_fit_the_config_is_refused_with_numbers(tmp_path):
    from cbam_jax.data.pipeline import check_source

    dataset = base_config().dataset  # the digits: 10 classes
    images = np.zeros((6, 8, 8, 1), np.uint8)
    check_source(ArraySource(images, np.arange(6)), dataset, "train")
    with dataset.unlocked():
        dataset.num_classes = 5
    with pytest.raises(ValueError, match=r"labels outside \[0, 5\) \(e.g. 5 and 5, 1 of 6 read\).*num_classes=6"):
        check_source(ArraySource(images, np.arange(6)), dataset, "train")
    with pytest.raises(ValueError, match=r"labels outside \[0, 5\) \(e.g. -1"):
        check_source(ArraySource(images, np.array([0, 1, 2, 3, 4, -1])), dataset, "train")
    with pytest.raises(ValueError, match="has no examples"):
        check_source(ArraySource(images[:0], np.arange(0)), dataset, "test")
    with pytest.raises(ValueError, match=r"shape \(8, 8, 2\)"):
        check_source(ArraySource(np.zeros((2, 8, 8, 2), np.uint8), np.arange(2)), dataset, "train")
    for name in ("a", "b", "c", "d", "e", "f"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name / "x.png")
    with pytest.raises(ValueError, match="6 class folders but config.dataset.num_classes = 5"):
        check_source(ImageFolderSource(str(tmp_path), channels=1), dataset, "train")
