"""Published ImageNet weights by name: `create_model("cbam_resnet50", pretrained=True)`, `load("resnet50.tv_in1k")`.

Each entry of `PRETRAINED` says where a published PyTorch checkpoint lives (URL, the publisher's
checksum, key layout), what it is (architecture, parameters, the accuracy its publisher reports,
license, class names, eval preprocessing), and is named `ARCH.TAG` (`ARCH` alone: its first tag).

Loading one downloads the file (a progress bar on terminals; a connection cut mid-file resumes with
an HTTP Range request while each attempt makes progress), verifies the checksum, converts it with
`cbam_jax.convert` and caches the converted model as a pretrained directory in
`$CBAM_JAX_CACHE/models/ARCH.TAG` (default cache `~/.cache/cbam_jax`), written atomically; later
loads read the cache and need no network. A download in progress is written to
`$CBAM_JAX_CACHE/downloads/STEM.partial.SUFFIX`; one that was killed or interrupted (Ctrl-C) stays
there and the next load resumes it with a Range request. Nothing is used before its checksum is
verified (a resumed file that fails it is downloaded once more from the start). Downloads are not
kept otherwise: on success only the converted model remains, after a failed download or check
nothing. Processes loading the same entry at once take turns (a lock on the partial file, where the
system has `fcntl`): the later ones wait and read the cache. Without network, or for files on cloud
drives that need a browser, put the file by hand at `$CBAM_JAX_CACHE/downloads/FILE_NAME` (the error
message names the exact path, the URL and the checksum): it is verified and converted like a download.

    cbam-jax list-pretrained            # the table below, in the terminal
"""

import argparse
import contextlib
import dataclasses
import fnmatch
import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import jax
import numpy as np

from cbam_jax.atomic import make_parents
from cbam_jax.cache import CACHE_ENV, DEFAULT_CACHE, cache_root
from cbam_jax.convert import from_torch
from cbam_jax.convert.detect import variant_of
from cbam_jax.convert.layouts import get_layout
from cbam_jax.convert.transfer import transfer_variables
from cbam_jax.errors import InvalidInput, UserError, one_line
from cbam_jax.pretrained import IMAGENET_PREPROCESSING, WEIGHTS_FILE, load_pretrained, save_pretrained
from cbam_jax.resnet import ResNet

try:
    import fcntl  # POSIX: processes fetching the same entry take turns
except ImportError:  # Windows: no lock
    fcntl = None

# The 1000 ImageNet-1k class names in index order (torchvision's list, BSD-3-Clause), as the
# published classifiers number them.
IMAGENET_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.txt")
# Resize the short side, center-crop 224, scale to [0, 1], normalise per RGB channel.
RESIZE_256 = IMAGENET_PREPROCESSING
RESIZE_232 = {**IMAGENET_PREPROCESSING, "resize": 232}
CHUNK = 1 << 20
TIMEOUT_S = 30.0
ATTEMPTS = 5  # connections per download; each retry resumes where the last one stopped


