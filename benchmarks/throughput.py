"""Images/s of cbam-jax (jit) and the same networks in PyTorch, each framework in its own processes.

    python -m benchmarks.throughput --quick            # ~15 min on 2 idle CPU cores (estimate)
    python -m benchmarks.throughput --plot bench.png   # the full preset (torch.compile, bf16, XLA baseline)
    python -m benchmarks.throughput --quick --in-process   # the old way: every variant in one process
    python -m benchmarks.throughput --preset families --modes train   # CBAM-ResNeXt-50 and CBAM-MobileNet
    python -m benchmarks.throughput --cases cbam_resnet50:512:2:fcos --impls jax --modes train  # FCOS detector step

For every case (model, input size, batch) it times inference and a full training step (forward,
softmax cross-entropy, backward, SGD with momentum, BatchNorm in training mode) of the CBAM-ResNet
and of the plain ResNet of the same depth, in

- cbam-jax under `jax.jit` with donation, with the CPU fast path of `cbam_jax.layers.cpu_ops`
  ('jax': oneDNN convolutions and native max gradients where available, in a process started
  with glibc's huge-page tunable as train.py restarts itself, `cbam_jax.host_memory`), the same
  without the tunable ('jax-glibc'), without the native kernels ('jax-nodnn'), with XLA's own
  kernels only ('jax-xla') and with each residual block recomputed in the backward pass
  (`ResNet(remat='blocks')`, 'jax-remat': less memory for more compute);
- PyTorch eager NCHW ('torch'), eager channels-last ('torch-cl') and torch.compile ('torch-compile');
  bfloat16 there is PyTorch's autocast (CPU or CUDA), beside JAX's bfloat16 activations.

By default (how a user runs them) every variant runs in a process of its own, one after the other,
for several rounds: in each round the implementations of the same (case, net, mode, dtype)
alternate, and their order is reversed every other round (A B, B A, A B, ...), so slow drifts of
a shared machine's load hit both sides alike. Each process compiles, warms up and times `--repeats`
calls; a round's value is their median. Reported: the median over rounds with the min-max range,
and the ratio of cbam-jax over each other implementation computed per round, with its median,
min-max and interquartile range over the rounds. `--in-process` runs every variant of a case in
one process instead, round-robin (one call of each variant per round, the order rotated).

Compilation (JAX: lower + compile, from the run's own persistent cache after the first round;
PyTorch: the first call) is reported separately and never counted as throughput. Memory on the CPU
is the peak resident set size above the resting level during the first step ('step MiB'), sampled
every 2 ms by a thread (psutil), because XLA's buffers are invisible to tracemalloc, and the whole
process's peak resident set ('process MiB', VmHWM: libraries, model, optimiser state, compilation
and steps); on a GPU it is device memory (XLA's buffer assignment for the compiled program;
PyTorch's allocator peak).

Model FLOPs count the convolutions and matrix products of the forward pass (1 multiply-add = 2
FLOPs; a training step = 3x the forward); MFU divides model FLOP/s by the dense matrix-product
rate measured in the same run for that dtype on that device (the faster of `jnp.dot` and
`torch.mm` on square matrices of 4096 (CPU) or 8192 (GPU)). Every table names the CPU (lscpu's
model name and its vector/matrix flags).
"""

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

# JAX would otherwise take 75% of a GPU's memory at start, leaving PyTorch too little.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from cbam_jax.atomic import atomic_output  # noqa: E402
from cbam_jax.host_memory import with_huge_pages  # noqa: E402
from cbam_jax.registry import create_model, parse_name  # noqa: E402

# benchmark name -> (ResNet `implementation` option, native kernels (oneDNN) on the CPU path,
# glibc's huge-page tunable `cbam_jax.host_memory.TUNABLE` as train.py and `cbam-jax eval` set it,
# ResNet `remat` option: 'blocks' recomputes each block in the backward pass, less memory)
JAX_IMPLS = {"jax": ("auto", True, True, "none"), "jax-glibc": ("auto", True, False, "none"),
             "jax-nodnn": ("auto", False, True, "none"), "jax-xla": ("xla", False, True, "none"),
             "jax-remat": ("auto", True, True, "blocks")}
TORCH_IMPLS = ("torch", "torch-cl", "torch-compile")
IMPLS = (*JAX_IMPLS, *TORCH_IMPLS)
NUM_CLASSES = {"imagenet": 1000, "cifar": 10}
# Detector cases (MODEL:SIZE:BATCH:fcos): FCOS with its paper's head (FPN 256, 4 tower convs,
# GroupNorm 32) on the model as backbone, COCO's 80 classes, DETECTION_BOXES ground-truth boxes per
# image; a train step is cbam_jax.detection.train.train_step (assignment, FCOS loss, SGD), an
# inference call the forward pass with decoding and NMS (cbam_jax.detection.evaluate.predict).
DETECTOR = "fcos"
DETECTION_CLASSES = 80
DETECTION_BOXES = 8
DETECTOR_OPTIONS: dict[str, Any] = {"width": 64, "fpn_channels": 256, "head_convs": 4, "head_norm_groups": 32}


