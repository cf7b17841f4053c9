"""The ONNX artifact: the inference function's jaxpr translated op by op into an ONNX graph.

Why not jax2onnx: the versions that install beside orbax-checkpoint >= 0.12 (jax2onnx <= 0.13.0;
later ones pin orbax-checkpoint < 0.11.37) do not know jax 0.10.2's `stack` primitive and fail on
jax 0.12 (`jax._src.core.ClosedJaxpr` moved); jax2onnx 0.17.1 also patches `flax.linen.max_pool` with
a signature that rejects our PyTorch-style padding, and on jax 0.10.2 its MaxPool was rejected by
onnxruntime. The models here need few primitives, so the translation is done here with the `onnx`
package's helpers, and every artifact is checked in onnxruntime at export time.

The graph takes 'images' (batch, H, W, C) float32 with a symbolic batch dimension ('batch') and
fixed H, W. Convolutions and pools run in ONNX's NCHW layout between transposes (onnxruntime's
optimiser folds most of them). A primitive or parameter outside what the models use raises
`ExportError` naming it.
"""

import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend
import numpy as np

from cbam_jax.errors import ExportError, require

OPSET = 18
INT64_MAX = np.iinfo(np.int64).max


def require_onnx() -> None:
    """`MissingExtra` (one line naming the extra) when onnx or onnxruntime is missing."""
    require("onnx", "onnx")
    require("onnxruntime", "onnx")


