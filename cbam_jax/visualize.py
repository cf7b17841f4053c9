"""What the network attends to: CBAM/BAM/SE attention maps, Grad-CAM, and figures of both.

`attention_maps` and `grad_cam` return arrays (for notebooks); `attention_figure` draws them over
the input with Pillow (no plotting library); `cbam-jax attention --pretrained DIR IMAGE... --out DIR`
writes one PNG per image.

Grad-CAM (Selvaraju et al., ICCV 2017) needs a feature map A (B, h, w, C) inside the network and
the gradient of a class logit y_c with respect to it:

    cam = ReLU( sum_k alpha_k A_k ),   alpha_k = mean over positions of d y_c / d A_k

The model is left untouched: a Flax method interceptor adds a zero array `delta` to the output of
the chosen block, so d y_c / d delta is exactly d y_c / d A.
"""

import argparse
import functools
import os
import re
import sys
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from PIL import Image, ImageDraw, ImageFont

from cbam_jax.predict import (
    InputError,
    add_preprocessing_arguments,
    load_images,
    load_model,
    normalize,
    preprocessing_overrides,
    same_shape_batches,
)

# Attention-map leaves sown by the layers (cbam_jax/layers): channel (B, C), spatial (B, H, W).
SOWN = {"channel_attention": "channel", "spatial_attention": "spatial"}
# Top-level modules of a ResNet that hold attention: per-block 'layer{S}_{B}', per-stage 'bam{S}'.
BLOCK_NAME = re.compile(r"^layer(\d+)_(\d+)$")
STAGE_NAME = re.compile(r"^bam(\d+)$")

# A perceptually ordered dark-blue -> green -> yellow -> dark-red colour scale ("turbo"-like),
# as (position, RGB) anchors linearly interpolated.
COLORMAP_ANCHORS = (
    (0.00, (48, 18, 59)), (0.14, (65, 110, 230)), (0.28, (30, 190, 230)), (0.42, (50, 240, 140)),
    (0.57, (165, 250, 55)), (0.71, (250, 190, 40)), (0.85, (235, 90, 20)), (1.00, (122, 4, 3)),
)
OVERLAY_ALPHA = 0.5
PANEL = 224  # side of a figure panel in pixels
CHART_HEIGHT = 64
FONT_SIZE = 13
MARGIN = 8
FIGURE_KEY = ("Spatial attention (last block of each stage) is stretched to its own range, given in the panel's title. "
              "Bars: channel-attention weights in channel order on a 0-1 axis (dashed: 0.5).")


def module_order(name: str) -> tuple[int, int]:
    """Network order of a top-level module name: layer{S}_{B} -> (S, B); bam{S} comes after stage S."""
    if match := BLOCK_NAME.match(name):
        return int(match[1]), int(match[2])
    if match := STAGE_NAME.match(name):
        return int(match[1]), sys.maxsize
    return sys.maxsize, 0


def stage_of(name: str) -> int:
    """The stage number S (from 1) of 'layer{S}_{B}' or 'bam{S}'."""
    return module_order(name)[0]


def _find_sown(tree: Mapping[str, Any], found: dict[str, jax.Array]) -> dict[str, jax.Array]:
    for key, value in tree.items():
        if key in SOWN:
            found[SOWN[key]] = value[-1]  # sow appends one entry per call; the model calls each layer once
        elif isinstance(value, Mapping):
            _find_sown(value, found)
    return found


