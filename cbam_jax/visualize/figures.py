"""Figures of attention maps and Grad-CAM over the input image, drawn with Pillow (no plotting library).

`attention_figure` lays out one image's panels: the input with a color-scale key, its Grad-CAM,
and the spatial map (overlaid) and channel weights (a bar chart) of each stage's last block.
"""

import textwrap
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cbam_jax.visualize.maps import stage_of

# A perceptually ordered dark-blue -> green -> yellow -> dark-red color scale ("turbo"-like),
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


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values (H, W) in [0, 1] to RGB uint8 (H, W, 3) with the turbo-like color scale."""
    positions = np.array([p for p, _ in COLORMAP_ANCHORS])
    colors = np.array([c for _, c in COLORMAP_ANCHORS], np.float64)
    values = np.clip(np.asarray(values, np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(values, positions, colors[:, i]) for i in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def overlay(image: np.ndarray, values: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend the colorized `values` (H, W) in [0, 1] over an RGB uint8 image (H, W, 3)."""
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
        for value, color in ((group.max(), (150, 180, 220)), (group.mean(), (40, 80, 160))):
            top = height - 1 - int(round(float(value) * (height - 1)))
            draw.line([(column, height - 1), (column, top)], fill=color)
    for x in range(0, width, 6):  # dashed line at 0.5, drawn over the bars
        draw.line([(x, height // 2), (x + 2, height // 2)], fill=(230, 60, 60))
    draw.rectangle([0, 0, width - 1, height - 1], outline=(120, 120, 120))
    return np.asarray(chart)


def color_bar(width: int = PANEL, height: int = 12) -> np.ndarray:
    """The color scale, low (left) to high (right), as an RGB strip (height, width, 3)."""
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
                # Tiny inputs (e.g. 8x8 digits) are shown as crisp pixel blocks, not blurred.
                resample = (Image.Resampling.NEAREST if max(cell.image.shape[:2]) * 4 <= PANEL
                            else Image.Resampling.BILINEAR)
                canvas.paste(Image.fromarray(cell.image).resize((PANEL, PANEL), resample), (x, cy))
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
      image: the input as the model saw it (after resize and crop), uint8 (H, W, 3) RGB or (H, W, 1) grey.
      maps: this image's entry of `attention_maps` (module -> {"channel": (C,), "spatial": (H, W)}).
      cam: this image's Grad-CAM map (H, W) in [0, 1].
      cam_label: the explained class, e.g. "tabby cat (0.71)".
      all_blocks: add one row per stage with every block's maps.
      footer: text under the panels (model, notes).

    Spatial maps are stretched to their own range for display (the range is in the panel's
    title); channel charts show the raw weights on a fixed [0, 1] axis.
    """
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    legend = [color_bar(), scale_labels()]
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
    """A small key under the color bar: 'low' at the left end, 'high' at the right (RGB strip)."""
    strip = Image.new("RGB", (PANEL, FONT_SIZE + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    font = _font()
    draw.text((0, 0), "low", fill=(0, 0, 0), font=font)
    draw.text((PANEL - 30, 0), "high", fill=(0, 0, 0), font=font)
    return np.asarray(strip)
