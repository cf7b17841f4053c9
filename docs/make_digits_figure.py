"""Make docs/digits_attention.png: `cbam-jax attention` on digits of the test split, with the model
that the main job trained (train.py writes it to WORKDIR/pretrained at the end of training).

    python train.py --config configs/default.py --workdir runs/default      # or: make train
    python docs/make_digits_figure.py --pretrained runs/default/pretrained

It writes the chosen test digits as 8x8 greyscale PNGs (exactly the eval pipeline's input, so the
model sees what it was evaluated on), runs `cbam-jax predict` and `cbam-jax attention` on them, and
stacks the per-image figures into one picture.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image

from cbam_jax.atomic import atomic_output
from cbam_jax.cli import main as cli_main
from cbam_jax.data import digits_source

DOCS = Path(__file__).resolve().parent
DIGITS = (0, 3, 7)  # which digit classes to show: the first test example of each


def write_digits(folder: Path, digits: tuple[int, ...]) -> list[str]:
    """The first test-split image of each digit as an 8x8 'L' PNG in `folder`; their paths."""
    test = digits_source("test")
    paths = []
    for digit in digits:
        index = int((test.labels == digit).nonzero()[0][0])
        path = folder / f"test{index:03d}_digit{digit}.png"
        Image.fromarray(test.images[index][..., 0]).save(path)
        paths.append(str(path))
    return paths


def stack_vertically(paths: list[Path], out: Path) -> None:
    figures = [Image.open(path).convert("RGB") for path in paths]
    canvas = Image.new("RGB", (max(f.width for f in figures), sum(f.height for f in figures)), (255, 255, 255))
    y = 0
    for figure in figures:
        canvas.paste(figure, (0, y))
        y += figure.height
    with atomic_output(out, replace=True) as temporary:
        canvas.save(temporary, format="PNG")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="runs/default/pretrained", help="the trained model (%(default)s)")
    parser.add_argument("--out", default=str(DOCS / "digits_attention.png"), help="the figure (%(default)s)")
    parser.add_argument("--grad-cam-block", default="layer2_1",
                        help="Grad-CAM at this block's output (%(default)s: 4x4; the last block, layer4_1, is 1x1 "
                             "for 8x8 inputs, where Grad-CAM cannot localise anything)")
    parser.add_argument("--digits", type=int, nargs="+", default=DIGITS, help="digit classes to show")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        images = write_digits(Path(folder), tuple(args.digits))
        # The documented commands: cbam-jax predict / attention --pretrained DIR IMAGE... (--out DIR)
        status = cli_main(["predict", "--pretrained", args.pretrained, "--top-k", "3", *images])
        status = status or cli_main(["attention", "--pretrained", args.pretrained, *images, "--out", folder,
                                      "--grad-cam-block", args.grad_cam_block])
        if status:
            return status
        stack_vertically([Path(folder) / f"{Path(image).stem}_attention.png" for image in images], Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