class DownloadError(UserError, OSError):
    """A published checkpoint that could not be fetched or verified; the message says where to put it by hand."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """One published checkpoint.

    Attributes:
      arch: the cbam-jax model name it loads into ('cbam_resnet50').
      tag: which of the model's checkpoints ('imgclsmob', 'tv_in1k', ...).
      url: where to download it (for `manual` entries: the page to open in a browser).
      file_name: the file as published; the manual pick-up name in `$CBAM_JAX_CACHE/downloads/`.
      checksum: 'sha256:HEX' or 'sha1:HEX' of the checkpoint (of `member` for zip archives), as its
        publisher gives it; a short HEX is a prefix (torchvision publishes 8 hex digits of SHA-256).
        None: no checksum was published (the file is then only checked by its conversion).
      layout: the `cbam_jax.convert` key layout of the checkpoint.
      num_params: trainable parameters (checked after conversion).
      top1, top5: ImageNet-1k validation accuracy (%) as reported by the publisher (`reported_by`).
      reported_by: where the numbers (and the file) are published.
      license: the license the weights are published under.
      preprocessing: eval preprocessing (`cbam_jax.pretrained` metadata conventions).
      member: for a .zip download, the checkpoint file inside it.
      manual: no direct download link (e.g. a cloud drive that asks for confirmation in a browser).
      note: anything else a user should know (one line).
    """

    arch: str
    tag: str
    url: str
    file_name: str
    checksum: str | None
    layout: str
    num_params: int
    top1: float | None
    top5: float | None
    reported_by: str
    license: str
    preprocessing: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(RESIZE_256))
    member: str | None = None
    manual: bool = False
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}"

    @property
    def checked_file(self) -> str:
        """The file the checksum is of: the zip member, or the download itself."""
        return self.member or self.file_name


IMGCLSMOB = "https://github.com/osmr/imgclsmob/releases/download"
IMGCLSMOB_README = "imgclsmob pytorch/README.md (pytorchcv model_metainfos.csv)"
IMGCLSMOB_NOTE = "trained by imgclsmob (Gluon, converted to PyTorch); the error is top-1/top-5 on ImageNet-1k val"
TORCHVISION = "https://download.pytorch.org/models"


def _imgclsmob(arch: str, pytorchcv_name: str, error: str, sha1: str, release: str, num_params: int,
               top1_error: float, top5_error: float) -> Pretrained:
    """A pytorchcv/imgclsmob release: `NAME-ERROR-SHA1[:8].pth` zipped, its SHA-1 in model_metainfos.csv."""
    member = f"{pytorchcv_name}-{error}-{sha1[:8]}.pth"
    return Pretrained(arch=arch, tag="imgclsmob", url=f"{IMGCLSMOB}/{release}/{member}.zip", file_name=f"{member}.zip",
                      member=member, checksum=f"sha1:{sha1}", layout="pytorchcv_bam" if arch.startswith("bam_")
                      else "pytorchcv", num_params=num_params, top1=round(100 - top1_error, 2),
                      top5=round(100 - top5_error, 2), reported_by=IMGCLSMOB_README, license="MIT",
                      note=f"pytorchcv `{pytorchcv_name}` ({release}), {IMGCLSMOB_NOTE}")


def _torchvision(depth: int, version: int, sha256_prefix: str, top1: float, top5: float, num_params: int) -> Pretrained:
    file_name = f"resnet{depth}-{sha256_prefix}.pth"
    return Pretrained(arch=f"resnet{depth}", tag="tv_in1k" if version == 1 else "tv2_in1k",
                      url=f"{TORCHVISION}/{file_name}", file_name=file_name, checksum=f"sha256:{sha256_prefix}",
                      layout="torchvision", num_params=num_params, top1=top1, top5=top5,
                      reported_by="torchvision ResNet" f"{depth}_Weights.IMAGENET1K_V{version}", license="BSD-3-Clause",
                      preprocessing=dict(RESIZE_256 if version == 1 else RESIZE_232),
                      note=f"torchvision IMAGENET1K_V{version} weights" + (" (new training recipe)" if version == 2 else ""))


# Facts checked against pytorchcv 0.0.74 (models/common/model_metainfos.csv, model_store.py's URL
# scheme), imgclsmob's pytorch/README.md (the accuracy table), torchvision 0.29.1 (weights enums) and
# Jongchan/attention-module's README (commit 459efad) and LICENSE.
_ENTRIES = [
    _imgclsmob("cbam_resnet50", "cbam_resnet50", "0505", "d8cf8488efb97afecd6b3287a3ca9fa093fc3127", "v0.0.537",
               28_089_624, 20.17, 5.05),
    Pretrained(arch="cbam_resnet50", tag="official",
               url="https://drive.google.com/file/d/1mvAVvhLR_2XY_bPYxh-SEz4vDmGzSArO/view",
               file_name="RESNET50_CBAM_new_name_wrap.pth", checksum=None, layout="official", num_params=28_089_624,
               top1=77.622, top5=93.948, reported_by="Jongchan/attention-module README", license="MIT", manual=True,
               note="the paper authors' release (100 epochs); a Google Drive file: download it in a browser; "
                    "no checksum published"),
    _imgclsmob("bam_resnet50", "bam_resnet50", "0547", "a04adf3c93f56836509f66668aa90360c9688eb8", "v0.0.499",
               25_915_099, 20.91, 5.47),
    Pretrained(arch="bam_resnet50", tag="official",
               url="https://drive.google.com/file/d/1auVf70gfL0ol40bvaX5rlbpn9cKIxhAL/view",
               file_name="RESNET50_IMAGENET_BAM_best.pth.tar", checksum=None, layout="official", num_params=25_915_099,
               top1=76.860, top5=93.416, reported_by="Jongchan/attention-module README", license="MIT", manual=True,
               note="the paper authors' release (90 epochs); a Google Drive file: download it in a browser; "
                    "no checksum published"),
    _imgclsmob("se_resnet18", "seresnet18", "0961", "022123a5e88c9917e63165f5b5a7808a606d452a", "v0.0.355",
               11_778_592, 28.18, 9.61),
    _imgclsmob("se_resnet50", "seresnet50b", "0539", "459e6871e944d1c7102ee9c055ea428b8d9a168c", "v0.0.387",
               28_088_024, 20.79, 5.39),
    _imgclsmob("se_resnet101", "seresnet101b", "0487", "b83a20fd2ad9a32e0fe5cb3daef45aac03ea3194", "v0.0.460",
               49_326_872, 19.70, 4.87),
    _torchvision(18, 1, "f37072fd", 69.758, 89.078, 11_689_512),
    _torchvision(34, 1, "b627a593", 73.314, 91.42, 21_797_672),
    _torchvision(50, 1, "0676ba61", 76.13, 92.862, 25_557_032),
    _torchvision(50, 2, "11ad3fa6", 80.858, 95.434, 25_557_032),
    _torchvision(101, 1, "63fe2227", 77.374, 93.546, 44_549_160),
    _torchvision(101, 2, "cd907fc2", 81.886, 95.78, 44_549_160),
    _torchvision(152, 1, "394f9c45", 78.312, 94.046, 60_192_808),
    _torchvision(152, 2, "f82ba261", 82.284, 96.002, 60_192_808),
    # pytorchcv's plain ResNets with the stride on the 3x3 convolution (its `resnet50` etc. are v1).
    _imgclsmob("resnet18", "resnet18", "0896", "77a56f155214819bfc79ff09795370f955b20e6d", "v0.0.478",
               11_689_512, 26.94, 8.96),
    _imgclsmob("resnet34", "resnet34", "0780", "3f775482a327e5fc4850fbb77785bfc55e171e5f", "v0.0.291",
               21_797_672, 24.84, 7.80),
    _imgclsmob("resnet50", "resnet50b", "0638", "8a5473ef985d65076a3758117ad5700d726bd952", "v0.0.308",
               25_557_032, 22.39, 6.38),
    _imgclsmob("resnet101", "resnet101b", "0530", "f059ba3c7fa4a65f2da6e17f3718662d59836637", "v0.0.357",
               44_549_160, 20.59, 5.30),
    _imgclsmob("resnet152", "resnet152b", "0445", "2f420307673264444e8457e2050b5d6b131002d7", "v0.0.517",
               60_192_808, 19.01, 4.45),
]
# The ResNeXts, Wide ResNets and MobileNets (issue 21): torchvision 0.29.1's weights enums (file
# names carry 8 hex digits of SHA-256) and pytorchcv 0.0.74's model_metainfos.csv (SHA-1, release,
# top-5 error x 100 in the file name; the csv has no top-1 error, so top1 is None).
_ENTRIES += [
    Pretrained(arch=arch, tag="tv_in1k" if version == 1 else "tv2_in1k", url=f"{TORCHVISION}/{arch}-{sha}.pth",
               file_name=f"{arch}-{sha}.pth", checksum=f"sha256:{sha}", layout="torchvision", num_params=params,
               top1=top1, top5=top5, reported_by=f"torchvision {enum}.IMAGENET1K_V{version}", license="BSD-3-Clause",
               preprocessing=dict(RESIZE_256 if resize == 256 else RESIZE_232),
               note=f"torchvision IMAGENET1K_V{version} weights" + (" (new training recipe)" if version == 2 else ""))
    for arch, enum, version, sha, params, top1, top5, resize in (
        ("resnext50_32x4d", "ResNeXt50_32X4D_Weights", 1, "7cdf4587", 25_028_904, 77.618, 93.698, 256),
        ("resnext50_32x4d", "ResNeXt50_32X4D_Weights", 2, "1a0047aa", 25_028_904, 81.198, 95.34, 232),
        ("resnext101_32x8d", "ResNeXt101_32X8D_Weights", 1, "8ba56ff5", 88_791_336, 79.312, 94.526, 256),
        ("resnext101_32x8d", "ResNeXt101_32X8D_Weights", 2, "110c445d", 88_791_336, 82.834, 96.228, 232),
        ("resnext101_64x4d", "ResNeXt101_64X4D_Weights", 1, "173b62eb", 83_455_272, 83.246, 96.454, 232),
        ("wide_resnet50_2", "Wide_ResNet50_2_Weights", 1, "95faca4d", 68_883_240, 78.468, 94.086, 256),
        ("wide_resnet50_2", "Wide_ResNet50_2_Weights", 2, "9ba9bcbe", 68_883_240, 81.602, 95.758, 232),
        ("wide_resnet101_2", "Wide_ResNet101_2_Weights", 1, "32ee1156", 126_886_696, 78.848, 94.284, 256),
        ("wide_resnet101_2", "Wide_ResNet101_2_Weights", 2, "d733dc28", 126_886_696, 82.51, 96.02, 232),
    )
] + [
    Pretrained(arch=arch, tag="imgclsmob", url=f"{IMGCLSMOB}/{release}/{name}-{error}-{sha1[:8]}.pth.zip",
               file_name=f"{name}-{error}-{sha1[:8]}.pth.zip", member=f"{name}-{error}-{sha1[:8]}.pth",
               checksum=f"sha1:{sha1}", layout=layout, num_params=params, top1=None,
               top5=round(100 - int(error) / 100, 2), reported_by=IMGCLSMOB_README, license="MIT",
               note=f"pytorchcv `{name}` ({release}), {IMGCLSMOB_NOTE}")
    for arch, name, error, sha1, release, params, layout in (
        ("resnext50_32x4d", "resnext50_32x4d", "0560", "d7976503d13734114364e0dfef1d22f6d76546d9", "v0.0.498",
         25_028_904, "pytorchcv"),
        ("resnext101_32x4d", "resnext101_32x4d", "0434", "5ac165981bac62627719b3362b31b456cba05df4", "v0.0.530",
         44_177_704, "pytorchcv"),
        ("se_resnext50_32x4d", "seresnext50_32x4d", "0451", "52029a7f6170873b2d50a7016fba053e98183f7b", "v0.0.505",
         27_559_896, "pytorchcv"),
        ("se_resnext101_32x4d", "seresnext101_32x4d", "0467", "c738e758c535fac87027fc4b9271a7cb95442505", "v0.0.529",
         48_955_416, "pytorchcv"),
        ("mobilenet_w1", "mobilenet_w1", "0895", "7e1d739f0fd4b95c16eef077c5dc0a5bb1da8ad5", "v0.0.155",
         4_231_976, "pytorchcv_mobilenet"),
        ("mobilenet_w3d4", "mobilenet_w3d4", "1076", "d801bcaea83885b16a0306b8b77fe314bbc585c3", "v0.0.130",
         2_585_560, "pytorchcv_mobilenet"),
        ("mobilenet_wd2", "mobilenet_wd2", "1355", "41a21242c95050407df876cfa44bb5d3676aa751", "v0.0.156",
         1_331_592, "pytorchcv_mobilenet"),
        ("mobilenet_wd4", "mobilenet_wd4", "2249", "1ad5e8fe8674cdf7ffda8450095eb96d227397e0", "v0.0.62",
         470_072, "pytorchcv_mobilenet"),
    )
]
# name ('ARCH.TAG') -> entry; an architecture's first entry is its default.
PRETRAINED: dict[str, Pretrained] = {entry.name: entry for entry in _ENTRIES}


def register(entry: Pretrained) -> None:
    """Add (or replace) an entry, e.g. a mirror or your own published checkpoint."""
    PRETRAINED[entry.name] = entry


def list_pretrained(pattern: str = "*") -> list[str]:
    """Names ('ARCH.TAG') of the registered checkpoints matching a shell-style `pattern` ('cbam_*')."""
    return [name for name in PRETRAINED if fnmatch.fnmatchcase(name, pattern)]


def get(name: str, tag: str | None = None) -> Pretrained:
    """The entry 'ARCH.TAG' (`name`, or `name` 'ARCH' with `tag`); 'ARCH' alone is its first (default) entry.

    Raises:
      ValueError: no such entry (the message lists what there is).
    """
    if tag is not None and "." not in name:
        name = tag if "." in tag else f"{name}.{tag}"  # a tag may be given as the full name
    if name in PRETRAINED:
        return PRETRAINED[name]
    defaults = [entry for entry in PRETRAINED.values() if entry.arch == name]
    if defaults:
        return defaults[0]
    arch, _, wanted = name.partition(".")
    tags = [entry.tag for entry in PRETRAINED.values() if entry.arch == arch]
    if tags:
        raise InvalidInput(f"{arch} has no pretrained weights tagged {wanted!r}; its tags: {', '.join(tags)}.")
    archs = sorted({entry.arch for entry in PRETRAINED.values()})
    raise InvalidInput(f"No pretrained weights named {name!r}; published for: {', '.join(archs)} "
                     "(`cbam-jax list-pretrained`).")


def cache_dir() -> Path:
    """`$CBAM_JAX_CACHE`, or ~/.cache/cbam_jax."""
    return cache_root()


def pickup_path(entry: Pretrained) -> Path:
    """Where a file downloaded by hand is picked up: `$CBAM_JAX_CACHE/downloads/FILE_NAME`."""
    return cache_dir() / "downloads" / entry.file_name


def partial_path(entry: Pretrained) -> Path:
    """Where a download in progress is written, and a killed one resumed from:
    `$CBAM_JAX_CACHE/downloads/STEM.partial.SUFFIX` (the suffix kept: it tells the reader the file type)."""
    name = Path(entry.file_name)
    return cache_dir() / "downloads" / f"{name.stem}.partial{name.suffix}"


def model_dir(entry: Pretrained) -> Path:
    """The converted model's pretrained directory in the cache."""
    return cache_dir() / "models" / entry.name