@dataclasses.dataclass(frozen=True)
class Case:
    """One network input: `model` is a registered CBAM name; its plain twin drops the 'cbam_' prefix."""

    model: str
    size: int
    batch: int
    stem: str = "imagenet"
    detector: bool = False  # the model as the backbone of an FCOS detector (':fcos')

    @property
    def name(self) -> str:
        return (f"{self.model}{'-cifar' if self.stem == 'cifar' else ''}{' fcos' if self.detector else ''} "
                f"{self.size}px b{self.batch}")

    @classmethod
    def parse(cls, text: str) -> "Case":
        """'cbam_resnet50:224:8', 'cbam_resnet18:32:64:cifar', 'cbam_mobilenet_w1:224:32' (a registered CBAM
        name) or 'cbam_resnet50:512:2:fcos' (an FCOS detector on that backbone)."""
        parts = text.split(":")
        if len(parts) not in (3, 4) or not parts[1].isdigit() or not parts[2].isdigit():
            raise argparse.ArgumentTypeError(f"case must be MODEL:SIZE:BATCH[:STEM or :{DETECTOR}], e.g. "
                                             f"cbam_resnet18:32:64:cifar or cbam_resnet50:512:2:{DETECTOR}; got {text!r}.")
        try:
            parse_name(parts[0])
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if len(parts) == 4 and parts[3] == DETECTOR:  # detectors take the 'imagenet' stem (strides 8-32)
            return cls(parts[0], int(parts[1]), int(parts[2]), detector=True)
        stem = parts[3] if len(parts) == 4 else "imagenet"
        if stem not in NUM_CLASSES:
            raise argparse.ArgumentTypeError(f"the last field must be a stem ({sorted(NUM_CLASSES)}) or {DETECTOR!r}; "
                                             f"got {stem!r}.")
        return cls(parts[0], int(parts[1]), int(parts[2]), stem)


PRESETS = {
    "quick": {"cases": ["cbam_resnet50:224:8", "cbam_resnet18:32:64:cifar"], "impls": ["jax", "torch", "torch-cl"],
              "dtypes": ["float32"], "repeats": 3, "warmup": 1, "rounds": 3},
    "full": {"cases": ["cbam_resnet50:224:32", "cbam_resnet18:32:64:cifar"], "impls": list(IMPLS),
             "dtypes": ["float32", "bfloat16"], "repeats": 5, "warmup": 2, "rounds": 3},
    # The grouped and depthwise families on the CPU (oneDNN's grouped kernels), train steps against
    # PyTorch channels-last: CBAM-ResNeXt-50 32x4d at ResNet-50's batch, CBAM-MobileNet w1 (7x fewer FLOPs) at 32.
    "families": {"cases": ["cbam_resnext50_32x4d:224:8", "cbam_mobilenet_w1:224:32"], "impls": ["jax", "torch-cl"],
                 "dtypes": ["float32"], "repeats": 3, "warmup": 1, "rounds": 3},
    # Batches that fill a data-centre GPU (ResNet-50 at 256 in both frameworks at once overflowed an
    # 80 GB H100); jax-xla equals jax there (the CPU path is off).
    "gpu": {"cases": ["cbam_resnet50:224:128", "cbam_resnet18:32:512:cifar"], "impls": ["jax", "torch", "torch-cl"],
            "dtypes": ["float32", "bfloat16"], "repeats": 10, "warmup": 3, "rounds": 2},
}


@dataclasses.dataclass
class Variant:
    """One timed configuration and its results."""

    case: Case
    arch: str  # 'cbam' or 'plain'
    mode: str  # 'infer' or 'train'
    dtype: str
    impl: str
    step: Callable[[], None] | None = None
    compile_s: float = float("nan")  # the first (cold) compile
    times: list[float] = dataclasses.field(default_factory=list)  # every timed call
    round_medians: list[float] = dataclasses.field(default_factory=list)  # one per process round
    compile_s_all: list[float] = dataclasses.field(default_factory=list)  # one per process
    pids: list[int] = dataclasses.field(default_factory=list)  # the processes that measured it
    peak_mib: float = float("nan")
    process_peak_mib: float = float("nan")  # the whole process's peak RSS (CPU), the largest over its processes
    xla_temp_mib: float = float("nan")  # JAX: temporaries of the compiled program (XLA's buffer assignment)
    flops: float = float("nan")  # model FLOPs per call (convolutions and matrix products)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.case.name, self.arch, self.mode, self.dtype)

    def spec(self) -> dict[str, Any]:
        """What a child process needs to rebuild the variant."""
        return {"case": dataclasses.asdict(self.case), "arch": self.arch, "mode": self.mode, "dtype": self.dtype,
                "impl": self.impl}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "Variant":
        return cls(Case(**spec["case"]), spec["arch"], spec["mode"], spec["dtype"], spec["impl"])

    def summary(self, peak_flops: dict[str, float]) -> dict[str, Any]:
        """The variant's results; `peak_flops` maps a dtype to the measured matrix-product FLOP/s.

        With process rounds the step time is the median of the rounds' medians and min-max spans
        the rounds' medians; in one process, the median and range of the timed calls.
        """
        values = self.round_medians or self.times
        median = statistics.median(values)
        return {"case": self.case.name, "model": self.model_name, "size": self.case.size, "batch": self.case.batch,
                "arch": self.arch, "mode": self.mode, "dtype": self.dtype, "impl": self.impl,
                "step_s_median": median, "step_s_all": self.times, "round_medians_s": self.round_medians,
                "images_per_s": self.case.batch / median,
                "images_per_s_min": self.case.batch / max(values),
                "images_per_s_max": self.case.batch / min(values),
                "compile_s": self.compile_s, "compile_s_all": self.compile_s_all, "pids": self.pids,
                "peak_mib": self.peak_mib, "process_peak_mib": self.process_peak_mib, "xla_temp_mib": self.xla_temp_mib, "model_gflop": self.flops / 1e9,
                "gflops_per_s": self.flops / median / 1e9,
                "mfu": self.flops / median / peak_flops[self.dtype]}

    @property
    def model_name(self) -> str:
        return self.case.model if self.arch == "cbam" else self.case.model.replace("cbam_", "", 1)


