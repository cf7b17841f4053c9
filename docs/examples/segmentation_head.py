"""A CBAM-ResNet as a segmentation backbone: a small FPN-style head on its multi-scale features.

    python docs/examples/segmentation_head.py                          # offline, synthetic shapes, ~30 s on a CPU
    python docs/examples/segmentation_head.py --backbone cbam_resnet50 # published ImageNet weights (downloads once)

The backbone is `create_model(..., features_only=True, out_indices=(1, 2, 3))`: three NHWC maps at
strides 4, 8 and 16 (`backbone.feature_info` says their channels). The head projects each to a common
width, upsamples and sums them (coarse to fine), and predicts a class per pixel; backbone and head train
together with Adam on images of random rectangles and discs (classes: background, rectangle, disc).
With --backbone, the backbone starts from pretrained weights (a registry name, `hf-hub:` id, directory
or PyTorch checkpoint; `cbam_jax.init_from`).
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from cbam_jax import create_model
from cbam_jax.factory import init_from

NUM_CLASSES = 3  # background, rectangle, disc


def synthetic_batch(rng: np.random.Generator, batch: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy RGB images (B, size, size, 3) with one rectangle and one disc each, and their masks (B, size, size)."""
    images = rng.normal(0.0, 0.3, (batch, size, size, 3)).astype(np.float32)
    masks = np.zeros((batch, size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    for i in range(batch):
        top, left = rng.integers(0, size // 2, 2)
        height, width = rng.integers(size // 6, size // 2, 2)
        masks[i, top:top + height, left:left + width] = 1
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(size // 8, size // 4) ** 2] = 2
        for label in (1, 2):
            images[i][masks[i] == label] += rng.uniform(-1, 1, 3)  # a random colour per shape
    return images, masks


class SegmentationHead(nn.Module):
    """Feature maps (coarse to fine strides) -> per-pixel logits (B, H, W, num_classes) at `output_size`."""

    num_classes: int
    width: int = 32

    @nn.compact
    def __call__(self, features: list[jax.Array], output_size: tuple[int, int]) -> jax.Array:
        x = None
        for level, feature in reversed(list(enumerate(features))):  # coarsest first
            lateral = nn.Conv(self.width, (1, 1), name=f"lateral{level}")(feature.astype(jnp.float32))
            if x is not None:
                x = jax.image.resize(x, lateral.shape, "bilinear")
                lateral = lateral + x
            x = lateral
        x = nn.relu(nn.Conv(self.width, (3, 3), padding=1, name="smooth")(x))
        x = nn.Conv(self.num_classes, (1, 1), name="classify")(x)
        return jax.image.resize(x, (x.shape[0], *output_size, self.num_classes), "bilinear")


class Segmenter(nn.Module):
    backbone: nn.Module
    head: nn.Module

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        return self.head(self.backbone(images, train=train), images.shape[1:3])


def mean_iou(logits: jax.Array, masks: np.ndarray) -> float:
    predicted = np.asarray(jnp.argmax(logits, -1))
    ious = [np.sum((predicted == c) & (masks == c)) / max(1, np.sum((predicted == c) | (masks == c)))
            for c in range(NUM_CLASSES)]
    return float(np.mean(ious))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", help="pretrained weights for the backbone (default: random init)")
    parser.add_argument("--arch", default="cbam_resnet18")
    parser.add_argument("--width", type=int, default=16, help="backbone width (64 for the standard models)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)

    width = 64 if args.backbone else args.width
    backbone = create_model(args.arch, width=width, features_only=True, out_indices=(1, 2, 3))
    print("backbone features:", ", ".join(f"{f.module}: {f.channels} ch, stride {f.reduction}"
                                          for f in backbone.feature_info))
    model = Segmenter(backbone, SegmentationHead(NUM_CLASSES))
    rng = np.random.default_rng(0)
    images, masks = synthetic_batch(rng, args.batch, args.size)
    variables = model.init(jax.random.key(0), images)
    if args.backbone:
        backbone_variables, report = init_from(args.backbone, backbone)
        print(f"backbone from {args.backbone}: {report.summary()}")
        for collection in ("params", "batch_stats"):
            variables[collection]["backbone"] = backbone_variables[collection]
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(params, batch_stats, opt_state, images, masks):
        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                          mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, masks).mean(), updates["batch_stats"]
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    evaluate = jax.jit(lambda params, batch_stats, images: model.apply(
        {"params": params, "batch_stats": batch_stats}, images))
    test_images, test_masks = synthetic_batch(np.random.default_rng(1), 32, args.size)
    before = mean_iou(evaluate(params, batch_stats, test_images), test_masks)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        images, masks = synthetic_batch(rng, args.batch, args.size)
        params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state, images, masks)
        if step % 50 == 0 or step == 1:
            print(f"step {step:4d}  loss {float(loss):.3f}")
    after = mean_iou(evaluate(params, batch_stats, test_images), test_masks)
    print(f"mean IoU on held-out images: {before:.3f} before, {after:.3f} after {args.steps} steps "
          f"({time.perf_counter() - start:.1f} s)")
    return {"loss": float(loss), "miou_before": before, "miou_after": after}


if __name__ == "__main__":
    main()
