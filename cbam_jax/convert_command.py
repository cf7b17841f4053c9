"""`cbam-jax convert SRC DST`: a PyTorch checkpoint to a pretrained folder (`cbam_jax.pretrained`), or back with --to-torch.

    cbam-jax convert cbam_resnet50.pth.tar cbam50/            # detects layout, depth, variant, classes
    cbam-jax convert --arch cbam_resnet50 resnet50.pth cbam50/ # a plain ResNet's backbone, new attention
    cbam-jax convert --to-torch cbam50/ cbam_resnet50.pth      # official ResidualNet keys
    cbam-jax convert --to-torch --layout pytorchcv cbam50/ cbam_resnet50_pytorchcv.safetensors

With --arch naming an attention model and a plain ResNet as SRC (a PyTorch checkpoint or a pretrained
directory), the backbone is transferred and the attention initialised as the variant prescribes
(`cbam_jax.convert.transfer`); the summary says what was new. The output appears complete or not at
all; on any error the exit code is 1, one line on stderr says why, and nothing is written.
"""

import argparse
from pathlib import Path

from safetensors.numpy import save_file

from cbam_jax.atomic import atomic_output, check_destination
from cbam_jax.convert.detect import detect, variant_of
from cbam_jax.convert.layouts import LAYOUTS, get_layout
from cbam_jax.convert.mapping import load_variables, to_numpy_state_dict
from cbam_jax.convert.reading import ConversionError, read_state_dict
from cbam_jax.convert.transfer import transfer_variables
from cbam_jax.checks import NonFiniteWeights
from cbam_jax.errors import MissingInput, UserError, one_line
from cbam_jax.factory import load_pretrained
from cbam_jax.pretrained import IMAGENET_PREPROCESSING, load_metadata, save_pretrained
from cbam_jax.registry import VARIANTS, create_model, parse_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `cbam-jax convert`."""
    parser.add_argument("src", metavar="SRC", help="PyTorch checkpoint (.pth, .pth.tar, .pt, .bin, .safetensors); "
                        "with --to-torch, or a plain ResNet for --arch, a pretrained directory")
    parser.add_argument("dst", metavar="DST", help="pretrained directory to create; with --to-torch a .pth or "
                        ".safetensors file")
    parser.add_argument("--to-torch", action="store_true", help="convert a pretrained directory to a PyTorch state_dict")
    parser.add_argument("--arch", help="model name such as cbam_resnet50 (default: detected from the keys); for a "
                        "plain ResNet SRC, the attention model to start from its backbone")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="CBAM variant (default: the source layout's)")
    parser.add_argument("--layout", choices=list(LAYOUTS), help="PyTorch key layout (default: detected; with "
                        "--to-torch the variant's own)")
    parser.add_argument("--strip-prefix", help="extra key prefix to remove, e.g. 'model.' ('module.' always is)")
    parser.add_argument("--class-names", type=Path, help="text file with one class name per line, saved as metadata")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="convert weights holding NaN or inf (refused by default: such weights are broken)")


def run(args: argparse.Namespace) -> int:
    """Convert and print a one-line summary; a UserError (one line on stderr, exit code 1) on what went wrong."""
    try:
        check_destination(args.dst)
        summary = _to_torch(args) if args.to_torch else _from_torch(args)
    except UserError as error:
        if isinstance(error, NonFiniteWeights):
            error = error.for_option("--allow-nonfinite")
        raise UserError(f"{one_line(error)} Nothing was written to {args.dst}.", exit_code=error.exit_code) from None
    print(summary)
    return 0


def _from_torch(args: argparse.Namespace) -> str:
    if Path(args.dst).exists():
        raise ConversionError(f"{args.dst} already exists; choose a new directory or remove it first.")
    if args.arch:
        parse_name(args.arch)  # an unknown name fails here, before anything is read
    class_names = _read_class_names(args.class_names) if args.class_names else None
    if Path(args.src).is_dir():
        return _transfer_from_directory(args, class_names)
    state = read_state_dict(args.src, strip_prefix=args.strip_prefix, allow_nonfinite=args.allow_nonfinite)
    if args.arch and parse_name(args.arch)[0] is not None:
        plain = detect(state, layout=args.layout)
        if plain.arch.startswith("resnet"):  # a plain ResNet into an attention model: transfer its backbone
            source = plain.build()
            variables = load_variables(state, source, get_layout(plain.layout), detected=plain)
            origin = {"file": Path(args.src).name, "layout": plain.layout, "arch": plain.arch}
            return _transfer(args, source, variables, origin, class_names)
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


def _transfer_from_directory(args: argparse.Namespace, class_names: list[str] | None) -> str:
    """A plain cbam-jax ResNet directory into the --arch model."""
    if not args.arch:
        raise ConversionError(f"{args.src} is a directory: give --arch to start an attention model from the plain "
                              "ResNet in it, or a PyTorch checkpoint file to convert.")
    source, variables = load_pretrained(args.src, allow_nonfinite=args.allow_nonfinite)
    metadata = load_metadata(args.src)
    return _transfer(args, source, variables, {"directory": str(args.src)}, class_names or metadata.get("class_names"),
                     metadata.get("preprocessing"))


def _transfer(args: argparse.Namespace, source, variables, origin: dict, class_names: list[str] | None,
              preprocessing: dict | None = None) -> str:
    """The source model's weights into `args.arch` (same stem, width and classes; new attention) at args.dst."""
    if source.attention is not None:
        raise ConversionError(f"{args.src} holds a model with {source.attention} attention; --arch {args.arch} can "
                              "start only from a plain ResNet's backbone.")
    model = create_model(args.arch, num_classes=source.num_classes, stem=source.stem, variant=args.variant or "official",
                         **({"width": source.width} if source.width != 64 else {}))
    variables, report = transfer_variables(variables, model)
    if class_names is not None and len(class_names) != model.num_classes:
        raise ConversionError(f"{args.class_names} lists {len(class_names)} class names, but the model has "
                              f"{model.num_classes} classes.")
    metadata = {"source": {**origin, "transferred_to": args.arch, "variant": args.variant or "official",
                           "new": list(report.new)}}
    if preprocessing is not None or (model.stem == "imagenet" and model.num_classes == 1000):
        metadata["preprocessing"] = preprocessing or IMAGENET_PREPROCESSING
    if class_names is not None:
        metadata["class_names"] = class_names
    save_pretrained(args.dst, model, variables, metadata=metadata)
    return f"Transferred {args.src} -> {args.dst} as {args.arch} (variant {args.variant or 'official'}): {report.summary()}."