# ----------------------------------------------------------------------------- JAX


def _subjaxprs(params: dict[str, Any]):
    """The jaxprs nested in an equation's parameters (jit, custom_vjp, remat, scan, cond branches)."""
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr


def _jaxpr_flops(jaxpr: Any) -> float:
    flops = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
            flops += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(kernel) / out_features
        elif eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            flops += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[a] for a in contract])
        for sub in _subjaxprs(eqn.params):
            flops += _jaxpr_flops(sub)
    return flops


def model_flops(case: Case, arch: str, mode: str) -> float:
    """FLOPs of one call: convolutions and matrix products of the forward (x3 for a train step), 1 MAC = 2."""
    return _forward_flops(case, arch) * (3 if mode == "train" else 1)


@functools.lru_cache(maxsize=None)
def _forward_flops(case: Case, arch: str) -> float:
    name = case.model if arch == "cbam" else case.model.replace("cbam_", "", 1)
    if case.detector:
        model = make_detector(name, jnp.float32, "xla", {})
    else:
        model = create_model(name, num_classes=NUM_CLASSES[case.stem], stem=case.stem, implementation="xla")
    images = jax.ShapeDtypeStruct((case.batch, case.size, case.size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    return _jaxpr_flops(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images).jaxpr)


def _matmul_flops(matmul: Callable[[], Any], synchronize: Callable[[Any], None], n: int, calls: int,
                  repeats: int) -> float:
    """FLOP/s of an n x n x n matrix product: median over `repeats` timings of `calls` back-to-back products."""
    synchronize(matmul())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = matmul()
        synchronize(out)
        times.append((time.perf_counter() - start) / calls)
    return 2.0 * n**3 / statistics.median(times)


def matmul_peak_flops(dtype: str, repeats: int = 5) -> float:
    """FLOP/s of a large square `jnp.dot` in `dtype` on JAX's default device."""
    n, calls = (4096, 1) if jax.default_backend() == "cpu" else (8192, 20)  # back-to-back calls hide launch gaps
    a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), jnp.dtype(dtype)) for i in (1, 2))
    matmul = jax.jit(jnp.dot)
    return _matmul_flops(lambda: matmul(a, b), lambda out: out.block_until_ready(), n, calls, repeats)


def torch_matmul_peak_flops(dtype: str, repeats: int = 5) -> float:
    """FLOP/s of a large square `torch.mm` in `dtype` on PyTorch's benchmark device (as `matmul_peak_flops`)."""
    import torch

    device = torch_device()
    n, calls = (4096, 1) if device == "cpu" else (8192, 20)
    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    synchronize = (lambda out: torch.cuda.synchronize()) if device == "cuda" else (lambda out: None)
    return _matmul_flops(lambda: torch.mm(a, b), synchronize, n, calls, repeats)


def make_train_step(model: Any, optimizer: optax.GradientTransformation) -> Callable:
    """(params, batch_stats, opt_state), images (B, H, W, 3), labels (B,) -> (new state, loss): one SGD step."""

    def train_step(state, x, y):
        params, batch_stats, opt_state = state

        def loss_fn(p):
            logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                          mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    return train_step


def make_detector(name: str, dtype: Any, implementation: str, options: dict[str, Any]):
    """The FCOS detector of a ':fcos' case on the backbone `name` (DETECTOR_OPTIONS)."""
    from cbam_jax.detection.detector import create_detector

    settings = dict(DETECTOR_OPTIONS)
    return create_detector(name, DETECTION_CLASSES, width=settings.pop("width"), dtype=dtype,
                           backbone_options={"implementation": implementation, **options}, **settings)


def detection_batch(batch: int, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random uint8 images and DETECTION_BOXES random boxes (1/16 to 1/2 of the side) per image, in
    data.TrainBatches' layout."""
    corners = rng.uniform(0, size / 2, (batch, DETECTION_BOXES, 2))
    sides = rng.uniform(size / 16, size / 2, (batch, DETECTION_BOXES, 2))
    return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            "boxes": np.concatenate([corners, corners + sides], -1).astype(np.float32),
            "labels": rng.integers(0, DETECTION_CLASSES, (batch, DETECTION_BOXES)).astype(np.int32),
            "mask": np.ones((batch, DETECTION_BOXES), bool)}


def classification_batch(case: Case) -> tuple[jax.Array, jax.Array]:
    """The fixed random batch a classification case runs on: images (B, S, S, 3) float32, labels (B,)."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((case.batch, case.size, case.size, 3), np.float32))
    return images, jnp.asarray(rng.integers(0, NUM_CLASSES[case.stem], case.batch))


def setup_jax(variant: Variant) -> None:
    """Compile the variant's jitted program and store a blocking `step`."""
    case = variant.case
    implementation, use_native, _, remat = JAX_IMPLS[variant.impl]
    options = {"remat": remat} if remat != "none" else {}  # a ResNet option (the MobileNets have none)
    if case.detector:
        detector = make_detector(variant.model_name, jnp.dtype(variant.dtype), implementation, options)
        batch = detection_batch(case.batch, case.size, np.random.default_rng(0))
        with _native_kernels(use_native):
            _compile_detector(variant, detector, batch)
        return
    model = create_model(variant.model_name, num_classes=NUM_CLASSES[case.stem], stem=case.stem,
                         dtype=jnp.dtype(variant.dtype), implementation=implementation, **options)
    images, labels = classification_batch(case)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
    with _native_kernels(use_native):  # read when tracing
        _compile_jax(variant, model, variables, images, labels)


