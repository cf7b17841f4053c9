"""Native CPU kernels called from XLA through `jax.ffi`: oneDNN convolutions and a max gradient.

XLA:CPU's convolution kernel gradient runs at a few to a few tens of GFLOP/s, its bfloat16
convolutions do not use AMX, and it differentiates a max reduction through a variadic argmax
reduction that it does not vectorise. This module compiles the small FFI shim `native_ops.cc`
against the pip package `onednn-devel-cpu-gomp` (oneDNN, the library behind PyTorch's CPU
convolutions, with GNU OpenMP threads; the `cpu` extra of cbam-jax on Linux x86-64) on first use,
caches the shared library in `$CBAM_JAX_CACHE/kernels` (`cbam_jax.cache.cache_root`, default
`~/.cache/cbam_jax`) with the SHA-256 of what was built beside it, and registers its XLA:CPU custom
calls. A cached library is loaded only if its bytes match that digest: a damaged (truncated) or
replaced file there is rebuilt, never loaded (loading it could crash the interpreter or run
someone else's code):

    conv(x, kernel, strides, padding, dilation)  x (B, H, W, Cin), kernel (KH, KW, Cin / G, Cout) -> (B, Ho, Wo, Cout)
        differentiable (`jax.custom_vjp`: oneDNN's forward, input gradient and kernel gradient); G
        feature groups (grouped, depthwise) as in `lax.conv_general_dilated`, read off the shapes;
    max_grad(x, grad)  x (P, N, Q), grad (P, Q) -> (P, N, Q): grad at the first maximum along N;
    avg_max(x)  x (P, N, Q) -> (mean, max) (P, Q) float32, differentiable: the CBAM gates' pools;
    gate(x, s)  x (P, N, Q), s (P, Q) float32 -> x * s, differentiable: the CBAM gates' product;
    max_pool(x, window, stride, padding)  x (B, H, W, C) -> (B, Ho, Wo, C), differentiable: PyTorch's;
    batch_stats(x)  x (N, C) -> (mean, biased variance) (C,) float32: BatchNorm's statistics;
    batch_norm_grad_sums(x, g, mean)  -> (sum g, sum g * (x - mean)) (C,) float32: its gradient's sums.

Where anything is missing (no oneDNN package, no C++ compiler, another OS, or
`CBAM_JAX_NATIVE=0`) `available()` is False after one warning and the callers keep XLA's own
kernels: same results within float rounding, slower.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cbam_jax.atomic import atomic_output
from cbam_jax.cache import cache_root
from cbam_jax.errors import UserError, one_line

SOURCE = pathlib.Path(__file__).with_name("native_ops.cc")
# XLA custom-call target -> the shim's handler symbol
TARGETS = {"cbam_onednn_conv_forward": "CbamOnednnConvForward", "cbam_onednn_conv_input_grad": "CbamOnednnConvInputGrad",
           "cbam_onednn_conv_kernel_grad": "CbamOnednnConvKernelGrad", "cbam_max_grad": "CbamMaxGrad",
           "cbam_avg_max": "CbamAvgMax", "cbam_avg_max_grad": "CbamAvgMaxGrad", "cbam_gate_grad": "CbamGateGrad",
           "cbam_max_pool": "CbamMaxPool", "cbam_max_pool_grad": "CbamMaxPoolGrad",
           "cbam_batch_stats": "CbamBatchStats", "cbam_batch_norm_grad_sums": "CbamBatchNormGradSums"}
Padding = tuple[tuple[int, int], tuple[int, int]]

# The gate and pool kernels track positions along a reduction as float32 (so that their argmax loops
# vectorise): `avg_max` over fewer than this many positions N, `max_pool` on maps of fewer than this
# many pixels H * W; larger ones are refused by the kernels, and the layers keep XLA's path for them.
MAX_POSITIONS = 2**24

# Set False (before tracing) to keep XLA's own kernels everywhere, e.g. to compare; the environment
# variable CBAM_JAX_NATIVE=0 does the same for a whole process.
ENABLED = True

_lock = threading.Lock()
_state: dict[str, object] = {}  # 'ok': bool, 'library': ctypes.CDLL, 'error': str


class Unavailable(RuntimeError):
    """oneDNN cannot be used here (the message says why and what to do)."""


def _package_paths() -> tuple[pathlib.Path, pathlib.Path]:
    """(include dir, directory of libdnnl.so.3) of the installed oneDNN, pip packages first, then the system."""
    include = library = None
    for dist, wanted in (("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp"), ("onednn-cpu-gomp", "libdnnl.so.3")):
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in files:
            if str(file).endswith(wanted):
                path = pathlib.Path(file.locate()).resolve()
                if wanted.endswith(".hpp"):
                    include = path.parents[2]
                else:
                    library = path.parent
    for directory in ("/usr/include", "/usr/local/include"):  # Debian's libdnnl-dev
        if include is None and pathlib.Path(directory, "oneapi/dnnl/dnnl.hpp").exists():
            include = pathlib.Path(directory)
    for directory in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"):
        if library is None and pathlib.Path(directory, "libdnnl.so.3").exists():
            library = pathlib.Path(directory)
    if include is None or library is None:
        raise Unavailable("oneDNN is not installed (pip install onednn-cpu-gomp onednn-devel-cpu-gomp, or "
                          "apt-get install libdnnl-dev)")
    return include, library


def cache_dir() -> pathlib.Path:
    """Where the compiled shim lives: `$CBAM_JAX_CACHE/kernels` (default ~/.cache/cbam_jax/kernels)."""
    return cache_root() / "kernels"


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest_record(library: pathlib.Path) -> pathlib.Path:
    """The file beside `library` holding the SHA-256 of the bytes that were built."""
    return library.with_name(library.name + ".sha256")


def _verified(library: pathlib.Path) -> bool:
    """Whether `library` holds exactly the bytes recorded when it was built (False: missing record or mismatch)."""
    try:
        return _digest_record(library).read_text().strip() == _sha256(library)
    except OSError:
        return False


def _cpu_identity() -> bytes:
    """This CPU's model name and instruction-set flags (Linux /proc/cpuinfo): what `-march=native` compiles for."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = f.read().split(b"\n\n")[0].splitlines()
    except OSError:
        return b""
    return b"\n".join(line for line in lines if line.split(b":")[0].strip() in (b"model name", b"flags"))


