"""A QDQ INT8 ONNX file as a trainable torch module: the graph ONNX Runtime runs, with every
QuantizeLinear -> DequantizeLinear pair a fake quantization, so that quantization-aware
training fine-tunes the very file that ships (its placement, types and FP32 nodes included)
and writes its weights and scales back into it.

- Weights (a DequantizeLinear of an int8 initializer) are float parameters, started from
  the FP32 file's weights, fake-quantized per channel on the file's axis with ONNX
  Runtime's symmetric scale (``max |w| / qmax``, ``qmax`` 127, or 64 for 7-bit weights).
  Other quantized constants (asymmetric, or not a compute node's weight) train on the
  file's own grid.
- Activation quantizers (a QuantizeLinear of a computed tensor) round to the file's grid
  with the file's zero point and a learned scale (as LSQ learns it, Esser et al. 2020,
  https://arxiv.org/abs/1902.08153: rounding passes gradients straight through, clipping
  stops them); quantizers that share a scale initializer share the parameter, as ONNX
  Runtime needs for the ops it runs in INT8 as they are (pooling, reshapes).
- Biases (a DequantizeLinear of an int32 initializer) are rounded to input scale x weight
  scale, as ONNX Runtime's quantizer sets them.
- Float initializers read by compute and normalization nodes (the FP32 nodes' weights) are
  parameters too; every other initializer is a constant.

`QDQModule.files` writes the trained weights and scales into the INT8 file and into its FP32
source (for nodes an accuracy budget reverts to FP32 later).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..errors import ModelError
from .onnx_ops import OPS

_COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_NORMS = ("LayerNormalization", "BatchNormalization", "InstanceNormalization", "PRelu")


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` whose gradient is 1 (straight through)."""
    return x + (torch.round(x) - x).detach()


def weight_scale(weight: torch.Tensor, axis: int | None, qmax: int) -> torch.Tensor:
    """ONNX Runtime's symmetric weight scale: ``max |w| / qmax`` per channel on ``axis``
    (shaped to broadcast against ``weight``), or per tensor when ``axis`` is None; 1 where
    the weights are all zero."""
    w = weight.detach().abs()
    if axis is None:
        absmax = w.amax()
    else:
        dims = tuple(d for d in range(w.dim()) if d != axis)
        absmax = w.amax(dim=dims, keepdim=True) if dims else w
    scale = (absmax.double() / qmax).float()  # as ONNX Runtime rounds it
    return torch.where(absmax > 0, scale, torch.ones_like(scale))