@contextlib.contextmanager
def _native_kernels(enabled: bool):
    from cbam_jax.layers import native

    saved, native.ENABLED = native.ENABLED, enabled and native.ENABLED
    try:
        yield
    finally:
        native.ENABLED = saved


def _compile_jax(variant: Variant, model: Any, variables: Any, images: jax.Array, labels: jax.Array) -> None:
    start = time.perf_counter()
    if variant.mode == "infer":
        compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images).compile()
        variant.step = lambda: compiled(variables, images).block_until_ready()
    else:
        optimizer = optax.sgd(0.1, momentum=0.9)
        train_step = make_train_step(model, optimizer)
        state = [(variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))]
        compiled = jax.jit(train_step, donate_argnums=0).lower(state[0], images, labels).compile()

        def step() -> None:
            state[0], loss = compiled(state[0], images, labels)
            loss.block_until_ready()

        variant.step = step
    _record_compiled(variant, compiled, start)


def _compile_detector(variant: Variant, detector: Any, batch: dict[str, np.ndarray]) -> None:
    from cbam_jax.detection.evaluate import predict
    from cbam_jax.detection.train import train_step
    from cbam_jax.training.step import state_from_variables

    start = time.perf_counter()
    size, mean, std = variant.case.size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    variables = jax.jit(detector.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    if variant.mode == "infer":
        decoding = dict(score_threshold=0.05, pre_nms_top_k=1000, iou_threshold=0.6, max_detections=100)
        infer = functools.partial(predict, detector=detector, mean=mean, std=std, decoding=decoding)
        compiled = jax.jit(infer).lower(variables, batch["image"]).compile()
        variant.step = lambda: jax.block_until_ready(compiled(variables, batch["image"]))
    else:
        optimizer = optax.sgd(0.01, momentum=0.9)
        step_fn = functools.partial(train_step, model=detector, tx=optimizer,
                                    config_values=(mean, std, size, 1.5, 0.25, 2.0))
        state = [jax.jit(lambda v: state_from_variables(v, optimizer, False))(variables)]
        compiled = jax.jit(step_fn, donate_argnums=0).lower(state[0], batch).compile()

        def step() -> None:
            state[0], metrics = compiled(state[0], batch)
            metrics["loss"].block_until_ready()

        variant.step = step
    _record_compiled(variant, compiled, start)


def _record_compiled(variant: Variant, compiled: Any, start: float) -> None:
    """The compile time since `start` and XLA's memory figures of the compiled program."""
    variant.compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    if memory is not None:
        variant.xla_temp_mib = memory.temp_size_in_bytes / 2**20
        if jax.default_backend() != "cpu":
            variant.peak_mib = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                + memory.temp_size_in_bytes - memory.alias_size_in_bytes) / 2**20


# ----------------------------------------------------------------------------- PyTorch


def torch_device() -> str:
    """Where PyTorch runs: the GPU when JAX runs on one (both frameworks on the same device), else the CPU."""
    import torch

    if jax.default_backend() == "cpu":
        return "cpu"
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return "cuda"
    raise RuntimeError(f"JAX runs on {jax.default_backend()!r} but PyTorch cannot use that device, so the two would "
                       f"not be compared on the same hardware: pass --impls jax (or run both on the CPU with "
                       f"JAX_PLATFORMS=cpu).")


def setup_torch(variant: Variant) -> None:
    """Build the PyTorch twin and store a `step`; `compile_s` is the first call (compilation for torch.compile)."""
    import torch
    from torch.nn import functional as F

    from benchmarks.torch_models import twin

    case = variant.case
    device = torch_device()
    torch.manual_seed(0)
    model = twin(variant.model_name, NUM_CLASSES[case.stem], case.stem).to(device)
    images = torch.randn(case.batch, 3, case.size, case.size, device=device)
    labels = torch.randint(0, NUM_CLASSES[case.stem], (case.batch,), device=device)
    if variant.impl in ("torch-cl", "torch-compile"):
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if variant.impl == "torch-compile" else model
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if variant.dtype == "bfloat16" \
        else contextlib.nullcontext
    # CUDA runs asynchronously: a call ends when the device is done, as JAX's block_until_ready.
    synchronize = torch.cuda.synchronize if device == "cuda" else lambda: None
    if variant.mode == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast():
                forward(images)
            synchronize()
    else:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(forward(images), labels)
            loss.backward()
            optimizer.step()
            synchronize()

    start = time.perf_counter()
    if device == "cpu":  # the first step's memory growth (see peak_rss_mib), as for JAX's first call
        variant.peak_mib = peak_rss_mib(step)
    else:
        step()
    variant.compile_s = time.perf_counter() - start
    variant.step = step
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        variant.peak_mib = torch.cuda.max_memory_allocated() / 2**20


# ----------------------------------------------------------------------------- measuring