def export_onnx(apply: Callable[[jax.Array], Any], spec: jax.ShapeDtypeStruct, *,
                metadata: dict[str, str] | None = None, output_names: Sequence[str] = ("outputs",)) -> bytes:
    """A serialized ONNX model of `apply` for inputs like `spec` (batch symbolic, the rest fixed);
    `metadata` goes to its metadata_props. `apply` returns one array or a tuple of them, named
    `output_names` in the graph, in order (each output's first dimension is the batch)."""
    import onnx
    from onnx import helper

    closed = jax.make_jaxpr(apply)(spec)
    if len(closed.jaxpr.outvars) != len(output_names):
        raise ValueError(f"export_onnx: the function returns {len(closed.jaxpr.outvars)} arrays; "
                         f"{len(output_names)} output names were given ({list(output_names)}).")
    graph = _Graph(batch=spec.shape[0])
    graph.inputs.append(helper.make_tensor_value_info(
        "images", onnx.TensorProto.FLOAT, ["batch", *[int(d) for d in spec.shape[1:]]]))
    outputs = graph.inline(closed.jaxpr, closed.consts, [_Value("images")])
    for name, output, var in zip(output_names, outputs, closed.jaxpr.outvars):
        graph.nodes.append(helper.make_node("Identity", [graph.tensor(output, var.aval.dtype)], [name]))
        graph.outputs.append(helper.make_tensor_value_info(
            name, _onnx_type(var.aval.dtype), ["batch", *[int(d) for d in var.aval.shape[1:]]]))
    used = {name for node in graph.nodes for name in node.input}  # constants folded away are dropped
    initializers = [tensor for tensor in graph.initializers if tensor.name in used]
    model = helper.make_model(
        helper.make_graph(graph.nodes, "cbam_jax", graph.inputs, graph.outputs, initializers),
        opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cbam_jax")
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def run_onnx(proto: bytes, images: np.ndarray) -> np.ndarray:
    """Run a serialized model in onnxruntime (CPU) on `images`; its first output."""
    return run_onnx_outputs(proto, images)[0]


def run_onnx_outputs(proto: bytes, images: np.ndarray) -> list[np.ndarray]:
    """Run a serialized model in onnxruntime (CPU) on `images`; all its outputs, in the graph's order."""
    import onnxruntime

    session = onnxruntime.InferenceSession(proto, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": np.asarray(images, np.float32)})


class _Value:
    """A jaxpr value in the graph: an ONNX tensor name, or a constant known at export time."""

    def __init__(self, name: str | None = None, constant: np.ndarray | None = None):
        self.name, self.constant = name, constant


def _unsupported(what: str) -> Exception:
    return ExportError(f"the ONNX export does not support {what}; export --formats stablehlo instead.")


class _Graph:
    """The nodes, initialisers and names of the ONNX graph being built."""

    def __init__(self, batch: Any):
        self.batch = batch
        self.nodes, self.initializers, self.inputs, self.outputs = [], [], [], []
        self.count = 0
        self._batch_size = None

    # --------------------------------------------------------------------------- plumbing

    def fresh(self, hint: str = "t") -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def node(self, op: str, inputs: list[str], **attributes: Any) -> str:
        from onnx import helper

        output = self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    def constant(self, value: np.ndarray, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def tensor(self, value: _Value, dtype: Any) -> str:
        """The ONNX name of `value`, materialising a constant as an initialiser of `dtype`."""
        if value.name is None:
            value.name = self.constant(np.asarray(value.constant, np.dtype(dtype)))
        return value.name

    def dim(self, d: Any) -> tuple[int | None, bool]:
        """(size, is_batch) of a shape entry: an int, or the symbolic batch."""
        if isinstance(d, (int, np.integer)):
            return int(d), False
        if d == self.batch:
            return None, True
        raise _unsupported(f"the dimension expression {d} (only the batch may be symbolic)")

    def shape(self, dims: tuple) -> str:
        """An int64 shape tensor for `dims`, reading the batch size from the input at run time."""
        parts = [self.dim(d) for d in dims]
        if not any(is_batch for _, is_batch in parts):
            return self.constant(np.asarray([size for size, _ in parts], np.int64), "shape")
        if self._batch_size is None:
            self._batch_size = self.node("Slice", [self.node("Shape", ["images"]), self.constant(np.asarray([0])),
                                                   self.constant(np.asarray([1]))])
        pieces = [self._batch_size if is_batch else self.constant(np.asarray([size], np.int64))
                  for size, is_batch in parts]
        return self.node("Concat", pieces, axis=0)

    # --------------------------------------------------------------------------- translation

    def inline(self, jaxpr, consts: list, args: list[_Value]) -> list[_Value]:
        """Translate `jaxpr` with `args` for its inputs; returns its outputs."""
        env = {}
        for var, value in zip(jaxpr.constvars, consts):
            env[var] = _Value(constant=np.asarray(value))
        for var, value in zip(jaxpr.invars, args):
            env[var] = value

        def read(atom) -> _Value:
            if isinstance(atom, jax.extend.core.Literal):
                return _Value(constant=np.asarray(atom.val))
            return env[atom]

        for eqn in jaxpr.eqns:
            inputs = [read(v) for v in eqn.invars]
            outputs = self.equation(eqn, inputs)
            for var, value in zip(eqn.outvars, outputs):
                env[var] = value
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn, inputs: list[_Value]) -> list[_Value]:
        name, params = eqn.primitive.name, eqn.params
        sub = _SUBJAXPR.get(name)
        if sub is not None:
            closed = params[sub]
            return self.inline(closed.jaxpr, closed.consts, inputs)
        symbolic = any(not isinstance(d, (int, np.integer)) for v in eqn.outvars for d in v.aval.shape)
        if all(v.constant is not None for v in inputs) and not symbolic:  # fold at export time
            results = eqn.primitive.bind(*[v.constant for v in inputs], **params)
            results = results if eqn.primitive.multiple_results else [results]
            return [_Value(constant=np.asarray(r)) for r in results]
        handler = _HANDLERS.get(name)
        if handler is None:
            raise _unsupported(f"the JAX primitive '{name}'")
        out_aval = eqn.outvars[0].aval
        names = [self.tensor(v, eqn.invars[i].aval.dtype) for i, v in enumerate(inputs)]
        return [_Value(handler(self, names, params, [v.aval for v in eqn.invars], out_aval, inputs))]


# Primitives whose body is a sub-jaxpr to inline, and the parameter holding it.
_SUBJAXPR = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
             "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr"}

_ELEMENTWISE = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min", "pow": "Pow",
                "neg": "Neg", "sign": "Sign", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "logistic": "Sigmoid", "tanh": "Tanh",
                "abs": "Abs", "eq": "Equal", "gt": "Greater", "lt": "Less", "ge": "GreaterOrEqual",
                "le": "LessOrEqual", "and": "And", "or": "Or", "not": "Not", "copy": "Identity",
                "copy_p": "Identity", "stop_gradient": "Identity"}


def _elementwise(op: str):
    return lambda g, names, params, avals, out, values: g.node(op, names)