def load_entry(entry: Pretrained | str) -> tuple[ResNet, dict[str, Any]]:
    """(model, variables) of a registered checkpoint: from the cache, else downloaded, verified,
    converted and cached (see the module docstring). A cached model is verified on every load
    (`cbam_jax.pretrained` checks the SHA-256 recorded with it): a damaged one is said in one
    line on stderr, removed and fetched again, never used.

    Raises:
      DownloadError: no network, a cut or failed download, or a wrong checksum; the message names the
        URL, the expected checksum and the path where a file downloaded by hand is picked up.
      ValueError: an unknown name, or a file that does not convert to the entry's model.
    """
    entry = get(entry) if isinstance(entry, str) else entry
    target = model_dir(entry)
    cached = _cached(entry, target)
    if cached is not None:
        return cached
    with _fetching(entry) as partial:
        cached = _cached(entry, target)  # cached by a process this one waited for
        if cached is not None:
            return cached
        with _verified_checkpoint(entry, partial) as (checkpoint, origin):
            model, variables = _convert(entry, checkpoint)
            metadata = _metadata(entry, origin, checkpoint)
        try:
            save_pretrained(target, model, variables, metadata=metadata)
        except FileExistsError:  # cached meanwhile by a process that did not take turns (no fcntl)
            pass
        return model, variables