class QDQModule(nn.Module):
    """The graph of a QDQ INT8 ONNX file, computed in torch with fake quantization.

    Called like the model it was exported from (a tensor, or its named inputs as keyword
    arguments), it returns the file's first output. Training it is quantization-aware
    training of the file; `files` gives the file with the trained values.

    Args:
        model: the QDQ INT8 file (as ONNX Runtime's ``quantize_static`` writes it).
        source: the FP32 file it was quantized from: weights start from its values (not
            the rounded ones) when given.
        weight_qmax: the largest integer of a weight (127; 64 for 7-bit weights).
        learn_scales: train the activation scales (else they stay the file's).

    Raises:
        ModelError: an op this module cannot compute (named), or a graph that is not QDQ.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        source: onnx.ModelProto | None = None,
        *,
        weight_qmax: int = 127,
        learn_scales: bool = True,
    ) -> None:
        super().__init__()
        graph = model.graph
        arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        originals = {}
        if source is not None:
            originals = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in arrays]
        self.output_names = [o.name for o in graph.output]
        self.weight_qmax = weight_qmax
        self.learn_scales = learn_scales
        self.frozen = False
        unknown = sorted({n.op_type for n in graph.node} - set(OPS) - _QDQ_OPS)
        if unknown:
            msg = f"quantization-aware training cannot compute the op(s) {', '.join(unknown)}"
            raise ModelError(msg)
        produced_by_q = {n.output[0]: n for n in graph.node if n.op_type == "QuantizeLinear"}
        self.params = nn.ParameterDict()
        self._param_of: dict[str, str] = {}  # initializer name -> key in self.params
        self._constants: dict[str, str] = {}  # initializer name -> buffer name
        self.weights: dict[str, dict[str, Any]] = {}  # DQ output -> weight quantizer
        self.biases: dict[str, dict[str, Any]] = {}  # DQ output -> bias quantizer
        self.quantizers: dict[str, dict[str, Any]] = {}  # Q output -> activation quantizer
        self.passes: dict[str, str] = {}  # DQ output -> the Q output it reads
        self._scale_inits: dict[str, set[str]] = {}  # scale param key -> initializer names
        self._steps: list[tuple[onnx.NodeProto, dict[str, Any]]] = []

        def parameter(name: str, value: np.ndarray) -> str:
            if name not in self._param_of:
                key = f"p{len(self.params)}"
                self.params[key] = nn.Parameter(torch.from_numpy(np.array(value, np.float32)))
                self._param_of[name] = key
            return self._param_of[name]

        weights = {  # what compute nodes read as weights: their scales follow them
            n.input[1] for n in graph.node if n.op_type in _COMPUTE and len(n.input) > 1
        }
        for node in graph.node:
            attrs = {a.name: _attribute(a) for a in node.attribute}
            if node.op_type == "DequantizeLinear" and node.input[0] in arrays:
                self._weight_or_bias(node, attrs, arrays, originals, parameter, weights)
                continue
            if node.op_type == "DequantizeLinear":
                quantizer = produced_by_q.get(node.input[0])
                if quantizer is None:
                    raise ModelError(f"DequantizeLinear {node.name!r} reads no QuantizeLinear")
                self.passes[node.output[0]] = node.input[0]
                key = self.quantizers.get(node.input[0], {}).get("scale")
                if key is not None and len(node.input) > 1:
                    self._scale_inits[key].add(node.input[1])
                continue
            if node.op_type == "QuantizeLinear":
                if node.input[0] in arrays:
                    raise ModelError(f"QuantizeLinear {node.name!r} of an initializer")
                self._activation(node, arrays, parameter)
            self._steps.append((node, attrs))
        trainable = {
            name
            for node in graph.node
            if node.op_type in _COMPUTE + _NORMS
            for name in node.input[1:]
            if name in arrays and arrays[name].dtype == np.float32 and arrays[name].size > 1
        }
        for name, value in arrays.items():
            if name in trainable and name not in self._param_of:
                start = originals.get(name)
                parameter(name, start if _same(start, value) else value)
            elif name not in self._param_of:
                self._constants[name] = self._buffer(torch.from_numpy(np.array(value)))

    def _buffer(self, value: torch.Tensor) -> str:
        """Register ``value`` as a buffer (it moves with the module); returns its name."""
        key = f"c{len(self._buffers)}"
        self.register_buffer(key, value, persistent=False)
        return key

    def _weight_or_bias(
        self,
        node: onnx.NodeProto,
        attrs: dict[str, Any],
        arrays: dict[str, np.ndarray],
        originals: dict[str, np.ndarray],
        parameter: Any,
        weights: set[str],
    ) -> None:
        quantized = arrays[node.input[0]]
        scale = arrays[node.input[1]]
        zero = arrays[node.input[2]] if len(node.input) > 2 else np.zeros(1)
        dequantized = _dequantize(quantized, scale, attrs.get("axis", 1))
        stem = node.input[0].removesuffix("_quantized")
        start = originals.get(stem)
        if not _same(start, dequantized):
            start = originals.get(node.output[0])
        if not _same(start, dequantized):
            start = dequantized
        spec = {
            "node": node,
            "param": parameter(node.input[0], start),
            "axis": attrs.get("axis", 1) if scale.size > 1 else None,
            "original": stem if stem in originals else node.output[0],
        }
        symmetric = quantized.dtype == np.int8 and not np.any(zero != 0)
        if quantized.dtype != np.int32 and not (symmetric and node.output[0] in weights):
            # a constant other than a weight (or asymmetric): it keeps the file's grid
            info = np.iinfo(quantized.dtype)
            shape = [1] * quantized.ndim
            if scale.size > 1:
                shape[attrs.get("axis", 1)] = -1
            spec["grid"] = (
                self._buffer(torch.from_numpy(np.array(scale, np.float32).reshape(shape))),
                self._buffer(torch.from_numpy(np.array(zero, np.float32).reshape(shape))),
                int(info.min),
                int(info.max),
            )
        if quantized.dtype == np.int32:
            self.biases[node.output[0]] = spec
        else:
            self.weights[node.output[0]] = spec

    def _activation(
        self, node: onnx.NodeProto, arrays: dict[str, np.ndarray], parameter: Any
    ) -> None:
        scale = arrays.get(node.input[1])
        zero = arrays.get(node.input[2]) if len(node.input) > 2 else np.zeros((), np.uint8)
        if scale is None or zero is None or scale.size != 1:
            raise ModelError(f"QuantizeLinear {node.name!r}: a per-tensor constant scale is needed")
        info = np.iinfo(zero.dtype)
        key = parameter(node.input[1], np.array(scale, np.float32).reshape(()))
        self._scale_inits.setdefault(key, set()).add(node.input[1])
        self.quantizers[node.output[0]] = {
            "scale": key,
            "zero": float(zero.reshape(-1)[0]),
            "qmin": int(info.min),
            "qmax": int(info.max),
        }

    def freeze(self) -> None:
        """Stop changing the scales: activation scales stop learning and each weight's
        scale stays what it is now (the last part of QAT; `files` writes these)."""
        for spec in self.weights.values():
            spec["frozen"] = weight_scale(
                self.params[spec["param"]], spec["axis"], self.weight_qmax
            )
        for key in self._scale_inits:
            self.params[key].requires_grad_(False)
        self.frozen = True

    def forward(self, *args: torch.Tensor, **named: torch.Tensor) -> torch.Tensor:
        """The file's first output on the inputs (a tensor, or named tensors)."""
        if args:
            if len(args) != 1 or named or len(self.input_names) != 1:
                msg = f"the file takes the inputs {self.input_names}; give them by name"
                raise ModelError(msg)
            named = {self.input_names[0]: args[0]}
        values: dict[str, torch.Tensor | None] = {"": None}
        values.update((name, named[name]) for name in self.input_names)
        scales: dict[str, torch.Tensor] = {}
        for name, spec in self.weights.items():
            values[name], scales[name] = self._fake_weight(spec)
        for node, attrs in self._steps:
            inputs = [self._value(n, node, values, scales) for n in node.input]
            if node.op_type == "QuantizeLinear":
                out, scale = self._fake_activation(inputs[0], self.quantizers[node.output[0]])
                values[node.output[0]], scales[node.output[0]] = out, scale
                continue
            if node.op_type == "Constant":
                device = next(iter(named.values())).device
                values[node.output[0]] = _constant(attrs).to(device)
                continue
            result = OPS[node.op_type](inputs, attrs)
            outs = result if isinstance(result, tuple) else (result,)
            for name, value in zip(node.output, outs, strict=False):
                values[name] = value
        out = self.output_names[0]
        return values[self.passes.get(out, out)]  # type: ignore[return-value]

    def _value(
        self,
        name: str,
        node: onnx.NodeProto,
        values: dict[str, torch.Tensor | None],
        scales: dict[str, torch.Tensor],
    ) -> torch.Tensor | None:
        if name in values:
            return values[name]
        if name in self.passes:  # a DequantizeLinear of a fake-quantized tensor
            source = self.passes[name]
            scales[name] = scales[source]
            return values[source]
        if name in self.biases:
            spec = self.biases[name]
            x_name, w_name = node.input[0], node.input[1]
            x_scale = scales.get(x_name) if x_name in scales else None
            if x_scale is None and x_name in self.passes:
                x_scale = scales.get(self.passes[x_name])
            w_scale = scales.get(w_name)
            if x_scale is None or w_scale is None:
                raise ModelError(f"the int32 bias {name!r} is not read by a quantized node")
            scale = (x_scale * w_scale).detach().reshape(-1)
            scales[name] = scale
            bias = self.params[spec["param"]]
            return _round_ste(bias / scale) * scale
        key = self._param_of.get(name)
        if key is not None:
            return self.params[key]
        if name in self._constants:
            return self.get_buffer(self._constants[name])
        raise ModelError(f"{node.op_type} {node.name!r} reads {name!r}, which nothing computes")

    def _grid(self, spec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        scale, zero, low, high = spec["grid"]
        return self.get_buffer(scale), self.get_buffer(zero), low, high

    def _fake_weight(self, spec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.params[spec["param"]]
        if "grid" in spec:  # asymmetric, on the file's own scale and zero point
            scale, zero, low, high = self._grid(spec)
            q = torch.clamp(_round_ste(weight / scale) + zero, low, high)
            return (q - zero) * scale, scale.reshape(-1)
        scale = spec.get("frozen") if self.frozen else None
        if scale is None:
            scale = weight_scale(weight, spec["axis"], self.weight_qmax)
        q = torch.clamp(_round_ste(weight / scale), -self.weight_qmax, self.weight_qmax)
        return q * scale, scale.reshape(-1)

    def _fake_activation(
        self, x: torch.Tensor, spec: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.params[spec["scale"]].abs().clamp_min(1e-12)
        if not self.learn_scales:
            scale = scale.detach()
        zero = spec["zero"]
        x = x.float()  # rounding to 256 levels needs more than bfloat16's 8 bits
        q = torch.clamp(_round_ste(x / scale) + zero, spec["qmin"], spec["qmax"])
        return (q - zero) * scale, scale.detach().reshape(-1)

    @torch.no_grad()
    def files(
        self, model: onnx.ModelProto, source: onnx.ModelProto | None = None
    ) -> tuple[onnx.ModelProto, onnx.ModelProto | None]:
        """``model`` (the QDQ file this module was made from) with the trained weights,
        biases and scales, and ``source`` (its FP32 file) with the trained float weights."""
        new: dict[str, np.ndarray] = {}  # initializer of ``model`` -> its value
        floats: dict[str, np.ndarray] = {}  # initializer of ``source`` -> its value
        weight_scales: dict[str, torch.Tensor] = {}
        for name, spec in self.weights.items():
            dq = spec["node"]
            weight = self.params[spec["param"]]
            if "grid" in spec:
                scale, zero, low, high = self._grid(spec)
            else:
                scale = spec.get("frozen") if self.frozen else None
                if scale is None:
                    scale = weight_scale(weight, spec["axis"], self.weight_qmax)
                zero, low, high = 0.0, -self.weight_qmax, self.weight_qmax
            q = torch.clamp(torch.round(weight / scale) + zero, low, high)
            new[dq.input[0]] = _array(q)
            new[dq.input[1]] = _array(scale)
            weight_scales[name] = scale.reshape(-1)
            floats[spec["original"]] = _array(weight)
        activation_scales = {}
        for key, names in self._scale_inits.items():
            activation_scales[key] = self.params[key].abs().clamp_min(1e-12)
            new.update((init, _array(activation_scales[key])) for init in names)
        for node in model.graph.node:  # int32 biases: input scale x weight scale
            spec = self.biases.get(node.input[2]) if len(node.input) > 2 else None
            if spec is None:
                continue
            x_name = self.passes.get(node.input[0], node.input[0])
            x_scale = activation_scales[self.quantizers[x_name]["scale"]]
            scale = x_scale * weight_scales[node.input[1]]
            bias = self.params[spec["param"]]
            new[spec["node"].input[0]] = _array(torch.round(bias.double() / scale.double()))
            new[spec["node"].input[1]] = _array(scale)
            floats[spec["original"]] = _array(bias)
        quantized = {s["param"] for s in [*self.weights.values(), *self.biases.values()]}
        for name, key in self._param_of.items():  # float weights (FP32 nodes)
            if key not in quantized and key not in self._scale_inits:
                new[name] = floats[name] = _array(self.params[key])
        int8 = _with_initializers(model, new)
        return int8, None if source is None else _with_initializers(source, floats)


_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "Constant"}


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _attribute(attribute: onnx.AttributeProto) -> Any:
    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, onnx.TensorProto):
        return torch.from_numpy(np.array(numpy_helper.to_array(value)))
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


def _constant(attrs: dict[str, Any]) -> torch.Tensor:
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise ModelError(f"a Constant node with {sorted(attrs)} is not supported")


def _dequantize(q: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    values = q.astype(np.float32)
    if scale.size == 1:
        return values * scale.reshape(())
    shape = [1] * values.ndim
    shape[axis] = -1
    return values * scale.reshape(shape)


def _same(a: np.ndarray | None, b: np.ndarray) -> bool:
    return a is not None and a.shape == b.shape and a.dtype == np.float32


def _with_initializers(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with the initializers ``values`` names set (each keeps its name,
    shape and dtype: integers are clipped to their type); names it lacks, or values of
    another size, are left out."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, tensor in enumerate(copy.graph.initializer):
        value = values.get(tensor.name)
        if value is None or value.size != int(np.prod(tensor.dims)):
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            value = np.clip(np.asarray(value, np.float64), info.min, info.max)
        array = np.asarray(value).astype(dtype).reshape(tuple(tensor.dims))
        copy.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor.name))
    return copy
