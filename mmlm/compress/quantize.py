"""int8 inference on the CPU: every ``nn.Linear`` becomes a dynamic int8 Linear.

Weights are int8, one symmetric scale per output channel, quantized once; activations are
quantized at run time, one scale per call, and the int8 product is accumulated in int32 by
PyTorch's x86 kernels (fbgemm). Embeddings, norms and attention's softmax stay in float32.

Why PyTorch's own ``quantize_dynamic`` (torch.ao) and not torchao, measured on a 2-core x86 CPU
with AVX-512 VNNI: torchao 0.18's ``Int8DynamicActivationInt8WeightConfig`` ran at 0.4-0.6x the
speed of float32 in eager mode (its fast path goes through ``torch.compile``), while torch.ao's
kernels gave 1.3x on the digits CLIP and 2.1x on all-MiniLM-L6-v2 (scripts/compress_table.py).
A hand-written per-token ``torch._int_mm`` path was the most accurate (MiniLM min cosine 0.996)
but no faster than float32 in eager mode (0.8-1.3x). torch.ao warns that it is deprecated; its
kernels still ship in PyTorch 2.14.

One change to PyTorch's default: activations use all 8 bits (``reduce_range=False``) on CPUs with
VNNI, as PyTorch's own onednn qconfig does. The 7-bit default exists to avoid an int16 overflow
in the AVX2 instruction without VNNI; on VNNI it only costs accuracy (MiniLM embedding min cosine
0.973 -> 0.993). The same weights run either way: the choice is made where the model runs.

A caveat of one activation scale per call: an input's output depends (slightly) on the other
inputs of its batch. Digits accuracy and MiniLM's paraphrase ranking did not move; bitwise batch
invariance is lost.

Saved models hold the int8 weights themselves (``int8_state_dict``): a quarter of the float32 bytes
for every Linear, plus one float64 scale per output row.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as _DynamicLinear
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

INT8 = "int8"  # the ``quantization`` entry of config.json and the safetensors metadata
SCALE = "weight_scale"  # the per-output-channel scales saved beside each int8 weight
REDUCE_RANGE = not torch.cpu._is_vnni_supported()  # torch.ao.quantization.get_default_qconfig("onednn") asks the same


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao announces its deprecation and that of quantized tensors on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated", category=Warning)
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions .* are deprecated")
        yield


class DynamicInt8Linear(_DynamicLinear):
    """torch.ao's dynamic int8 Linear with full-range (8-bit) activations where the CPU has VNNI."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=REDUCE_RANGE)
        return y.to(x.dtype)


def is_int8(model: nn.Module) -> bool:
    """Whether ``model`` has dynamic int8 Linear layers (``quantize_int8``'s, or torch.ao's own)."""
    return any(isinstance(m, _DynamicLinear) for m in model.modules())


def quantize_int8(model: nn.Module, inplace: bool = False) -> nn.Module:
    """An int8 copy of ``model`` for CPU inference (every ``nn.Linear``); ``model`` is left as it was, unless
    ``inplace`` (its Linear layers replaced: no float copy made, for a caller that drops the float model).

    The copy keeps the model's class, ``cfg`` and methods (``encode_image``, ``encode_text``, ...), in eval mode.
    """
    if is_int8(model):
        raise ValueError("the model is already int8")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 models run on the CPU: move the model there first (model.cpu())")
    with _quiet():
        return quantize_dynamic(
            (model if inplace else copy.deepcopy(model)).eval(),
            {nn.Linear: per_channel_dynamic_qconfig},
            mapping={nn.Linear: DynamicInt8Linear},
            inplace=True,  # on our copy, or on the model when asked: quantize_dynamic would copy it (again)
        )


def _int8_layers(model: nn.Module) -> dict[str, _DynamicLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _DynamicLinear)}


def int8_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors safetensors can hold: ``NAME.weight`` int8 (out, in), ``NAME.weight_scale`` float64 (out,)
    and ``NAME.bias`` of every int8 Linear, and the model's other tensors as its ``state_dict`` has them."""
    layers = _int8_layers(model)
    state: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        weight, bias = layer._weight_bias()
        # symmetric as quantize_int8 makes them, affine as a reloaded model reports them: both with zero points 0
        per_channel = weight.qscheme() in (torch.per_channel_symmetric, torch.per_channel_affine)
        if not per_channel or weight.q_per_channel_zero_points().any():
            raise ValueError(f"{name}: expected symmetric per-channel int8 weights (quantize_int8 makes them)")
        state[f"{name}.weight"] = weight.int_repr()
        state[f"{name}.{SCALE}"] = weight.q_per_channel_scales()
        if bias is not None:
            state[f"{name}.bias"] = bias.detach()
    for key, value in model.state_dict().items():
        if not any(key.startswith(f"{name}.") for name in layers):
            state[key] = value.detach()
    return {k: v.contiguous().cpu() for k, v in state.items()}


def load_int8_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """The int8 model whose ``int8_state_dict`` is ``state``, built on ``model`` (its float twin, from the config).

    Strict: every tensor of ``state`` is used and every one the model needs is there. The int8
    weights and scales are restored exactly, not re-quantized.
    """
    state = dict(state)
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    int8 = {name: (state.pop(f"{name}.weight"), state.pop(f"{name}.{SCALE}")) for name in linears
            if f"{name}.{SCALE}" in state}  # fmt: skip
    if set(int8) != set(linears):
        missing = sorted(set(linears) - set(int8))
        raise ValueError(f"an int8 checkpoint without the int8 weights of {missing[:4]}")
    biases = {name: state.pop(f"{name}.bias") for name in linears if f"{name}.bias" in state}
    float_keys = {k for k in model.state_dict() if not any(k.startswith(f"{name}.") for name in linears)}
    if set(state) != float_keys:
        unexpected, missing = sorted(set(state) - float_keys)[:4], sorted(float_keys - set(state))[:4]
        raise ValueError(f"int8 checkpoint keys do not fit the model: unexpected {unexpected}, missing {missing}")
    model.load_state_dict(state, strict=False)
    model = quantize_int8(model)
    layers = _int8_layers(model)
    with _quiet():
        for name, (weight, scale) in int8.items():
            zero = torch.zeros(len(scale), dtype=torch.long)
            qweight = torch._make_per_channel_quantized_tensor(weight, scale.double(), zero, 0)
            layers[name].set_weight_bias(qweight, biases.get(name))
    return model