def build() -> pathlib.Path:
    """Compile the FFI shim (once per source, jax version and oneDNN install) and return its path.

    A cached library whose bytes do not match the digest recorded at build time (truncated, swapped for
    another file) is rebuilt, with one warning.
    """
    include, library = _package_paths()
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise Unavailable("no C++ compiler found (install g++ or set CXX)")
    ffi_include = jax.ffi.include_dir()
    digest = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), jax.__version__.encode(), str(include).encode(),
                                        str(library).encode(), compiler.encode(), _cpu_identity()])).hexdigest()[:16]
    target = cache_dir() / f"native_ops-{digest}.so"
    if _verified(target):
        return target
    if target.exists():
        warnings.warn(f"cbam_jax: {target} does not match the digest recorded when it was built (damaged or "
                      "replaced); rebuilding it.", RuntimeWarning, stacklevel=2)
    # Concurrent builders each compile to their own hidden name; the rename into place is atomic. The
    # digest is taken of the compiled file before it is renamed into place and recorded after it.
    with atomic_output(target, replace=True) as temporary:
        # -march=native: the gate and pool loops vectorise with the CPU's widest vectors (AVX-512 where
        # it has them); the digest holds the CPU's flags, so a cache shared by other CPUs rebuilds.
        command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w", f"-I{include}",
                   f"-I{ffi_include}", str(SOURCE), f"-L{library}", "-l:libdnnl.so.3", f"-Wl,-rpath,{library}",
                   "-o", str(temporary)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise Unavailable(f"compiling {SOURCE.name} failed: {one_line(result.stderr)[-2000:]}")
        built = _sha256(pathlib.Path(temporary))
    with atomic_output(_digest_record(target), replace=True) as temporary:
        pathlib.Path(temporary).write_text(built + "\n")
    return target


