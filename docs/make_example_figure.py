"""Make the README's example figure from scikit-learn's flower.jpg with `cbam-jax attention`.

    python docs/make_example_figure.py                     # untrained CBAM-ResNet-50, see below
    python docs/make_example_figure.py --pretrained DIR    # any save_pretrained / convert directory

Without --pretrained, the model is a CBAM-ResNet-50 with random weights (seed 0) whose spatial
gates' BatchNorm scale starts at 1 instead of the official 0 (a zero scale makes every untrained
spatial map the constant 0.5). Its BatchNorm statistics are set from the photograph itself (one
pass with momentum 0), so that activations have unit scale as in a trained network. Nothing is
trained: the maps show which image structures random CBAM features respond to, not learned
semantics, and its Grad-CAM explains an arbitrary class.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import jax

from cbam_jax import create_model
from cbam_jax.cli import main as cli_main
from cbam_jax.images import Preprocessing, load_image, preprocess
from cbam_jax.pretrained import IMAGENET_PREPROCESSING, save_pretrained

DOCS = Path(__file__).resolve().parent


def sample_image(name: str) -> Path:
    """The path of one of scikit-learn's sample photographs ('china.jpg' or 'flower.jpg')."""
    import sklearn.datasets
    return Path(sklearn.datasets.__file__).parent / "images" / name


def untrained_model(directory: Path, image: Path) -> Path:
    """Save the random CBAM-ResNet-50 described in the module docstring to `directory`."""
    calibrating = create_model("cbam_resnet50", spatial_bn_zero_init=False, bn_momentum=0.0, spatial_bn_momentum=0.0)
    inputs = preprocess(load_image(image), Preprocessing.from_dict(IMAGENET_PREPROCESSING))[None]
    variables = calibrating.init(jax.random.key(0), inputs)
    # Train-mode pass with momentum 0: the running statistics become this image's statistics.
    _, updates = calibrating.apply(variables, inputs, train=True, mutable=["batch_stats"])
    model = create_model("cbam_resnet50", spatial_bn_zero_init=False)
    classes = [f"random class {i}" for i in range(model.num_classes)]
    return save_pretrained(directory, model, {"params": variables["params"], **updates},
                           metadata={"preprocessing": IMAGENET_PREPROCESSING, "class_names": classes,
                                     "source": "untrained cbam_resnet50, seed 0, BatchNorm statistics of flower.jpg"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", help="a model directory (default: the untrained model above)")
    parser.add_argument("--image", default="flower.jpg", choices=["flower.jpg", "china.jpg"])
    parser.add_argument("--out", default=str(DOCS))
    args = parser.parse_args()
    image = sample_image(args.image)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.pretrained or str(untrained_model(Path(scratch) / "untrained_cbam_resnet50", image))
        return cli_main(["attention", "--pretrained", model_dir, "--out", args.out, str(image)])


if __name__ == "__main__":
    sys.exit(main())