def upsample(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of maps (B, h, w) to (B, *size), clipped to [0, 1] (bilinear is a convex mix)."""
    resized = jax.image.resize(maps.astype(jnp.float32), (maps.shape[0], *size), method="bilinear")
    return jnp.clip(resized, 0.0, 1.0)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _attention_maps(model: nn.Module, variables: Any, images: jax.Array, resize: bool) -> dict:
    _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    maps = {name: _find_sown(subtree, {}) for name, subtree in state.get("intermediates", {}).items()}
    if resize:
        for entry in maps.values():
            if "spatial" in entry:
                entry["spatial"] = upsample(entry["spatial"], images.shape[1:3])
    return {name: entry for name, entry in maps.items() if entry}


def attention_maps(model: nn.Module, variables: Any, images: jax.Array | np.ndarray, *,
                   resize: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """The attention maps a model computes for preprocessed images (B, H, W, Cin), in eval mode.

    Args:
      model: a `ResNet` (any attention: 'cbam', 'bam', 'se'; none gives an empty dict).
      variables: its variables ('params', 'batch_stats').
      images: preprocessed NHWC images.
      resize: upsample spatial maps bilinearly to the input size (H, W); False keeps the feature
        map's resolution.

    Returns:
      {module name: {"channel": (B, C), "spatial": (B, H, W)}} in network order, module names as
      in the parameter tree ('layer1_0' ... for per-block CBAM/SE, 'bam1' ... for BAM); SE and
      channel-only CBAM have no "spatial" entry. Values are the gates' sigmoids, in [0, 1].
    """
    maps = _attention_maps(model, variables, jnp.asarray(images), resize)
    return {name: {kind: np.asarray(value) for kind, value in maps[name].items()}
            for name in sorted(maps, key=module_order)}


def last_block_name(model: nn.Module) -> str:
    """The name of the last residual block of a ResNet, e.g. 'layer4_2' for ResNet-50."""
    stage_sizes = model.stage_sizes
    return f"layer{len(stage_sizes)}_{stage_sizes[-1] - 1}"


class GradCAM(NamedTuple):
    """Grad-CAM maps (B, H, W) in [0, 1] (each divided by its maximum), the explained class (B,) and logits (B, K)."""

    maps: np.ndarray
    class_index: np.ndarray
    logits: np.ndarray


@functools.partial(jax.jit, static_argnums=(0, 3, 5))
def _grad_cam(model: nn.Module, variables: Any, images: jax.Array, layer: str, class_index: jax.Array,
              resize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    def logits_and_features(delta: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        captured = []

        def add_delta(call, args, kwargs, context):
            out = call(*args, **kwargs)
            if context.method_name == "__call__" and context.module.scope.path == (layer,):
                out = out if delta is None else out + delta.astype(out.dtype)
                captured.append(out)
            return out

        with nn.intercept_methods(add_delta):
            logits = model.apply(variables, images, train=False)
        if len(captured) != 1:
            raise ValueError(f"grad_cam: the model has no module {layer!r} called once; "
                             f"use a block name such as {last_block_name(model)!r}.")
        return logits, captured[0]

    features_shape = jax.eval_shape(lambda: logits_and_features(None)[1])
    (logits, features), backward = jax.vjp(logits_and_features, jnp.zeros(features_shape.shape, jnp.float32))
    class_index = jnp.where(class_index < 0, jnp.argmax(logits, axis=-1), class_index)
    # Each image's logit depends only on that image (eval-mode BatchNorm), so one backward pass of
    # the sum of the chosen logits gives every image its own gradient.
    (gradients,) = backward((jax.nn.one_hot(class_index, logits.shape[-1], dtype=logits.dtype),
                             jnp.zeros_like(features)))
    features = features.astype(jnp.float32)
    weights = jnp.mean(gradients, axis=(1, 2))  # (B, C)
    cam = nn.relu(jnp.einsum("bhwc,bc->bhw", features, weights))
    peak = jnp.max(cam, axis=(1, 2), keepdims=True)
    cam = jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)
    if resize:
        cam = upsample(cam, images.shape[1:3])
    return cam, class_index, logits


def grad_cam(model: nn.Module, variables: Any, images: jax.Array | np.ndarray,
             class_index: int | Sequence[int] | np.ndarray | None = None, *, layer: str | None = None,
             resize: bool = True) -> GradCAM:
    """Grad-CAM of preprocessed images (B, H, W, Cin) at the output of one block, in eval mode.

    Args:
      model: a `ResNet` with a classification head (num_classes > 0).
      variables: its variables.
      images: preprocessed NHWC images.
      class_index: the class to explain: None (each image's top class), one int for all images, or
        one per image.
      layer: the block whose output is the feature map (default: the last block of the last stage,
        `last_block_name(model)`); any top-level block name such as 'layer3_5'.
      resize: upsample the maps bilinearly to the input size (H, W).

    Returns:
      `GradCAM(maps (B, H, W) in [0, 1], class_index (B,), logits (B, num_classes))`; a map is all
      zeros where no position has positive evidence for the class.
    """
    if getattr(model, "num_classes", 0) < 1:
        raise ValueError("grad_cam needs a model with a classification head (num_classes > 0).")
    images = jnp.asarray(images)
    batch = images.shape[0]
    if class_index is None:
        targets = np.full((batch,), -1, np.int32)
    else:
        targets = np.broadcast_to(np.asarray(class_index, np.int64), (batch,)).astype(np.int32)
        if targets.min() < 0 or targets.max() >= model.num_classes:
            raise ValueError(f"grad_cam: class_index must be in [0, {model.num_classes}); got {class_index!r}.")
    cam, classes, logits = _grad_cam(model, variables, images, layer or last_block_name(model),
                                     jnp.asarray(targets), resize)
    return GradCAM(np.asarray(cam), np.asarray(classes), np.asarray(logits))


# ---- figures (Pillow only) -------------------------------------------------------------------

def colorize(values: np.ndarray) -> np.ndarray:
    """Map values (H, W) in [0, 1] to RGB uint8 (H, W, 3) with the turbo-like colour scale."""
    positions = np.array([p for p, _ in COLORMAP_ANCHORS])
    colours = np.array([c for _, c in COLORMAP_ANCHORS], np.float64)
    values = np.clip(np.asarray(values, np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(values, positions, colours[:, i]) for i in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def overlay(image: np.ndarray, values: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend the colourised `values` (H, W) in [0, 1] over an RGB uint8 image (H, W, 3)."""
    blended = (1 - alpha) * image.astype(np.float64) + alpha * colorize(values).astype(np.float64)
    return np.round(blended).astype(np.uint8)


def stretch(values: np.ndarray) -> np.ndarray:
    """Rescale values to span [0, 1] (a constant map becomes 0.5) so that weak contrasts show."""
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-6:
        return np.full_like(values, 0.5, dtype=np.float64)
    return (values - low) / (high - low)


def channel_chart(weights: np.ndarray, width: int = PANEL, height: int = CHART_HEIGHT) -> np.ndarray:
    """A bar chart (height, width, 3) of channel weights in [0, 1], in channel order, 0.5 dashed.

    With more channels than pixel columns, each column shows the largest weight of its channels
    (light) and their mean (dark).
    """
    chart = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(chart)
    edges = np.linspace(0, len(weights), width + 1)
    for column in range(width):
        group = weights[int(edges[column]):max(int(edges[column + 1]), int(edges[column]) + 1)]
        for value, colour in ((group.max(), (150, 180, 220)), (group.mean(), (40, 80, 160))):
            top = height - 1 - int(round(float(value) * (height - 1)))
            draw.line([(column, height - 1), (column, top)], fill=colour)
    for x in range(0, width, 6):  # dashed line at 0.5, drawn over the bars
        draw.line([(x, height // 2), (x + 2, height // 2)], fill=(230, 60, 60))
    draw.rectangle([0, 0, width - 1, height - 1], outline=(120, 120, 120))
    return np.asarray(chart)


def colour_bar(width: int = PANEL, height: int = 12) -> np.ndarray:
    """The colour scale, low (left) to high (right), as an RGB strip (height, width, 3)."""
    return np.repeat(colorize(np.linspace(0, 1, width))[None], height, axis=0)


class Cell(NamedTuple):
    """One figure panel: title lines, an RGB image scaled to PANEL, and optional RGB pieces below."""

    title: list[str]
    image: np.ndarray | None
    below: list[np.ndarray]


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_grid(rows: list[list[Cell]], footer: str = "") -> Image.Image:
    """Lay cells out in rows (titles above, pieces below each image) on a white canvas."""
    font = _font()
    line_height = FONT_SIZE + 4
    title_lines = max(len(cell.title) for row in rows for cell in row)

    def cell_height(cell: Cell) -> int:
        return (title_lines * line_height + (PANEL if cell.image is not None else 0)
                + sum(piece.shape[0] + 4 for piece in cell.below))

    heights = [max(cell_height(cell) for cell in row) + MARGIN for row in rows]
    columns = max(len(row) for row in rows)
    width = MARGIN + columns * (PANEL + MARGIN)
    characters_per_line = max(20, (width - 2 * MARGIN) // 7)  # about 7 px per character at FONT_SIZE
    footer_lines = [part for line in footer.splitlines() for part in textwrap.wrap(line, characters_per_line)]
    canvas = Image.new("RGB", (width,
                               MARGIN + sum(heights) + len(footer_lines) * line_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    for row, row_height in zip(rows, heights):
        for index, cell in enumerate(row):
            x, cy = MARGIN + index * (PANEL + MARGIN), y
            for line in cell.title:
                draw.text((x, cy), line, fill=(0, 0, 0), font=font)
                cy += line_height
            cy = y + title_lines * line_height
            if cell.image is not None:
                canvas.paste(Image.fromarray(cell.image).resize((PANEL, PANEL), Image.Resampling.BILINEAR), (x, cy))
                cy += PANEL
            for piece in cell.below:
                canvas.paste(Image.fromarray(piece), (x, cy + 4))
                cy += piece.shape[0] + 4
        y += row_height
    for line in footer_lines:
        draw.text((MARGIN, y), line, fill=(60, 60, 60), font=font)
        y += line_height
    return canvas


def _attention_cell(name: str, image: np.ndarray, entry: Mapping[str, np.ndarray]) -> Cell:
    title = [name]
    picture = None
    if "spatial" in entry:
        spatial = entry["spatial"]
        title.append(f"spatial {spatial.min():.2f}-{spatial.max():.2f}")
        picture = overlay(image, stretch(spatial))
    below = []
    if "channel" in entry:
        channel = entry["channel"]
        title.append(f"channel: {channel.size} ch, mean {channel.mean():.2f}")
        below.append(channel_chart(channel))
    return Cell(title, picture, below)


def attention_figure(image: np.ndarray, maps: Mapping[str, Mapping[str, np.ndarray]], cam: np.ndarray,
                     cam_label: str, *, all_blocks: bool = False, footer: str = "") -> Image.Image:
    """A figure of one image: the input, Grad-CAM and the attention of each stage's last block.

    Args:
      image: the input as the model saw it (after resize and crop), RGB uint8 (H, W, 3).
      maps: this image's entry of `attention_maps` (module -> {"channel": (C,), "spatial": (H, W)}).
      cam: this image's Grad-CAM map (H, W) in [0, 1].
      cam_label: the explained class, e.g. "tabby cat (0.71)".
      all_blocks: add one row per stage with every block's maps.
      footer: text under the panels (model, notes).

    Spatial maps are stretched to their own range for display (the range is in the panel's
    title); channel charts show the raw weights on a fixed [0, 1] axis.
    """
    legend = [colour_bar(), scale_labels()]
    first_row = [Cell(["input"], image, legend), Cell(["Grad-CAM", cam_label], overlay(image, cam), [])]
    last_of_stage = {}
    for name in maps:
        last_of_stage[stage_of(name)] = name
    first_row += [_attention_cell(name, image, maps[name]) for name in last_of_stage.values()]
    rows = [first_row]
    if all_blocks:
        for stage in sorted(last_of_stage):
            rows.append([_attention_cell(name, image, maps[name]) for name in maps if stage_of(name) == stage])
    return render_grid(rows, footer)


def scale_labels() -> np.ndarray:
    """A small key under the colour bar: 'low' at the left end, 'high' at the right (RGB strip)."""
    strip = Image.new("RGB", (PANEL, FONT_SIZE + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    font = _font()
    draw.text((0, 0), "low", fill=(0, 0, 0), font=font)
    draw.text((PANEL - 30, 0), "high", fill=(0, 0, 0), font=font)
    return np.asarray(strip)


def save_png_atomically(figure: Image.Image, path: Path) -> None:
    """Write a PNG to a temporary file beside `path`, then rename it into place."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            figure.save(stream, format="PNG")
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes the file private; give it a normal file's mode
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def output_names(paths: Sequence[str]) -> dict[str, str]:
    """A distinct '{stem}_attention.png' for each input path (a numeric suffix on clashes)."""
    names, used = {}, set()
    for path in paths:
        stem, candidate, count = Path(path).stem, f"{Path(path).stem}_attention.png", 1
        while candidate in used:
            count += 1
            candidate = f"{stem}_{count}_attention.png"
        used.add(candidate)
        names[path] = candidate
    return names


# ---- `cbam-jax attention` ---------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--pretrained", required=True, metavar="DIR",
                        help="a model directory written by `cbam-jax convert` or save_pretrained")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG figures (created if needed)")
    parser.add_argument("--class-index", type=int, metavar="K",
                        help="explain class K with Grad-CAM (default: each image's top class)")
    parser.add_argument("--all-blocks", action="store_true", help="also show every block's maps, one row per stage")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (%(default)s)")
    add_preprocessing_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Write `{stem}_attention.png` per readable image into --out; exit 1 if any image failed, 2 on setup errors."""
    try:
        loaded = load_model(args.pretrained, preprocessing_overrides(args))
        if args.batch_size < 1:
            raise InputError(f"--batch-size must be positive; got {args.batch_size}.")
        if args.class_index is not None and not 0 <= args.class_index < len(loaded.class_names):
            raise InputError(f"--class-index must be in [0, {len(loaded.class_names)}) for this model; "
                             f"got {args.class_index}.")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out}: exists and is not a directory.")
        out.mkdir(parents=True, exist_ok=True)
    except (InputError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    items, failures = load_images(args.images, loaded.preprocessing)
    names = output_names([path for path, _ in items])
    footer = (f"model: {Path(args.pretrained).resolve().name}; Grad-CAM at the output of {last_block_name(loaded.model)}.\n"
              + FIGURE_KEY)
    for batch in same_shape_batches(items, args.batch_size):
        inputs = np.stack([normalize(image, loaded.preprocessing) for _, image in batch])
        maps = attention_maps(loaded.model, loaded.variables, inputs)
        cams = grad_cam(loaded.model, loaded.variables, inputs, args.class_index)
        probabilities = np.asarray(jax.nn.softmax(cams.logits, axis=-1))
        for i, (path, image) in enumerate(batch):
            target = int(cams.class_index[i])
            label = f"{loaded.class_names[target]} (p={probabilities[i, target]:.2f})"
            figure = attention_figure(image, {name: {kind: v[i] for kind, v in entry.items()}
                                              for name, entry in maps.items()},
                                      cams.maps[i], label, all_blocks=args.all_blocks, footer=footer)
            destination = out / names[path]
            try:
                save_png_atomically(figure, destination)
            except OSError as error:
                print(f"error: {destination}: cannot write the figure ({error}).", file=sys.stderr)
                failures += 1
                continue
            print(f"{path} -> {destination} (Grad-CAM class: {label})")
    if failures:
        print(f"{failures} of {len(args.images)} image(s) failed (see the errors above).", file=sys.stderr)
    return 1 if failures else 0
