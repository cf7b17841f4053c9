"""`cbam-jax attention --pretrained DIR IMAGE... --out DIR`: one PNG figure per image of its attention
maps and Grad-CAM (the preprocessing saved with the model, as `cbam-jax predict`)."""

import argparse
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from cbam_jax.atomic import atomic_output, check_destination
from cbam_jax.errors import UsageError, UserError, report
from cbam_jax.images import load_images, normalize, same_shape_batches
from cbam_jax.predict import (add_preprocessing_arguments, check_positive, image_arguments, load_for_command,
                              report_failures)
from cbam_jax.visualize.figures import FIGURE_KEY, attention_figure
from cbam_jax.visualize.maps import attention_maps, block_names, grad_cam


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--pretrained", required=True, metavar="DIR",
                        help="a model directory written by `cbam-jax convert` or save_pretrained")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG figures (created if needed)")
    parser.add_argument("--class-index", type=int, metavar="K",
                        help="explain class K with Grad-CAM (default: each image's top class)")
    parser.add_argument("--all-blocks", action="store_true", help="also show every block's maps, one row per stage")
    parser.add_argument("--grad-cam-block", metavar="NAME",
                        help="block whose output Grad-CAM explains, e.g. layer2_1 (a ResNet) or stage4_5 "
                             "(a MobileNet unit); default: the last block")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (%(default)s)")
    add_preprocessing_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Write `{stem}_attention.png` per readable image into --out; exit 1 if any image failed, 2 on setup errors.

    --out is created with the first figure: a command whose images all fail leaves no folder behind.
    """
    check_positive(args, "batch_size")
    args.images = image_arguments(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory.")
    try:
        check_destination(out, replace=True, option="--out")
    except UserError as error:
        raise UsageError(str(error)) from None
    loaded = load_for_command(args)
    if args.class_index is not None and not 0 <= args.class_index < len(loaded.class_names):
        raise UsageError(f"--class-index must be in [0, {len(loaded.class_names)}) for this model; "
                         f"got {args.class_index}.")
    blocks = block_names(loaded.model)
    cam_block = args.grad_cam_block or blocks[-1]
    if cam_block not in blocks:
        raise UsageError(f"--grad-cam-block must be one of this model's blocks ({blocks[0]} ... {blocks[-1]}); "
                         f"got {cam_block!r}.")
    items, failures = load_images(args.images, loaded.preprocessing, program="cbam-jax attention")
    names = output_names([path for path, _ in items])
    footer = (f"model: {Path(args.pretrained).resolve().name}; Grad-CAM at the output of {cam_block}.\n"
              + FIGURE_KEY)
    for batch in same_shape_batches(items, args.batch_size):
        inputs = normalize(np.stack([image for _, image in batch]), loaded.preprocessing.mean, loaded.preprocessing.std)
        maps = attention_maps(loaded.model, loaded.variables, inputs)
        cams = grad_cam(loaded.model, loaded.variables, inputs, args.class_index, layer=cam_block)
        probabilities = np.asarray(jax.nn.softmax(cams.logits, axis=-1))
        for i, (path, image) in enumerate(batch):
            target = int(cams.class_index[i])
            label = f"{loaded.class_names[target]} (p={probabilities[i, target]:.2f})"
            figure = attention_figure(image, {name: {kind: v[i] for kind, v in entry.items()}
                                              for name, entry in maps.items()},
                                      cams.maps[i], label, all_blocks=args.all_blocks, footer=footer)
            destination = out / names[path]
            try:
                with atomic_output(destination, replace=True) as temporary:
                    figure.save(temporary, format="PNG")
            except OSError as error:  # an OutputError naming the file and the reason
                report("cbam-jax attention", error)
                failures += 1
                continue
            print(f"{path} -> {destination} (Grad-CAM class: {label})")
    return report_failures("cbam-jax attention", failures, len(args.images), "failed")