def _load() -> ctypes.CDLL:
    if sys.platform != "linux":
        raise Unavailable(f"only built on Linux (this is {sys.platform})")
    if os.environ.get("CBAM_JAX_NATIVE", "1") == "0":
        raise Unavailable("disabled by CBAM_JAX_NATIVE=0")
    # oneDNN's OpenMP threads would otherwise spin for a while after each call, taking the cores
    # from XLA's own threads that run the elementwise work in between (before libgomp is loaded).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    library = ctypes.CDLL(str(build()))
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return library


def available() -> bool:
    """Whether the native kernels can run here (builds them on the first call; warns once if not)."""
    with _lock:
        if "ok" not in _state:
            try:
                _state["library"] = _load()
                _state["ok"] = True
            except (Unavailable, OSError, UserError) as error:
                _state.update(ok=False, error=str(error))
                warnings.warn(f"cbam_jax: native CPU kernels (oneDNN convolutions) unavailable ({error}); using "
                              "XLA's own (slower on the CPU, same results).", RuntimeWarning, stacklevel=3)
        return bool(_state["ok"])


def enabled() -> bool:
    """`ENABLED` and `available()`: whether callers should use the native kernels now."""
    return ENABLED and available()


def usable_for(x: jax.Array, positions: int = 1) -> bool:
    """Whether the native elementwise kernels (`max_grad`, `avg_max`, `gate`, `max_pool`, `batch_stats`,
    `batch_norm_grad_sums`) take `x` now:
    float32 or bfloat16 with at least one element, on the CPU backend, where `enabled()`, and
    `positions` (the length of a reduction tracked by position: `avg_max`'s N, `max_pool`'s H * W)
    below `MAX_POSITIONS`."""
    return (x.dtype in (jnp.float32, jnp.bfloat16) and x.size > 0 and positions < MAX_POSITIONS
            and jax.default_backend() == "cpu" and enabled())


def _check_shape(name: str, operand: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """A wrongly shaped operand is a ValueError at trace time (the handlers refuse it too, at run time)."""
    if tuple(shape) != tuple(expected):
        raise ValueError(f"native.{name}: {operand} must have shape {tuple(expected)}, got {tuple(shape)}.")


def bfloat16_convolutions() -> bool:
    """Whether oneDNN has bfloat16 convolutions on this CPU (AVX-512 and newer; not on AVX2-only CPUs)."""
    if not available():
        return False
    with _lock:
        if "bf16" not in _state:
            _state["bf16"] = bool(_state["library"].CbamOnednnBf16Supported())
        return bool(_state["bf16"])


def _attrs(strides: Sequence[int], padding: Padding, dilation: Sequence[int]) -> dict[str, np.ndarray]:
    return {"strides": np.asarray(strides, np.int64), "dilation": np.asarray(dilation, np.int64),
            "padding": np.asarray([p for pair in padding for p in pair], np.int64)}


def _output_shape(x_shape, kernel_shape, strides, padding, dilation) -> tuple[int, ...]:
    spatial = [(size + lo + hi - (k - 1) * d - 1) // s + 1
               for size, k, s, (lo, hi), d in zip(x_shape[1:3], kernel_shape[:2], strides, padding, dilation)]
    return (x_shape[0], *spatial, kernel_shape[3])


def _call(name: str, shape, dtype, *operands, strides, padding, dilation):
    return jax.ffi.ffi_call(f"cbam_onednn_conv_{name}", jax.ShapeDtypeStruct(shape, dtype),
                            vmap_method="sequential")(*operands, **_attrs(strides, padding, dilation))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding,
         dilation: tuple[int, int]) -> jax.Array:
    """NHWC x HWIO convolution by oneDNN: x (B, H, W, Cin), kernel (KH, KW, Cin / G, Cout) -> (B, Ho, Wo, Cout).

    G = Cin / kernel.shape[2] feature groups (`feature_group_count` of `lax.conv_general_dilated`:
    1, grouped as in ResNeXt, or depthwise, G = Cin); Cout a multiple of G. float32 or bfloat16
    (both operands alike), non-negative padding ((top, bottom), (left, right)). Call only where
    `available()` is True.
    """
    shape = _output_shape(x.shape, kernel.shape, strides, padding, dilation)
    return _call("forward", shape, x.dtype, x, kernel, strides=strides, padding=padding, dilation=dilation)


