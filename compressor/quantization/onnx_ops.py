"""ONNX operators computed with torch functions, for running an exported graph in torch.

`OPS` maps an ONNX op type to ``fn(inputs, attrs) -> output or tuple of outputs``, where
``inputs`` are torch tensors (None for an omitted optional input) and ``attrs`` the node's
attributes as Python values. It covers what ``torch.onnx.export`` writes for convolutional
nets, MLPs and transformer encoders (and what ONNX Runtime's pre-processing leaves of them);
`compressor.quantization.qdq_module` runs a quantized file's graph with them, differentiably,
so that the file itself can be fine-tuned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn import functional as F

Op = Callable[[list[Any], dict[str, Any]], Any]

_DTYPES = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}


def _ints(value: torch.Tensor | Sequence[int] | None) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def _pads(x: torch.Tensor, pads: list[int] | None, value: float = 0.0) -> tuple[torch.Tensor, int]:
    """Apply ONNX ``pads`` ([x1_begin, x2_begin, ..., x1_end, x2_end]); symmetric pads are
    returned as an int for the torch op instead (0 when none)."""
    if not pads or not any(pads):
        return x, 0
    half = len(pads) // 2
    begin, end = pads[:half], pads[half:]
    if begin == end and len(set(begin)) == 1:
        return x, begin[0]
    torch_pads: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        torch_pads += [b, e]
    return F.pad(x, torch_pads, value=value), 0


def _conv(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        raise NotImplementedError("Conv with auto_pad")
    dims = w.dim() - 2
    x, pad = _pads(x, attrs.get("pads"))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return fn(
        x,
        w,
        b,
        stride=attrs.get("strides", [1] * dims),
        padding=pad,
        dilation=attrs.get("dilations", [1] * dims),
        groups=attrs.get("group", 1),
    )


def _conv_transpose(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    dims = w.dim() - 2
    pads = attrs.get("pads", [0] * 2 * dims)
    if pads[:dims] != pads[dims:] or "output_shape" in attrs:
        raise NotImplementedError("ConvTranspose with asymmetric pads or output_shape")
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
    return fn(
        x,
        w,
        b,
        stride=attrs.get("strides", [1] * dims),
        padding=pads[:dims],
        output_padding=attrs.get("output_padding", [0] * dims),
        groups=attrs.get("group", 1),
        dilation=attrs.get("dilations", [1] * dims),
    )


def _gemm(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    a, b = inputs[0], inputs[1]
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = attrs.get("alpha", 1.0) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + attrs.get("beta", 1.0) * inputs[2]
    return y


def _pool(kind: str) -> Op:
    def pool(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
        x = inputs[0]
        kernel = attrs["kernel_shape"]
        dims = len(kernel)
        strides = attrs.get("strides", [1] * dims)
        fill = -math.inf if kind == "max" else 0.0
        x, pad = _pads(x, attrs.get("pads"), fill)
        ceil = bool(attrs.get("ceil_mode", 0))
        if kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
            dilation = attrs.get("dilations", [1] * dims)
            return fn(x, kernel, strides, pad, dilation=dilation, ceil_mode=ceil)
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
        return fn(x, kernel, strides, pad, ceil, bool(attrs.get("count_include_pad", 0)))

    return pool


def _reduce(fn: Callable[..., torch.Tensor]) -> Op:
    def reduce(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
        x = inputs[0]
        axes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else None
        axes = axes if axes is not None else attrs.get("axes")
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, dim=tuple(axes), keepdim=keep)

    return reduce


def _amax(x: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return torch.amax(x, dim=dim, keepdim=keepdim)


def _amin(x: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return torch.amin(x, dim=dim, keepdim=keepdim)


def _reshape(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, shape = inputs[0], _ints(inputs[1])
    assert shape is not None
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _flatten(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = inputs[0]
    axis = attrs.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _split(inputs: list[Any], attrs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    x, axis = inputs[0], attrs.get("axis", 0)
    sizes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else attrs.get("split")
    if sizes is None:
        parts = attrs.get("num_outputs")
        if parts is None:
            raise NotImplementedError("Split without sizes or num_outputs")
        return tuple(torch.tensor_split(x, parts, dim=axis))
    return tuple(torch.split(x, sizes, dim=axis))


def _slice(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = inputs[0]
    starts, ends = _ints(inputs[1]), _ints(inputs[2])
    assert starts is not None and ends is not None
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else None
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index: list[slice] = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        size = x.shape[axis]
        if step < 0:  # torch slices forward only: slice then flip
            start = min(start + size if start < 0 else start, size - 1)
            end = end + size if end < 0 else end
            end = max(end, -1)
            index[axis] = slice(end + 1, start + 1)
            flips.append((axis, -step))
            continue
        start = max(0, min(start + size if start < 0 else start, size))
        end = max(0, min(end + size if end < 0 else end, size))
        index[axis] = slice(start, end, step)
    y = x[tuple(index)]
    for axis, step in flips:
        y = y.flip(axis)[(slice(None),) * axis + (slice(None, None, step),)]
    return y


def _squeeze(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = inputs[0]
    axes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else attrs.get("axes")
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes))


def _unsqueeze(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = inputs[0]
    axes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else attrs["axes"]
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _shape(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    shape = list(inputs[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end")
    return torch.tensor(shape[start:end], dtype=torch.int64)


def _gather(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, index = inputs[0], inputs[1].long()
    axis = attrs.get("axis", 0) % x.dim()
    index = torch.where(index < 0, index + x.shape[axis], index)
    flat = torch.index_select(x, axis, index.reshape(-1))
    return flat.reshape((*x.shape[:axis], *index.shape, *x.shape[axis + 1 :]))


def _softmax(fn: Callable[..., torch.Tensor]) -> Op:
    return lambda i, a: fn(i[0], dim=a.get("axis", -1))


def _clip(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("min")
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else attrs.get("max")
    return torch.clamp(inputs[0], None if low is None else low, None if high is None else high)


def _layer_norm(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = attrs.get("axis", -1) % x.dim()
    return F.layer_norm(x, x.shape[axis:], scale, bias, attrs.get("epsilon", 1e-5))


def _batch_norm(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, scale, bias, mean, var = inputs[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5))


def _instance_norm(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, scale, bias = inputs[:3]
    return F.instance_norm(x, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5))


def _resize(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = inputs[0]
    scales = inputs[2] if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel() else None
    sizes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
    mode = attrs.get("mode", "nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if sizes is not None:
        size = sizes[2:]
    else:
        assert scales is not None
        factors = scales.tolist()[2:]
        size = [math.floor(s * f) for s, f in zip(x.shape[2:], factors, strict=True)]
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    align = attrs.get("coordinate_transformation_mode", "half_pixel")
    align = align.decode() if isinstance(align, bytes) else align
    torch_mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    if mode == "cubic":
        torch_mode = "bicubic"
    return F.interpolate(x, size=size, mode=torch_mode, align_corners=align == "align_corners")


def _pad(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = inputs[0]
    pads = _ints(inputs[1]) if len(inputs) > 1 else attrs["pads"]
    assert pads is not None
    value = float(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else 0.0
    mode = attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    half = len(pads) // 2
    torch_pads: list[int] = []
    for b, e in zip(reversed(pads[:half]), reversed(pads[half:]), strict=True):
        torch_pads += [b, e]
    if mode == "constant":
        return F.pad(x, torch_pads, value=value)
    return F.pad(x, torch_pads[: 2 * (x.dim() - 2)], mode={"edge": "replicate"}.get(mode, mode))


def _cast(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return inputs[0].to(_DTYPES[attrs["to"]])


def _constant_of_shape(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    value = attrs.get("value")
    fill = value if isinstance(value, torch.Tensor) else torch.zeros(1)
    return torch.full(_ints(inputs[0]) or [], fill.reshape(-1)[0].item(), dtype=fill.dtype)


def _expand(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, shape = inputs[0], _ints(inputs[1]) or []
    rank = max(x.dim(), len(shape))
    have = [1] * (rank - x.dim()) + list(x.shape)
    want = [1] * (rank - len(shape)) + shape
    return x.expand([max(h, w) if w != 1 else h for h, w in zip(have, want, strict=True)])


def _gelu(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    approximate = attrs.get("approximate", "none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    return F.gelu(inputs[0], approximate=approximate)


def _binary(fn: Callable[[Any, Any], Any]) -> Op:
    return lambda i, a: fn(i[0], i[1])


def _unary(fn: Callable[[Any], Any]) -> Op:
    return lambda i, a: fn(i[0])


def _einsum(inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    equation = attrs["equation"]
    return torch.einsum(equation.decode() if isinstance(equation, bytes) else equation, *inputs)


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


OPS: dict[str, Op] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Pow": _binary(torch.pow),
    "Min": lambda i, a: torch.stack(torch.broadcast_tensors(*i)).amin(0),
    "Max": lambda i, a: torch.stack(torch.broadcast_tensors(*i)).amax(0),
    "Equal": _binary(torch.eq),
    "Greater": _binary(torch.gt),
    "Less": _binary(torch.lt),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Not": _unary(torch.logical_not),
    "Where": lambda i, a: torch.where(i[0], i[1], i[2]),
    "Relu": _unary(F.relu),
    "LeakyRelu": lambda i, a: F.leaky_relu(i[0], a.get("alpha", 0.01)),
    "PRelu": lambda i, a: torch.where(i[0] >= 0, i[0], i[0] * i[1]),
    "Elu": lambda i, a: F.elu(i[0], a.get("alpha", 1.0)),
    "Sigmoid": _unary(torch.sigmoid),
    "HardSigmoid": lambda i, a: torch.clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0, 1),
    "HardSwish": _unary(F.hardswish),
    "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf),
    "Gelu": _gelu,
    "Softplus": _unary(F.softplus),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Identity": _unary(lambda x: x),
    "Dropout": lambda i, a: i[0],
    "Clip": _clip,
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda i, a: i[0].mean(tuple(range(2, i[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda i, a: i[0].amax(tuple(range(2, i[0].dim())), keepdim=True),
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(_amax),
    "ReduceMin": _reduce(_amin),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda i, a: i[0].permute(a.get("perm", list(range(i[0].dim()))[::-1])),
    "Concat": lambda i, a: torch.cat([t for t in i if t is not None], a["axis"]),
    "Split": _split,
    "Slice": _slice,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Shape": _shape,
    "Size": lambda i, a: torch.tensor(i[0].numel(), dtype=torch.int64),
    "Gather": _gather,
    "Cast": _cast,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Tile": lambda i, a: i[0].repeat(_ints(i[1])),
    "Range": lambda i, a: torch.arange(i[0].item(), i[1].item(), i[2].item(), dtype=i[0].dtype),
    "LayerNormalization": _layer_norm,
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm,
    "Resize": _resize,
    "Pad": _pad,
    "Einsum": _einsum,
}
"""ONNX op type -> its torch computation (see the module docstring)."""