def peak_rss_mib(call: Callable[[], None], interval_s: float = 0.002) -> float:
    """Peak RSS above the level before `call`, in MiB, sampled by a thread while `call` runs."""
    import psutil

    process = psutil.Process()
    base = process.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        call()
    finally:
        done.set()
        sampler.join()
    return (max(peak[0], process.memory_info().rss) - base) / 2**20


def process_peak_rss_mib() -> float:
    """The process's peak resident set size so far (Linux VmHWM: libraries, model, optimiser state,
    compilation and every step), in MiB; NaN where /proc is missing."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return float("nan")


def _prepare(variant: Variant, warmup: int) -> None:
    """Set up (compile) and warm up one variant.

    On the CPU the memory is the RSS growth during the variant's first step (PyTorch: its first
    call, in the setup; JAX: the first call after compiling): later steps reuse what the first
    one made resident (glibc keeps PyTorch's freed tensors, XLA:CPU frees its temporaries after
    each call), so growth during a later call compares unlike things. Meaningful in a fresh
    process (the default mode); with --in-process earlier variants' memory may be reused.
    """
    is_jax = variant.impl in JAX_IMPLS
    (setup_jax if is_jax else setup_torch)(variant)
    variant.flops = model_flops(variant.case, variant.arch, variant.mode)
    if is_jax and jax.default_backend() == "cpu":
        variant.peak_mib = peak_rss_mib(variant.step)
        warmup -= 1
    for _ in range(warmup):
        variant.step()


def run(variants: list[Variant], repeats: int, warmup: int, settle_s: float, log: Callable[[str], None]) -> None:
    """In one process: set up, warm up and time `variants` round-robin, pausing `settle_s` before each timed
    call; fills their results in place."""
    for variant in variants:
        log(f"setup {variant.impl:13s} {variant.arch:5s} {variant.mode:5s} {variant.dtype:8s} {variant.case.name}")
        _prepare(variant, warmup)
        variant.compile_s_all.append(variant.compile_s)
        variant.pids.append(os.getpid())
    for round_index in range(repeats):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            time.sleep(settle_s)
            start = time.perf_counter()
            variant.step()
            variant.times.append(time.perf_counter() - start)
        log(f"round {round_index + 1}/{repeats} done")


def process_order(variants: Sequence[Variant], rounds: int) -> list[tuple[int, Variant]]:
    """(round, variant) in the order the processes run: per round, each (case, net, mode, dtype) group's
    implementations back to back, in the given order in even rounds and reversed in odd ones."""
    groups: dict[tuple, list[Variant]] = {}
    for variant in variants:
        groups.setdefault(variant.key, []).append(variant)
    order = []
    for round_index in range(rounds):
        for group in groups.values():
            order += [(round_index, v) for v in (group if round_index % 2 == 0 else group[::-1])]
    return order


def run_child(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Run one variant (or the matmul probe) in a fresh Python process and return what it measured.

    The interpreter is `spec['python']` (default: this one), so that each framework may come from
    its own environment (e.g. JAX from a Python 3.12 venv, PyTorch from a 3.11 one).
    """
    command = [spec.get("python") or sys.executable, "-m", "benchmarks.throughput", "--child", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [line for line in result.stdout.splitlines() if line.startswith(CHILD_MARK)]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child {spec} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len(CHILD_MARK):])


def run_processes(variants: list[Variant], rounds: int, repeats: int, warmup: int, log: Callable[[str], None],
                  env: dict[str, str], launch: Callable[[dict[str, Any], dict[str, str]], dict[str, Any]] = run_child,
                  pythons: dict[str, str | None] | None = None) -> None:
    """Each variant in its own process, `rounds` times, alternating implementations (`process_order`);
    fills the variants' results in place. `launch(spec, env)` runs one process; `pythons` maps
    'jax' / 'torch' to the interpreter of that framework's processes (None: this one)."""
    order = process_order(variants, rounds)
    for index, (round_index, variant) in enumerate(order):
        framework = "jax" if variant.impl in JAX_IMPLS else "torch"
        spec = {**variant.spec(), "repeats": repeats, "warmup": warmup, "python": (pythons or {}).get(framework)}
        huge_pages = framework == "jax" and JAX_IMPLS[variant.impl][2]
        measured = launch(spec, with_huge_pages(env) if huge_pages else env)
        variant.times += measured["times"]
        variant.round_medians.append(statistics.median(measured["times"]))
        variant.compile_s_all.append(measured["compile_s"])
        variant.compile_s = variant.compile_s_all[0]
        variant.peak_mib = max(measured["peak_mib"], variant.peak_mib) if variant.round_medians[:-1] \
            else measured["peak_mib"]
        variant.process_peak_mib = max(measured.get("process_peak_mib", float("nan")), variant.process_peak_mib) \
            if variant.round_medians[:-1] else measured.get("process_peak_mib", float("nan"))
        variant.flops = measured["flops"]
        variant.xla_temp_mib = measured.get("xla_temp_mib", float("nan"))
        variant.pids.append(measured["pid"])
        log(f"[{index + 1}/{len(order)}] round {round_index + 1} {variant.impl:13s} {variant.arch:5s} "
            f"{variant.mode:5s} {variant.dtype:8s} {variant.case.name}: "
            f"{1000 * variant.round_medians[-1]:.0f} ms (load {os.getloadavg()[0]:.1f})")


CHILD_MARK = "BENCHMARK-RESULT "