def load(name: str) -> tuple[ResNet, dict[str, Any]]:
    """(model, variables) of the registered checkpoint `name` ('cbam_resnet50', 'resnet50.tv_in1k');
    `cbam_jax.load` takes any source of weights."""
    text = os.fspath(name)
    if text not in PRETRAINED and (text.startswith("hf-hub:") or Path(text).expanduser().exists()):
        raise InvalidInput(f"cbam_jax.zoo.load takes registered names (`cbam-jax list-pretrained`); for the folder, "
                           f"file or Hub id {text!r} use cbam_jax.load({text!r}).")
    return load_entry(get(text))


def _cached(entry: Pretrained, target: Path) -> tuple[ResNet, dict[str, Any]] | None:
    """The cached model, verified; None when there is none, or it was damaged or is in the old orbax
    format (then it is removed, to be fetched and converted again)."""
    if not target.is_dir():
        return None
    if (target / WEIGHTS_FILE).is_file():
        try:
            return load_pretrained(target)
        except ValueError as error:  # damaged: a changed bit, a truncated file, a broken config
            print(f"cbam-jax: the cached {entry.name} at {target} is damaged ({one_line(error)}); removed, "
                  "fetching it again.", file=sys.stderr)
    shutil.rmtree(target, ignore_errors=True)  # written whole by atomic_output: anything else is stale
    return None