def _conv_fwd(x, kernel, strides, padding, dilation):
    return conv(x, kernel, strides, padding, dilation), (x, kernel)


def _conv_bwd(strides, padding, dilation, residuals, grad):
    x, kernel = residuals
    grad = grad.astype(x.dtype)
    geometry = dict(strides=strides, padding=padding, dilation=dilation)
    input_grad = _call("input_grad", x.shape, x.dtype, grad, kernel, **geometry)
    # bfloat16 data, float32 kernel gradient (oneDNN accumulates in float32 either way): 3.6 ms
    # against 18 ms for the same gradient from float32 copies (batch 64, 32x32, 3x3 64->64, AMX).
    # A bfloat16 output was erratic in oneDNN 3.2 (0.01-2 s per layer).
    kernel_grad = _call("kernel_grad", kernel.shape, jnp.float32, x, grad, **geometry).astype(kernel.dtype)
    return input_grad, kernel_grad


conv.defvjp(_conv_fwd, _conv_bwd)


def reference_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding,
                   dilation: tuple[int, int]) -> jax.Array:
    """What `conv` computes, by XLA."""
    return lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=x.shape[3] // kernel.shape[2])


def max_grad(x: jax.Array, grad: jax.Array) -> jax.Array:
    """The gradient of `jnp.max(x, axis=1)` sent to the first maximum: x (P, N, Q), grad (P, Q) -> (P, N, Q).

    float32 or bfloat16 (grad cast to x's dtype); NaN counts as the maximum, as in `jnp.argmax`.
    Call only where `available()` is True.
    """
    _check_shape("max_grad", "grad", grad.shape, (x.shape[0], x.shape[2]))
    return _elementwise_call("max_grad", jax.ShapeDtypeStruct(x.shape, x.dtype), x, grad.astype(x.dtype))


def _elementwise_call(name: str, outputs, *operands, **attributes):
    """The shim's handler `cbam_{name}` on `operands`, with `outputs` (one or a tuple of ShapeDtypeStructs)."""
    return jax.ffi.ffi_call(f"cbam_{name}", outputs, vmap_method="sequential")(*operands, **attributes)