def child_main(spec: dict[str, Any]) -> int:
    """A child process: time one variant (or measure the matmul peak) and print the result as one JSON line."""
    _set_torch_threads()
    if spec.get("probe") == "matmul":
        result = {d: max(matmul_peak_flops(d) if spec.get("jax", True) else 0.0,
                         torch_matmul_peak_flops(d) if spec["torch"] else 0.0) for d in spec["dtypes"]}
        result["machine"] = machine()
    else:
        variant = Variant.from_spec(spec)
        _prepare(variant, spec["warmup"])
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            variant.step()
            variant.times.append(time.perf_counter() - start)
        result = {"times": variant.times, "compile_s": variant.compile_s, "peak_mib": variant.peak_mib,
                  "process_peak_mib": process_peak_rss_mib(),
                  "xla_temp_mib": variant.xla_temp_mib, "flops": variant.flops, "load": os.getloadavg()[0],
                  "pid": os.getpid()}
    print(CHILD_MARK + json.dumps(result), flush=True)
    return 0


def _set_torch_threads() -> None:
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))  # all cores, as XLA uses
        torch.backends.cudnn.benchmark = True  # pick the fastest convolution algorithms, as XLA autotunes


# ----------------------------------------------------------------------------- reporting


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and the interquartile range (q1, q3: linear interpolation, as numpy's default) of `values`."""
    q1, median, q3 = np.percentile(np.asarray(values, float), [25, 50, 75])
    return {"median": float(median), "min": float(min(values)), "max": float(max(values)),
            "q1": float(q1), "q3": float(q3), "n": len(values)}


def round_ratios(numerator_s: Sequence[float], denominator_s: Sequence[float]) -> list[float]:
    """Per-round speed ratios: the other side's step time over this side's (= this side's images/s over
    the other's), round by round."""
    return [other / this for this, other in zip(numerator_s, denominator_s)]


def ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """cbam-jax images/s over each other implementation's, and each implementation's CBAM cost.

    Where both sides ran the same number (> 1) of process rounds, `jax_over_X` is the median of the
    per-round ratios (each round's two processes ran back to back) and `jax_over_X_spread` their
    `spread`; otherwise `jax_over_X` is the ratio of the two medians.
    """
    by_key = {(r["case"], r["arch"], r["mode"], r["dtype"], r["impl"]): r for r in rows}
    out = []
    for (case, arch, mode, dtype, impl), row in by_key.items():
        entry = {"case": case, "arch": arch, "mode": mode, "dtype": dtype, "impl": impl}
        if impl == "jax":
            for other in (*TORCH_IMPLS, "jax-glibc", "jax-nodnn", "jax-xla", "jax-remat"):
                theirs = by_key.get((case, arch, mode, dtype, other))
                if theirs is None:
                    continue
                entry[f"jax_over_{other}"] = row["images_per_s"] / theirs["images_per_s"]
                mine_rounds, their_rounds = row.get("round_medians_s") or [], theirs.get("round_medians_s") or []
                if len(mine_rounds) == len(their_rounds) > 1:
                    entry[f"jax_over_{other}_spread"] = spread(round_ratios(mine_rounds, their_rounds))
                    entry[f"jax_over_{other}"] = entry[f"jax_over_{other}_spread"]["median"]
        if arch == "cbam" and (case, "plain", mode, dtype, impl) in by_key:
            entry["cbam_cost"] = row["step_s_median"] / by_key[case, "plain", mode, dtype, impl]["step_s_median"]
        if len(entry) > 5:
            out.append(entry)
    return out


# lscpu flags worth showing beside a CPU table: vector width and the bf16/int8 matrix units.
SHOWN_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                   "amx_int8")