def _to_torch(args: argparse.Namespace) -> str:
    destination = Path(args.dst)
    if destination.exists():
        raise ConversionError(f"{destination} already exists; choose a new file name or remove it first.")
    if destination.suffix not in (".pth", ".pt", ".bin", ".tar", ".safetensors"):
        raise ConversionError(f"Unknown output type {destination.name!r}: use .pth (torch.save) or .safetensors.")
    model, variables = load_pretrained(args.src, allow_nonfinite=args.allow_nonfinite)
    variant = variant_of(model)
    if args.variant and args.variant != variant:
        raise ConversionError(f"{args.src} holds a {variant!r}-variant model; it cannot be written as {args.variant!r}.")
    arrays = to_numpy_state_dict(variables, arch=model, layout=args.layout)
    with atomic_output(destination) as partial:
        if destination.suffix == ".safetensors":
            save_file(arrays, str(partial))
        else:
            try:
                import torch
            except ImportError:
                raise ConversionError("Writing .pth needs PyTorch (`pip install 'cbam-jax[torch]'`); write .safetensors "
                                      "instead, which needs no torch.") from None
            torch.save({key: torch.from_numpy(value.copy()) for key, value in arrays.items()}, partial)
    layout = args.layout or variant
    return f"Wrote {len(arrays)} tensors of {args.src} ({variant} variant) in the {layout!r} layout to {destination}."


def _read_class_names(path: Path) -> list[str]:
    if not path.is_file():
        raise MissingInput(f"--class-names {path}: no such file (expected one class name per line).")
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise ConversionError(f"--class-names {path}: cannot read it as text ({error}).") from None
    if not names:
        raise ConversionError(f"{path} lists no class names (expected one per line).")
    return names