def pretrained_variables(name: str, tag: bool | str, model: ResNet) -> dict[str, Any]:
    """Variables for `model` (built by `create_model(name, ...)`) from the registered weights of
    `name`: `tag` True for the default, else a tag. A backbone (`features_only`) drops the head;
    another class count gets a new head (initialised with key 0)."""
    entry = get(name, tag if isinstance(tag, str) else None)
    if entry.arch != name:
        raise InvalidInput(f"Pretrained weights {entry.name!r} are for {entry.arch}, not {name}; to start a {name} "
                         "from them use cbam_jax.init_from.")
    published_variant = get_layout(entry.layout).variant
    if model.attention == "cbam" and variant_of(model) != published_variant:
        raise InvalidInput(f"{entry.name} holds {published_variant}-variant weights; create the model with "
                         f"variant={published_variant!r}.")
    _, variables = load_entry(entry)
    variables, _ = transfer_variables(variables, model, new_attention=False)
    return variables


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the published classifiers' index order."""
    return IMAGENET_CLASSES_FILE.read_text().splitlines()


# ---- download, verification, conversion -------------------------------------------------------------------------

@contextlib.contextmanager
def _fetching(entry: Pretrained) -> Iterator[BinaryIO]:
    """`with _fetching(entry) as partial`: the entry's partial download (`partial_path`), opened for reading
    and appending, and held by this process alone: another process fetching the same entry waits here
    (a lock on the file, where the system has fcntl) until this one is done.

    On exit the partial file is removed, and the folders made for it (a failed fetch leaves nothing),
    unless the exit is an interruption (Ctrl-C, SystemExit): then the bytes downloaded so far stay for
    the next load to resume from, as after a kill.
    """
    path = partial_path(entry)
    created: list[Path] = []
    partial = _locked(path, entry, created)
    keep = False
    try:
        yield partial
    except Exception:
        raise
    except BaseException:
        keep = partial.seek(0, os.SEEK_END) > 0
        raise
    finally:
        # All cleanup happens while still locked: a waiting process wakes to a finished state (no
        # file, no folders) and makes its own, never to folders vanishing under it.
        if not keep:
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(partial.fileno()), os.stat(path)):
                    path.unlink()  # a waiting process then sees that and opens a new one
        for folder in sorted(set(created), key=lambda folder: len(folder.parts), reverse=True):
            with contextlib.suppress(OSError):  # kept if something else was put there meanwhile
                folder.rmdir()
        partial.close()  # unlocks


