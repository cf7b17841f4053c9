"""`cbam-jax convert SRC DST`: a PyTorch checkpoint to a pretrained directory, or back with --to-torch.

    cbam-jax convert cbam_resnet50.pth.tar cbam50/            # detects layout, depth, variant, classes
    cbam-jax convert --to-torch cbam50/ cbam_resnet50.pth      # official ResidualNet keys
    cbam-jax convert --to-torch --layout pytorchcv cbam50/ cbam_resnet50_pytorchcv.safetensors

The output appears complete or not at all; on any error the exit code is 1 and nothing is written.
"""

import argparse
from pathlib import Path

from cbam_jax.atomic import atomic_output
from cbam_jax.convert.detect import detect, variant_of
from cbam_jax.convert.layouts import LAYOUTS, get_layout
from cbam_jax.convert.mapping import load_variables, to_numpy_state_dict
from cbam_jax.convert.reading import ConversionError, read_state_dict
from cbam_jax.pretrained import IMAGENET_PREPROCESSING, load_pretrained, save_pretrained
from cbam_jax.registry import VARIANTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `cbam-jax convert`."""
    parser.add_argument("src", metavar="SRC", help="PyTorch checkpoint (.pth, .pth.tar, .pt, .bin, .safetensors); "
                        "with --to-torch a pretrained directory")
    parser.add_argument("dst", metavar="DST", help="pretrained directory to create; with --to-torch a .pth or "
                        ".safetensors file")
    parser.add_argument("--to-torch", action="store_true", help="convert a pretrained directory to a PyTorch state_dict")
    parser.add_argument("--arch", help="model name such as cbam_resnet50 (default: detected from the keys)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="CBAM variant (default: the source layout's)")
    parser.add_argument("--layout", choices=list(LAYOUTS), help="PyTorch key layout (default: detected; with "
                        "--to-torch the variant's own)")
    parser.add_argument("--strip-prefix", help="extra key prefix to remove, e.g. 'model.' ('module.' always is)")
    parser.add_argument("--class-names", type=Path, help="text file with one class name per line, saved as metadata")


def run(args: argparse.Namespace) -> int:
    """Convert; print a one-line summary, or one paragraph on what went wrong (exit code 1)."""
    try:
        summary = _to_torch(args) if args.to_torch else _from_torch(args)
    except (ConversionError, ValueError, OSError) as error:
        print(f"cbam-jax convert: error: {error}\nNothing was written to {args.dst}.")
        return 1
    print(summary)
    return 0


def _from_torch(args: argparse.Namespace) -> str:
    if Path(args.dst).exists():
        raise ConversionError(f"{args.dst} already exists; choose a new directory or remove it first.")
    class_names = _read_class_names(args.class_names) if args.class_names else None
    state = read_state_dict(args.src, strip_prefix=args.strip_prefix)
    detected = detect(state, arch=args.arch, variant=args.variant, layout=args.layout)
    model = detected.build()
    variables = load_variables(state, model, get_layout(detected.layout), detected=detected)
    if class_names is not None and len(class_names) != detected.num_classes:
        raise ConversionError(f"{args.class_names} lists {len(class_names)} class names, but the model has "
                              f"{detected.num_classes} classes.")
    metadata = {"source": {"file": Path(args.src).name, "layout": detected.layout, "arch": detected.arch,
                           "variant": detected.variant}}
    if detected.stem == "imagenet" and detected.num_classes == 1000:
        metadata["preprocessing"] = IMAGENET_PREPROCESSING
    if class_names is not None:
        metadata["class_names"] = class_names
    save_pretrained(args.dst, model, variables, metadata=metadata)
    return f"Converted {args.src} -> {args.dst}: {detected.describe()}."


def _to_torch(args: argparse.Namespace) -> str:
    destination = Path(args.dst)
    if destination.exists():
        raise ConversionError(f"{destination} already exists; choose a new file name or remove it first.")
    if destination.suffix not in (".pth", ".pt", ".bin", ".tar", ".safetensors"):
        raise ConversionError(f"Unknown output type {destination.name!r}: use .pth (torch.save) or .safetensors.")
    model, variables = load_pretrained(args.src)
    variant = variant_of(model)
    if args.variant and args.variant != variant:
        raise ConversionError(f"{args.src} holds a {variant!r}-variant model; it cannot be written as {args.variant!r}.")
    arrays = to_numpy_state_dict(variables, arch=model, layout=args.layout)
    with atomic_output(destination) as partial:
        if destination.suffix == ".safetensors":
            from safetensors.numpy import save_file
            save_file(arrays, str(partial))
        else:
            try:
                import torch
            except ImportError:
                raise ConversionError("Writing .pth needs PyTorch (`pip install torch`); write .safetensors "
                                      "instead, which needs no torch.") from None
            torch.save({key: torch.from_numpy(value.copy()) for key, value in arrays.items()}, partial)
    layout = args.layout or variant
    return f"Wrote {len(arrays)} tensors of {args.src} ({variant} variant) in the {layout!r} layout to {destination}."


def _read_class_names(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ConversionError(f"{path} lists no class names (expected one per line).")
    return names