def cpu_description() -> dict[str, Any]:
    """lscpu's model name and flags (from /proc/cpuinfo where lscpu is missing)."""
    fields = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        output = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}).stdout
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in output.splitlines())}
    if "Model name" not in fields:
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as f:
                info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in f) if k.strip()}
            fields = {"Model name": info.get("model name", ""), "Flags": info.get("flags", "")}
    flags = fields.get("Flags", "").split()
    return {"model": fields.get("Model name") or platform.processor() or platform.machine(), "flags": flags,
            "shown_flags": [f for f in SHOWN_CPU_FLAGS if f in flags]}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil

    cpu = cpu_description()
    info = {"cpu": cpu["model"], "cpu_flags": cpu["flags"], "cpu_shown_flags": cpu["shown_flags"],
            "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}
    with contextlib.suppress(ImportError):
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    torch_device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    with contextlib.suppress(ImportError):
        from cbam_jax.layers import native

        info["native_kernels"] = jax.default_backend() == "cpu" and native.available()
    return info


def _ratio_cell(entry: dict[str, Any], column: str) -> str:
    if column not in entry:
        return ""
    cell = f"{entry[column]:.2f}"
    if f"{column}_spread" in entry:
        s = entry[f"{column}_spread"]
        cell += f" ({s['min']:.2f}-{s['max']:.2f}; IQR {s['q1']:.2f}-{s['q3']:.2f})"
    return cell


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (throughput, then ratios)."""
    m = report["machine"]
    peaks = ", ".join(f"{d} {f:.3g} TFLOP/s" for d, f in report["matmul_peak_tflops"].items())
    how = (f"each variant in its own process, {report['rounds']} rounds alternating implementations, "
           f"{report['repeats']} timed calls per process" if report["mode"] == "processes"
           else f"all variants in one process, {report['repeats']} round-robin rounds")
    lines = [f"Machine: {m['cpu']} (lscpu flags: {' '.join(m.get('cpu_shown_flags', [])) or 'none of interest'}), "
             f"{m['cores']} cores; JAX {m['jax']} on {m['backend']} ({m['device_kind']})"
             + (", native kernels (oneDNN)" if m.get("native_kernels") else "")
             + (f", torch {m['torch']} on {m['torch_device']} ({m['torch_threads']} CPU threads)" if "torch" in m else "")
             + f"; load average {report['load_before']} before, {report['load_after']} after; "
             f"matrix-product peak measured: {peaks}; {how}.", ""]
    # Reports written before the process peak was recorded keep their one memory column ('peak MiB').
    process = any("process_peak_mib" in r for r in report["results"])
    lines += ["| case | net | mode | dtype | impl | images/s (median) | min-max | step ms | model GFLOP/s | MFU | "
              + ("compile/first s | step MiB | process MiB |" if process else "compile/first s | peak MiB |"),
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if process else "")]
    for r in report["results"]:
        impl = r["impl"] + (" (autocast)" if r["dtype"] == "bfloat16" and r["impl"] in TORCH_IMPLS else "")
        lines.append(f"| {r['case']} | {r['arch']} | {r['mode']} | {r['dtype']} | {impl} | "
                     f"{r['images_per_s']:.1f} | {r['images_per_s_min']:.1f}-{r['images_per_s_max']:.1f} | "
                     f"{1000 * r['step_s_median']:.0f} | {r['gflops_per_s']:.0f} | {100 * r['mfu']:.0f}% | {r['compile_s']:.1f} | "
                     f"{r['peak_mib']:.0f} |" + (f" {r.get('process_peak_mib', float('nan')):.0f} |" if process else ""))
    others = (*TORCH_IMPLS, "jax-glibc", "jax-nodnn", "jax-xla", "jax-remat")
    columns = [c for c in (*(f"jax_over_{i}" for i in others), "cbam_cost")
               if any(c in e for e in report["ratios"])]
    if columns:
        lines += ["", "Ratios: median over rounds (per-round min-max; interquartile range).", "",
                  "| case | net | mode | dtype | impl | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
                  "|---|---|---|---|---|" + "---:|" * len(columns)]
        for e in report["ratios"]:
            cells = [_ratio_cell(e, c) for c in columns]
            lines.append(f"| {e['case']} | {e['arch']} | {e['mode']} | {e['dtype']} | {e['impl']} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Call `write(temp_path)` beside `path`, then rename over it: never a half-written file."""
    with atomic_output(path, replace=True) as temporary:
        write(str(temporary))


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def plot(report: dict[str, Any], path: str) -> None:
    """A PNG bar chart of images/s per (case, mode, dtype), one bar per (impl, net)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    groups = sorted({(r["case"], r["mode"], r["dtype"]) for r in report["results"]})
    bars = sorted({(r["impl"], r["arch"]) for r in report["results"]}, key=lambda b: (IMPLS.index(b[0]), b[1]))
    values = {(r["case"], r["mode"], r["dtype"], r["impl"], r["arch"]): r for r in report["results"]}
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4.2), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for index, bar in enumerate(bars):
            r = values.get((*group, *bar))
            if r is not None:
                ax.bar(index, r["images_per_s"], color=f"C{IMPLS.index(bar[0])}", alpha=1.0 if bar[1] == "cbam" else 0.5,
                       yerr=[[r["images_per_s"] - r["images_per_s_min"]], [r["images_per_s_max"] - r["images_per_s"]]])
        ax.set_xticks(range(len(bars)), [f"{i}\n{a}" for i, a in bars], fontsize=7)
        ax.set_title(" ".join(group), fontsize=9)
        ax.set_ylabel("images/s")
    fig.suptitle(f"{report['machine']['cpu']}, {report['machine']['cores']} cores", fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda temp: fig.savefig(temp, format="png", dpi=110))
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick preset (~15 min on 2 idle cores (estimate)): "
                        + ", ".join(PRESETS["quick"]["cases"]) + "; float32; jax, torch, torch-cl")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full",
                        help="cases, impls, dtypes, rounds: 'full' (default), 'quick' (= --quick), 'families' "
                        "(CBAM-ResNeXt-50 and CBAM-MobileNet on the CPU), 'gpu' (large batches)")
    parser.add_argument("--cases", nargs="+", type=Case.parse, help="MODEL:SIZE:BATCH[:STEM], or MODEL:SIZE:BATCH:fcos "
                        "for an FCOS detector on that backbone (overrides the preset)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, help="implementations (overrides the preset)")
    parser.add_argument("--nets", nargs="+", choices=("cbam", "plain"), default=["cbam", "plain"])
    parser.add_argument("--modes", nargs="+", choices=("infer", "train"), default=["infer", "train"])
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"),
                        help="(overrides the preset); PyTorch's bfloat16 is autocast")
    parser.add_argument("--in-process", action="store_true",
                        help="all variants of a case in this one process, timed round-robin (the old mode)")
    parser.add_argument("--rounds", type=int, help="process rounds per variant (overrides the preset)")
    parser.add_argument("--jax-python", help="the Python interpreter of the JAX processes (default: this one)")
    parser.add_argument("--torch-python", help="the Python interpreter of the PyTorch processes (default: this one), "
                        "e.g. a venv with torch while JAX runs from another")
    parser.add_argument("--repeats", type=int, help="timed calls per process, or round-robin rounds with "
                        "--in-process (overrides the preset)")
    parser.add_argument("--warmup", type=int, help="untimed calls per variant after compiling, at least 1 (overrides the preset)")
    parser.add_argument("--settle", type=float, help="with --in-process: seconds to pause before each timed call "
                        "(default: 0.5 on the CPU, where PyTorch's OpenMP threads keep spinning after a call and slow "
                        "the next one down, JAX's by up to 2x; 0 on accelerators)")
    parser.add_argument("--json", default="benchmarks/results.json", help="where to write the JSON report")
    parser.add_argument("--markdown", help="also write the Markdown tables to this file")
    parser.add_argument("--plot", help="write a PNG bar chart of images/s to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    preset = PRESETS["quick" if args.quick else args.preset]
    args.cases = args.cases or [Case.parse(c) for c in preset["cases"]]
    for field in ("impls", "dtypes", "repeats", "warmup", "rounds"):
        if getattr(args, field) is None:
            setattr(args, field, preset[field])
    if args.settle is None:
        args.settle = 0.5 if args.in_process and jax.default_backend() == "cpu" else 0.0
    if args.repeats < 1 or args.warmup < 1 or args.rounds < 1:
        parser.error("--rounds, --repeats and --warmup must be >= 1 (the last warm-up call measures memory).")
    try:
        import psutil  # noqa: F401
    except ImportError:
        parser.error("the benchmark measures memory with psutil: pip install psutil.")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install matplotlib (or leave out --plot).")
    if args.in_process and (args.jax_python or args.torch_python):
        parser.error("--jax-python and --torch-python choose the interpreters of the processes; not with --in-process.")
    for python in (args.jax_python, args.torch_python):
        if python and not (os.path.isfile(python) and os.access(python, os.X_OK)):
            parser.error(f"no Python interpreter at {python!r}: give the path of an executable python.")
    if any(case.detector for case in args.cases) and any(i in TORCH_IMPLS for i in args.impls):
        parser.error(f"the detector cases (:{DETECTOR}) have no PyTorch twin; pass --impls jax (or other jax-* impls).")
    if any(i in TORCH_IMPLS for i in args.impls) and not args.torch_python:
        try:
            import torch  # noqa: F401
        except ImportError:
            parser.error("PyTorch is not installed: install it (`make torch`), pass --torch-python with an "
                         "interpreter that has it, or pass --impls jax jax-xla.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)

    uses_torch = any(i in TORCH_IMPLS for i in args.impls)
    variants = [Variant(case, arch, mode, dtype, impl)
                for case in args.cases for dtype in args.dtypes for mode in args.modes
                for arch in args.nets for impl in args.impls]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cbam-jax-bench-cache-") as cache_dir:
        # Later rounds' JAX processes load the program from the run's own persistent cache, as a
        # user's second run would; the compile time reported is the first (cold) one.
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR", cache_dir)}
        if args.in_process:
            _set_torch_threads()
            # The machine's peak: the faster of the two frameworks' large matrix products.
            peak_flops = {d: max(matmul_peak_flops(d), torch_matmul_peak_flops(d) if uses_torch else 0.0)
                          for d in args.dtypes}
            info = machine()
        elif args.torch_python and uses_torch:  # one probe per environment
            probe = run_child({"probe": "matmul", "dtypes": args.dtypes, "torch": False, "python": args.jax_python}, env)
            torch_probe = run_child({"probe": "matmul", "dtypes": args.dtypes, "torch": True, "jax": False,
                                     "python": args.torch_python}, env)
            info = probe.pop("machine")
            torch_info = torch_probe.pop("machine")
            info.update({k: v for k, v in torch_info.items() if k.startswith("torch")},
                        torch_python=torch_info["python"])
            peak_flops = {d: max(probe[d], torch_probe[d]) for d in args.dtypes}
        else:
            probe = run_child({"probe": "matmul", "dtypes": args.dtypes, "torch": uses_torch, "python": args.jax_python},
                              env)
            info = probe.pop("machine")
            peak_flops = probe
        log("matrix-product peak: " + ", ".join(f"{d} {f / 1e12:.3g} TFLOP/s" for d, f in peak_flops.items()))
        if args.in_process:
            # One case at a time keeps memory bounded; variants within a case are interleaved.
            for case in args.cases:
                run([v for v in variants if v.case == case], args.repeats, args.warmup, args.settle, log)
        else:
            run_processes(variants, args.rounds, args.repeats, args.warmup, log, env,
                          pythons={"jax": args.jax_python, "torch": args.torch_python})
    results = [v.summary(peak_flops) for v in variants]
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "machine": info,
              "mode": "in-process" if args.in_process else "processes", "rounds": args.rounds,
              "load_before": [round(x, 2) for x in load_before],
              "load_after": [round(x, 2) for x in os.getloadavg()],
              "repeats": args.repeats, "warmup": args.warmup, "settle_s": args.settle,
              "wall_s": time.perf_counter() - start,
              "matmul_peak_tflops": {d: f / 1e12 for d, f in peak_flops.items()},
              "results": results, "ratios": ratios(results)}
    table = markdown(report)
    print(table)
    write_atomic(args.json, lambda temp: _write_text(temp, json.dumps(report, indent=1)))
    if args.markdown:
        write_atomic(args.markdown, lambda temp: _write_text(temp, table))
    if args.plot:
        plot(report, args.plot)
    log(f"wrote {args.json}" + (f", {args.markdown}" if args.markdown else "") + (f", {args.plot}" if args.plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