def _locked(path: Path, entry: Pretrained, created: list[Path]) -> BinaryIO:
    """`path` opened 'a+b' (created if absent, and its folders: added to `created`) and locked exclusively;
    waits (saying so) while another process holds it. Tries again when the file it locked was removed
    meanwhile by the process it waited for, or its folder by a process finishing its own fetch (which
    removes the folders it made, between this one's mkdir and open)."""
    while True:
        try:
            created += make_parents(path.parent)
            partial = open(path, "a+b")  # noqa: SIM115 (closed by _fetching)
        except FileNotFoundError:
            if path.parent.is_dir():
                raise  # not a vanished folder (e.g. a dangling link at `path`): trying again would not help
            continue
        if fcntl is None:
            return partial
        try:
            fcntl.flock(partial, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"Waiting for another process fetching {entry.name} ({path}) ...", file=sys.stderr)
            fcntl.flock(partial, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(partial.fileno()), os.stat(path)):
                return partial
        partial.close()


@contextlib.contextmanager
def _verified_checkpoint(entry: Pretrained, partial: BinaryIO) -> Iterator[tuple[Path, str]]:
    """`with _verified_checkpoint(entry, partial) as (path, origin)`: the checkpoint file, verified, and
    where it came from: a file put at `pickup_path` by hand, else downloaded into `partial` (resuming
    from the bytes it holds). Temporary files (an extracted zip member) are removed on exit."""
    temporary: list[Path] = []
    try:
        manual = pickup_path(entry)
        candidates = [manual] + ([manual.with_name(entry.member)] if entry.member else [])
        found = next((path for path in candidates if path.is_file()), None)
        if found is not None:
            origin = f"{found} (downloaded by hand)"
            yield _verified(entry, found, temporary, str(found), by_hand=True), origin
        elif entry.manual:
            raise DownloadError(f"{entry.name} cannot be downloaded automatically: open {entry.url} in a browser, "
                                f"save the file as {manual} and load it again ({_expected(entry)}).")
        else:
            path = Path(partial.name)
            if entry.checksum is None:  # bytes kept from an earlier run could not be verified
                partial.truncate(0)
            resumed = partial.seek(0, os.SEEK_END) > 0
            _download(entry, partial)
            try:
                checkpoint = _verify_download(entry, path, temporary)
            except DownloadError:
                if not resumed:
                    raise
                partial.truncate(0)  # the kept bytes were not this file's beginning: once more from the start
                _download(entry, partial)
                checkpoint = _verify_download(entry, path, temporary)
            yield checkpoint, entry.url
    finally:
        for path in reversed(temporary):
            path.unlink(missing_ok=True)


def _verify_download(entry: Pretrained, path: Path, temporary: list[Path]) -> Path:
    """The downloaded checkpoint at `path`, verified (the member of a zip archive); DownloadError if not."""
    return _verified(entry, path, temporary, entry.url, by_hand=False)