def _onnx_type(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _nchw(g: _Graph, x: str) -> str:
    return g.node("Transpose", [x], perm=[0, 3, 1, 2])


def _nhwc(g: _Graph, x: str) -> str:
    return g.node("Transpose", [x], perm=[0, 2, 3, 1])


def _conv(g, names, params, avals, out, values):
    x, kernel = names
    numbers = params["dimension_numbers"]
    if (tuple(numbers.lhs_spec), tuple(numbers.rhs_spec), tuple(numbers.out_spec)) != ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)):
        raise _unsupported(f"a convolution with dimension numbers {numbers} (NHWC/HWIO only)")
    padding = [tuple(int(p) for p in pair) for pair in params["padding"]]
    if any(d != 1 for d in params["lhs_dilation"]) or params["batch_group_count"] != 1 or min(min(p) for p in padding) < 0:
        raise _unsupported("a convolution with input dilation, batch groups or negative padding")
    weights = (g.constant(np.transpose(values[1].constant, (3, 2, 0, 1)), "kernel") if values[1].constant is not None
               else g.node("Transpose", [kernel], perm=[3, 2, 0, 1]))
    y = g.node("Conv", [_nchw(g, x), weights], strides=list(params["window_strides"]),
               dilations=list(params["rhs_dilation"]), group=int(params["feature_group_count"]),
               pads=[padding[0][0], padding[1][0], padding[0][1], padding[1][1]])
    return _nhwc(g, y)


def _max_pool(g, names, params, avals, out, values):
    window, strides = tuple(params["window_dimensions"]), tuple(params["window_strides"])
    padding = [tuple(int(p) for p in pair) for pair in params["padding"]]
    if (len(window) != 4 or window[0] != 1 or window[3] != 1 or strides[0] != 1 or strides[3] != 1
            or padding[0] != (0, 0) or padding[3] != (0, 0) or any(d != 1 for d in params["base_dilation"])):
        raise _unsupported("a max pool over other than the spatial axes of an NHWC map")
    y = g.node("MaxPool", [_nchw(g, names[0])], kernel_shape=list(window[1:3]), strides=list(strides[1:3]),
               dilations=list(params["window_dilation"][1:3]),
               pads=[padding[1][0], padding[2][0], padding[1][1], padding[2][1]])
    return _nhwc(g, y)


def _reduce(op: str):
    def handler(g, names, params, avals, out, values):
        return g.node(op, [names[0], g.constant(np.asarray(params["axes"], np.int64), "axes")], keepdims=0)
    return handler


