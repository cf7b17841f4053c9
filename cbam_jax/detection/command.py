"""`cbam-jax detect IMAGE_OR_FOLDER... --pretrained RUN_OR_DIR [--json] [--out DIR]`: the boxes, classes
and scores a trained detector finds in each image, printed (one JSON object per image with --json),
and with --out the images with their boxes drawn ('{stem}_detections.png').

RUN_OR_DIR is a finished detection run's workdir (its exported `detector/` folder) or such a folder.
Each image is fitted into the detector's square input (longer side, top-left, black padding) and the
boxes are given in the original image's pixels (x0, y0, x1, y1).
"""

import argparse
import functools
import json
from pathlib import Path

import jax
import numpy as np
from PIL import Image, ImageDraw

from cbam_jax.atomic import atomic_output, check_destination
from cbam_jax.data.sources import IMAGE_EXTENSIONS
from cbam_jax.detection import data
from cbam_jax.detection.evaluate import predict
from cbam_jax.detection.weights import load_detector
from cbam_jax.errors import UsageError, UserError, report
from cbam_jax.images import InputError, load_image
from cbam_jax.predict import report_failures

PROGRAM = "cbam-jax detect"
COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders of images")
    parser.add_argument("--pretrained", required=True, metavar="RUN_OR_DIR",
                        help="a finished detection run's workdir or its exported detector/ folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    parser.add_argument("--out", metavar="DIR", help="write each image with its boxes drawn into DIR (created)")
    parser.add_argument("--score-threshold", type=float, metavar="S",
                        help="report detections scoring above S (default: the threshold the run was trained with)")


def expand_images(arguments: list[str]) -> list[str]:
    """Image paths from files and folders (a folder's image files, sorted); UsageError for no arguments
    or a folder without images."""
    if not arguments:
        raise UsageError("give at least one IMAGE file or folder (e.g. photo.jpg or photos/).")
    paths = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                raise UsageError(f"{argument}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...).")
            paths.extend(found)
        else:
            paths.append(argument)
    return paths


def draw(image: np.ndarray, rows: list[dict]) -> Image.Image:
    """The RGB image with each detection's box and 'class score' label."""
    picture = Image.fromarray(image)
    pen = ImageDraw.Draw(picture)
    for row in rows:
        colour = COLOURS[row["index"] % len(COLOURS)]
        pen.rectangle(row["box"], outline=colour, width=max(1, round(max(image.shape[:2]) / 200)))
        pen.text((row["box"][0] + 2, row["box"][1] + 1), f"{row['class']} {row['score']:.2f}", fill=colour)
    return picture


def run(args: argparse.Namespace) -> int:
    """Print the detections of every readable image; exit 1 if an image failed, 2 for a bad command line."""
    paths = expand_images(args.images)
    if args.score_threshold is not None and not 0 <= args.score_threshold < 1:
        raise UsageError(f"--score-threshold must be in [0, 1); got {args.score_threshold}.")
    out = Path(args.out) if args.out else None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: exists and is not a directory.")
        check_destination(out, replace=True, option="--out")
    try:
        detector, variables, metadata = load_detector(args.pretrained)
    except UserError as error:
        raise UserError(str(error), exit_code=2) from None
    preprocessing, decoding = metadata["preprocessing"], dict(metadata["decoding"])
    if args.score_threshold is not None:
        decoding["score_threshold"] = args.score_threshold
    names = metadata.get("class_names") or [str(i) for i in range(detector.num_classes)]
    size = int(preprocessing["image_size"])
    predict_fn = jax.jit(functools.partial(predict, detector=detector, mean=tuple(preprocessing["mean"]),
                                           std=tuple(preprocessing["std"]), decoding=decoding))
    failures, written = 0, set()
    for path in paths:
        try:
            image = load_image(path)
        except InputError as error:
            report(PROGRAM, error)
            failures += 1
            continue
        empty = {"image": image, "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int32)}
        fitted = data.resize_to_canvas(empty, data.fit_scale(empty, size), size)
        found = jax.device_get(predict_fn(variables, fitted["image"][None]))
        limit = np.asarray([image.shape[1], image.shape[0]] * 2, np.float32)
        rows = [{"index": int(c), "class": names[int(c)], "score": round(float(s), 4),
                 "box": [round(float(v), 1) for v in np.clip(b / fitted["scale"], 0, limit)]}
                for b, s, c, v in zip(found.boxes[0], found.scores[0], found.classes[0], found.valid[0]) if v]
        if args.json:
            print(json.dumps({"image": path, "detections": rows}))
        else:
            print(f"{path}: {len(rows)} detection(s)")
            for row in rows:
                print(f"  {row['score']:.3f}  {row['class']} ({row['index']})  box {row['box']}")
        if out is not None:
            name, count = f"{Path(path).stem}_detections.png", 1
            while name in written:
                count += 1
                name = f"{Path(path).stem}_{count}_detections.png"
            written.add(name)
            with atomic_output(out / name, replace=True) as temporary:
                draw(image, rows).save(temporary, format="PNG")
    return report_failures(PROGRAM, failures, len(paths))