def _temporary(folder: Path, name: str, temporary: list[Path]) -> Path:
    """A new empty file `.NAME.partial-XXXX.SUFFIX` in the existing `folder` (the suffix tells the reader
    the file type), recorded in `temporary` for removal."""
    handle, path = tempfile.mkstemp(prefix=f".{name}.partial-", suffix=Path(name).suffix, dir=folder)
    os.close(handle)
    temporary.append(Path(path))
    return Path(path)


def _verified(entry: Pretrained, path: Path, temporary: list[Path], origin: str, *, by_hand: bool) -> Path:
    """The checkpoint `path` holds, its checksum verified: for an entry with a `member`, the member
    extracted from the archive `path` (beside it) when `path` is that archive, else `path` itself as
    the member (put by hand unzipped). A `torch.save` file is itself a zip, so what decides is whether
    the archive holds a file named `member`, never whether `path` is a zip. `origin` names `path` in
    messages."""
    if entry.member is not None and _holds(path, entry.member):
        member = _temporary(path.parent, entry.member, temporary)
        try:
            with zipfile.ZipFile(path) as archive, archive.open(entry.member) as inside, open(member, "wb") as out:
                shutil.copyfileobj(inside, out, CHUNK)
        except (KeyError, zipfile.BadZipFile, OSError) as error:
            raise DownloadError(f"{origin} is not the expected archive holding {entry.member} ({error}); "
                                f"{_by_hand(entry)}.") from None
        _check(entry, member, f"{entry.member} in {origin}", by_hand=by_hand)
        return member
    _check(entry, path, origin, by_hand=by_hand)
    return path


def _holds(path: Path, member: str) -> bool:
    """Whether `path` is a zip archive with a file named `member`."""
    try:
        with zipfile.ZipFile(path) as archive:
            return member in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _check(entry: Pretrained, path: Path, origin: str, *, by_hand: bool) -> None:
    """DownloadError unless `path` has the entry's checksum; a published prefix (torchvision's 8 hex
    digits of SHA-256) is matched as a prefix of the full digest."""
    if entry.checksum is None:
        return
    algorithm, expected = entry.checksum.split(":")
    digest = _digest(path, algorithm)
    if not digest.startswith(expected.lower()):
        kept = "it was left there" if by_hand else "nothing was kept"
        raise DownloadError(f"{origin} has {algorithm.upper()} {digest}, not the published {expected} of "
                            f"{entry.checked_file} ({kept}); {_by_hand(entry)}.")


def _download(entry: Pretrained, out: BinaryIO) -> None:
    """`entry.url` appended to `out` from the bytes it holds already (an HTTP Range request), resuming with
    Range after a cut while attempts make progress."""
    received, last_error = out.seek(0, os.SEEK_END), None
    try:
        with _progress_bar(entry.file_name, received) as bar:
            for _ in range(ATTEMPTS):
                before = received
                try:
                    _fetch(entry.url, out, received, bar)
                    return
                except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                    received, last_error = out.tell(), error
                    permanent = isinstance(error, urllib.error.HTTPError) and error.code not in (408, 429, 500, 502,
                                                                                                 503, 504)
                    if permanent or received <= before:  # refused, unreachable, or no progress: give up
                        break
    finally:
        out.flush()  # the checksum is computed from the file
    reason = getattr(last_error, "reason", None) or last_error
    raise DownloadError(f"Cannot download {entry.name} from {entry.url} ({type(last_error).__name__}: "
                        f"{str(reason).splitlines()[0] if str(reason) else 'connection closed'}; nothing was kept); "
                        f"{_by_hand(entry)}.")


class _NoBar:
    """What `_fetch` asks of a progress bar, doing nothing (tqdm, of the `train` extra, is not installed)."""

    total: int | None = None

    def update(self, count: int) -> None:
        pass

    def reset(self) -> None:
        pass


def _progress_bar(name: str, received: int) -> contextlib.AbstractContextManager:
    """A tqdm bar of bytes on stderr (on terminals), or a silent stand-in without tqdm."""
    try:
        from tqdm import tqdm  # optional: only a nicety
    except ImportError:
        return contextlib.nullcontext(_NoBar())
    return tqdm(desc=name, unit="B", unit_scale=True, unit_divisor=1024, initial=received, disable=None,
                file=sys.stderr)