def _dot_general(g, names, params, avals, out, values):
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = params["dimension_numbers"]
    letters = iter(string.ascii_letters)
    lhs = [next(letters) for _ in avals[0].shape]
    rhs = [next(letters) for _ in avals[1].shape]
    for a, b in zip((*lhs_contract, *lhs_batch), (*rhs_contract, *rhs_batch)):
        rhs[b] = lhs[a]
    batch = [lhs[a] for a in lhs_batch]
    free_lhs = [c for i, c in enumerate(lhs) if i not in lhs_contract and i not in lhs_batch]
    free_rhs = [c for i, c in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
    equation = f"{''.join(lhs)},{''.join(rhs)}->{''.join(batch + free_lhs + free_rhs)}"
    return g.node("Einsum", names, equation=equation)


def _broadcast_in_dim(g, names, params, avals, out, values):
    shape, kept = tuple(params["shape"]), tuple(params["broadcast_dimensions"])
    new_axes = [i for i in range(len(shape)) if i not in kept]
    x = names[0]
    if new_axes:
        x = g.node("Unsqueeze", [x, g.constant(np.asarray(new_axes, np.int64), "axes")])
    return g.node("Expand", [x, g.shape(shape)])


def _reshape(g, names, params, avals, out, values):
    if params.get("dimensions") is not None:
        raise _unsupported("a reshape with a dimension permutation")
    return g.node("Reshape", [names[0], g.shape(tuple(params["new_sizes"]))])


def _squeeze(g, names, params, avals, out, values):
    return g.node("Squeeze", [names[0], g.constant(np.asarray(params["dimensions"], np.int64), "axes")])


def _concatenate(g, names, params, avals, out, values):
    return g.node("Concat", names, axis=int(params["dimension"]))


def _stack(g, names, params, avals, out, values):
    axis = g.constant(np.asarray([params["axis"]], np.int64), "axes")
    return g.node("Concat", [g.node("Unsqueeze", [n, axis]) for n in names], axis=int(params["axis"]))


def _convert(g, names, params, avals, out, values):
    return g.node("Cast", names, to=_onnx_type(params["new_dtype"]))


def _integer_pow(g, names, params, avals, out, values):
    exponent = g.constant(np.asarray(params["y"], np.dtype(out.dtype)), "exponent")
    return g.node("Pow", [names[0], exponent])


def _square(g, names, params, avals, out, values):
    return g.node("Mul", [names[0], names[0]])


def _rsqrt(g, names, params, avals, out, values):
    return g.node("Reciprocal", [g.node("Sqrt", names)])


def _select_n(g, names, params, avals, out, values):
    if len(names) != 3:
        raise _unsupported("select_n with more than two cases")
    predicate = names[0] if np.dtype(avals[0].dtype) == np.bool_ else g.node("Cast", [names[0]], to=_onnx_type(np.bool_))
    return g.node("Where", [predicate, names[2], names[1]])


def _ne(g, names, params, avals, out, values):
    return g.node("Not", [g.node("Equal", names)])


def _is_finite(g, names, params, avals, out, values):
    return g.node("Not", [g.node("Or", [g.node("IsInf", names), g.node("IsNaN", names)])])


def _slice(g, names, params, avals, out, values):
    starts = np.asarray(params["start_indices"], np.int64)
    limits = [INT64_MAX if g.dim(d)[1] else int(d) for d in params["limit_indices"]]
    steps = np.asarray(params["strides"] or [1] * len(starts), np.int64)
    return g.node("Slice", [names[0], g.constant(starts, "starts"), g.constant(np.asarray(limits, np.int64), "ends"),
                            g.constant(np.arange(len(starts), dtype=np.int64), "axes"), g.constant(steps, "steps")])


def _pad(g, names, params, avals, out, values):
    config = [tuple(int(p) for p in c) for c in params["padding_config"]]
    if any(interior or lo < 0 or hi < 0 for lo, hi, interior in config):
        raise _unsupported("interior or negative padding")
    pads = np.asarray([lo for lo, _, _ in config] + [hi for _, hi, _ in config], np.int64)
    return g.node("Pad", [names[0], g.constant(pads, "pads"), names[1]], mode="constant")


def _gather(g, names, params, avals, out, values):
    """The gathers that basic indexing (`x[:, 0]`, `x[..., 1:3]`) becomes: one constant start index
    per indexed axis -> a slice, then the collapsed axes squeezed out."""
    numbers, sizes = params["dimension_numbers"], tuple(params["slice_sizes"])
    indices = values[1].constant
    operand = avals[0]
    simple = (indices is not None and indices.ndim == 1 and not numbers.operand_batching_dims
              and tuple(numbers.offset_dims) == tuple(range(len(operand.shape) - len(numbers.collapsed_slice_dims))))
    if not simple:
        raise _unsupported("a gather other than indexing with constant integers")
    starts, ends, axes = [], [], []
    for axis, start in zip(numbers.start_index_map, indices):
        starts.append(int(start))
        ends.append(int(start) + int(sizes[axis]))
        axes.append(axis)
    for axis, (size, d) in enumerate(zip(sizes, operand.shape)):
        if axis not in axes and not (size == d):
            raise _unsupported("a gather that slices an axis it does not index")
    x = g.node("Slice", [names[0], g.constant(np.asarray(starts, np.int64), "starts"),
                         g.constant(np.asarray(ends, np.int64), "ends"), g.constant(np.asarray(axes, np.int64), "axes")])
    if numbers.collapsed_slice_dims:
        x = g.node("Squeeze", [x, g.constant(np.asarray(numbers.collapsed_slice_dims, np.int64), "axes")])
    return x


_HANDLERS: dict[str, Callable] = {
    **{name: _elementwise(op) for name, op in _ELEMENTWISE.items()},
    "conv_general_dilated": _conv, "reduce_window_max": _max_pool, "dot_general": _dot_general,
    "reduce_sum": _reduce("ReduceSum"), "reduce_max": _reduce("ReduceMax"), "reduce_min": _reduce("ReduceMin"),
    "broadcast_in_dim": _broadcast_in_dim, "reshape": _reshape, "squeeze": _squeeze, "concatenate": _concatenate,
    "stack": _stack, "convert_element_type": _convert, "integer_pow": _integer_pow, "rsqrt": _rsqrt,
    "square": _square,
    "select_n": _select_n, "ne": _ne, "is_finite": _is_finite, "slice": _slice, "pad": _pad, "gather": _gather,
}