@jax.custom_vjp
def avg_max(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The mean and the max of x (P, N, Q) along N in one pass: two (P, Q) float32 arrays.

    The max's gradient goes to the first maximum along N (NaN counts as the maximum), as
    `common.max_over`'s. float32 or bfloat16 x; call only where `usable_for(x, positions=N)`.
    """
    shape = jax.ShapeDtypeStruct((x.shape[0], x.shape[2]), jnp.float32)
    return tuple(_elementwise_call("avg_max", (shape, shape), x))


def _avg_max_fwd(x):
    return avg_max(x), x


def _avg_max_bwd(x, cotangents):
    d_mean, d_max = (jnp.asarray(c, jnp.float32) for c in cotangents)
    return (_elementwise_call("avg_max_grad", jax.ShapeDtypeStruct(x.shape, x.dtype), x, d_mean, d_max),)


avg_max.defvjp(_avg_max_fwd, _avg_max_bwd)


@jax.custom_vjp
def gate(x: jax.Array, s: jax.Array) -> jax.Array:
    """x (P, N, Q) times the float32 gate s (P, Q) broadcast along N, in x's dtype: `x * s[:, None].astype(x.dtype)`.

    The forward pass is XLA's (it fuses with what follows); the backward pass is one native pass
    that reads the output gradient and x once: dx in x's dtype and ds summed in float32. Call only
    where `usable_for(x)`.
    """
    _check_shape("gate", "s", s.shape, (x.shape[0], x.shape[2]))
    return x * s[:, None, :].astype(x.dtype)


def _gate_fwd(x, s):
    return gate(x, s), (x, s)


def _gate_bwd(residuals, grad):
    x, s = residuals
    dx, ds = _elementwise_call("gate_grad", (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(
        s.shape, jnp.float32)), x, grad.astype(x.dtype), s.astype(jnp.float32))
    return dx, ds.astype(s.dtype)


gate.defvjp(_gate_fwd, _gate_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """PyTorch's `max_pool2d` (square window, padding that never wins), NHWC: x (B, H, W, C) -> (B, Ho, Wo, C).

    The gradient goes to the first maximum of each window in row-major order (NaN counts as the
    maximum), summed in float32 where windows overlap. Needs padding < window; call only where
    `usable_for(x, positions=H * W)`.
    """
    out = [(size + 2 * padding - window) // stride + 1 for size in x.shape[1:3]]
    return _elementwise_call("max_pool", jax.ShapeDtypeStruct((x.shape[0], *out, x.shape[3]), x.dtype), x,
                             **_pool_attrs(window, stride, padding))


def _pool_attrs(window: int, stride: int, padding: int) -> dict[str, np.int64]:
    if not 0 <= padding < window or stride < 1:
        raise ValueError(f"max_pool: needs 0 <= padding < window and stride >= 1; got window {window}, "
                         f"stride {stride}, padding {padding}.")
    return {"window": np.int64(window), "stride": np.int64(stride), "padding": np.int64(padding)}


def _max_pool_fwd(x, window, stride, padding):
    return max_pool(x, window, stride, padding), x


def _max_pool_bwd(window, stride, padding, x, grad):
    return (_elementwise_call("max_pool_grad", jax.ShapeDtypeStruct(x.shape, x.dtype), x, grad.astype(x.dtype),
                              **_pool_attrs(window, stride, padding)),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The mean and the biased variance of x (N, C) over its rows: two (C,) float32 arrays, x read
    from memory once (each chunk of rows twice, the second time from cache).

    Each chunk of rows contributes its mean and squared deviations from it (as stable as the two-pass
    variance; sums of 4-row float32 runs in float64, taken from the chunk's first row, so exact for
    data far from zero), merged in a fixed order. Not differentiable (BatchNorm's own gradient,
    `cpu_ops.batch_norm_train`, uses `batch_norm_grad_sums`); call only where `usable_for(x)`.
    """
    shape = jax.ShapeDtypeStruct((x.shape[1],), jnp.float32)
    return tuple(_elementwise_call("batch_stats", (shape, shape), x))


def batch_norm_grad_sums(x: jax.Array, g: jax.Array, mean: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sum_n g[n, c] and sum_n g[n, c] * (x[n, c] - mean[c]) for x and g (N, C) of one dtype: (C,) float32 each.

    Call only where `usable_for(x)`.
    """
    _check_shape("batch_norm_grad_sums", "g", g.shape, x.shape)
    _check_shape("batch_norm_grad_sums", "mean", mean.shape, x.shape[1:])
    shape = jax.ShapeDtypeStruct((x.shape[1],), jnp.float32)
    return tuple(_elementwise_call("batch_norm_grad_sums", (shape, shape), x, g.astype(x.dtype),
                                   mean.astype(jnp.float32)))