def _fetch(url: str, out: BinaryIO, received: int, bar: Any) -> int:
    """One request: append `url`'s bytes from `received` on to `out` (from 0 if the server ignores the Range).
    Returns the new size; ConnectionError when the connection closes before Content-Length bytes came."""
    headers = {"User-Agent": "cbam-jax", **({"Range": f"bytes={received}-"} if received else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and received:  # nothing after `received`: the kept bytes are the whole file (or
            return received                 # something else, which the checksum will tell)
        raise
    with response:
        if received and response.status != 206:  # the server sends the whole file again
            out.seek(0)
            out.truncate()
            received = 0
            bar.reset()
        length = response.headers.get("Content-Length")
        end = received + int(length) if length and length.isdigit() else None
        bar.total = end
        while chunk := response.read1(CHUNK):  # what has arrived, written at once: a kill loses nothing of it
            out.write(chunk)
            out.flush()
            received += len(chunk)
            bar.update(len(chunk))
    if end is not None and received < end:
        raise ConnectionError(f"the connection closed after {received:,} of {end:,} bytes")
    return received


def _by_hand(entry: Pretrained) -> str:
    return f"download it by hand and put it at {pickup_path(entry)} ({_expected(entry)})"


def _expected(entry: Pretrained) -> str:
    if entry.checksum is None:
        return "no published checksum"
    algorithm, digest = entry.checksum.split(":")
    prefix = " prefix" if len(digest) < {"sha1": 40, "sha256": 64}[algorithm] else ""
    return f"{algorithm.upper()}{prefix} of {entry.checked_file}: {digest}"


def _digest(path: Path, algorithm: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _convert(entry: Pretrained, checkpoint: Path) -> tuple[ResNet, dict[str, Any]]:
    """The checkpoint as the entry's model; ValueError if it is another model or parameter count."""
    model, variables = from_torch(checkpoint, arch=entry.arch, layout=entry.layout)
    count = sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(variables["params"]))
    if count != entry.num_params:
        raise InvalidInput(f"{checkpoint} converts to {count:,} parameters, but {entry.name} has {entry.num_params:,}.")
    return model, variables


def _metadata(entry: Pretrained, origin: str, checkpoint: Path) -> dict[str, Any]:
    source = {"name": entry.name, "url": entry.url, "file": entry.checked_file, "from": origin,
              "layout": entry.layout, "license": entry.license, "reported_by": entry.reported_by}
    if entry.checksum is None:  # record what was loaded, since nobody published what it should be
        source["sha256"] = _digest(checkpoint, "sha256")
    else:
        source["checksum"] = entry.checksum
    metrics = {"dataset": "imagenet-1k val", "top1": entry.top1, "top5": entry.top5, "reported_by": entry.reported_by}
    return {"class_names": imagenet_class_names(), "preprocessing": dict(entry.preprocessing), "source": source,
            "metrics": metrics}


# ---- `cbam-jax list-pretrained` ---------------------------------------------------------------------------------

COLUMNS = ("name", "source", "params", "top-1", "checksum", "license")


def table_rows(pattern: str = "*") -> list[tuple[str, ...]]:
    """One row per entry matching `pattern`: COLUMNS as text."""
    rows = []
    for name in list_pretrained(pattern):
        entry = PRETRAINED[name]
        source = f"{entry.reported_by.split()[0]}{' (manual download)' if entry.manual else ''}"
        rows.append((name, source, f"{entry.num_params:,}", f"{entry.top1:.2f}" if entry.top1 else "-",
                     _short_checksum(entry), entry.license))
    return rows


def _short_checksum(entry: Pretrained) -> str:
    if entry.checksum is None:
        return "none published"
    algorithm, digest = entry.checksum.split(":")
    return f"{algorithm} {digest}" + (" (prefix)" if len(digest) < 40 else "")


def format_table(rows: list[tuple[str, ...]], *, markdown: bool = False) -> str:
    """The table as aligned text, or as a Markdown table (the README's)."""
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(str(cell)) for cell in column) for column in zip(COLUMNS, *rows)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [COLUMNS, *rows])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `cbam-jax list-pretrained`."""
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style filter on the names, e.g. 'cbam_*'")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--cached", action="store_true", help="show where each converted model is cached, if it is")


def run(args: argparse.Namespace) -> int:
    """Print the table of registered checkpoints; a UserError (exit code 1, one line on stderr) if none matches."""
    rows = table_rows(args.pattern)
    if not rows:
        raise InvalidInput(f"no pretrained weights match {args.pattern!r}; try 'cbam_*' or no pattern for all "
                           f"{len(PRETRAINED)}.")
    print(format_table(rows, markdown=args.markdown))
    if args.cached:
        for name in list_pretrained(args.pattern):
            path = model_dir(PRETRAINED[name])
            print(f"{name}: {path if path.is_dir() else 'not cached'}")
    return 0
