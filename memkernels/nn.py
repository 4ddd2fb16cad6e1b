"""Drop-in modules for torch.nn's activations, Linear and Conv2d.

Activations take torch's constructor arguments plus ``bits``: ``bits=None`` is exact and keeps one
tensor of the input's size and dtype (f'(x), x or y: see memkernels.functional); ``bits`` in
{1, 2, 3, 4, 8} keeps a packed code of that many bits an element. They hold no parameters or buffers, so swapping them into a model
leaves its state_dict unchanged.

Linear and Conv2d are torch.nn.Linear / Conv2d (same parameters, same state_dict keys) plus
``save``: what they keep of their input for backward (see memkernels.compress).
"""
from __future__ import annotations

import torch
from torch import nn

from memkernels import functional as F
from memkernels.activations.spec import check_bits, check_param
from memkernels.compress import coded_input

__all__ = ["GELU", "SiLU", "Mish", "Softplus", "ELU", "SELU", "CELU", "LeakyReLU", "ReLU",
           "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "SwiGLU", "GeGLU", "GatedMLP", "Linear",
           "TransposedLinear", "Conv2d", "FALinear", "FAConv2d"]


class _FusedActivation(nn.Module):
    """Shared ``bits`` handling and repr; ``_args`` names the torch arguments shown in repr."""

    _args: tuple[str, ...] = ()

    def __init__(self, bits: int | None = None):
        super().__init__()
        check_bits(bits)
        self.bits = bits

    def extra_repr(self) -> str:
        args = [f"{name}={getattr(self, name)!r}" for name in self._args]
        return ", ".join(args + [f"bits={self.bits}"])


class GELU(_FusedActivation):
    _args = ("approximate",)

    def __init__(self, approximate: str = "none", bits: int | None = None):
        super().__init__(bits)
        F._gelu_id(approximate)  # validate now, not at the first call
        self.approximate = approximate

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.gelu(input, self.approximate, bits=self.bits)


class _InplaceActivation(_FusedActivation):
    """Activations whose torch twin takes ``inplace``; kept for compatibility (see functional)."""

    def __init__(self, inplace: bool = False, bits: int | None = None):
        super().__init__(bits)
        self.inplace = inplace

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, inplace=True" if self.inplace else super().extra_repr()


class SiLU(_InplaceActivation):
    def forward(self, input):
        return F.silu(input, bits=self.bits)


class Mish(_InplaceActivation):
    def forward(self, input):
        return F.mish(input, bits=self.bits)


class SELU(_InplaceActivation):
    def forward(self, input):
        return F.selu(input, bits=self.bits)


class ReLU(_InplaceActivation):
    def forward(self, input):
        return F.relu(input, bits=self.bits)


class Hardswish(_InplaceActivation):
    def forward(self, input):
        return F.hardswish(input, bits=self.bits)


class Hardsigmoid(_InplaceActivation):
    def forward(self, input):
        return F.hardsigmoid(input, bits=self.bits)


class Sigmoid(_FusedActivation):
    def forward(self, input):
        return F.sigmoid(input, bits=self.bits)


class Tanh(_FusedActivation):
    def forward(self, input):
        return F.tanh(input, bits=self.bits)


class Softplus(_FusedActivation):
    _args = ("beta", "threshold")

    def __init__(self, beta: float = 1.0, threshold: float = 20.0, bits: int | None = None):
        super().__init__(bits)
        check_param("beta", beta)
        check_param("threshold", threshold)
        self.beta, self.threshold = beta, threshold

    def forward(self, input):
        return F.softplus(input, self.beta, self.threshold, bits=self.bits)


class ELU(_InplaceActivation):
    _args = ("alpha",)

    def __init__(self, alpha: float = 1.0, inplace: bool = False, bits: int | None = None):
        super().__init__(inplace, bits)
        check_param("alpha", alpha)
        self.alpha = alpha

    def forward(self, input):
        return F.elu(input, self.alpha, bits=self.bits)


class CELU(ELU):
    def forward(self, input):
        return F.celu(input, self.alpha, bits=self.bits)


class LeakyReLU(_InplaceActivation):
    _args = ("negative_slope",)

    def __init__(self, negative_slope: float = 0.01, inplace: bool = False, bits: int | None = None):
        super().__init__(inplace, bits)
        check_param("negative_slope", negative_slope)
        self.negative_slope = negative_slope

    def forward(self, input):
        return F.leaky_relu(input, self.negative_slope, bits=self.bits)


class _GLU(_FusedActivation):
    """Gated unit f(a) * b. Called with one tensor x, it splits x along ``dim`` into halves
    ``a, b = x.chunk(2, dim)`` (the first half is gated: f applies to it); called with two
    tensors, they are a and b. Input (..., 2H) -> output (..., H) for dim=-1."""

    _args = ("dim",)

    def __init__(self, dim: int = -1, bits: int | None = None):
        super().__init__(bits)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int, got {type(dim).__name__} {dim!r}")
        self.dim = dim

    def _halves(self, a, b):
        if b is not None:
            return a, b
        if not -a.dim() <= self.dim < a.dim():
            raise ValueError(f"{type(self).__name__} splits dim {self.dim} in two halves; the input has "
                             f"{a.dim()} dims (shape {tuple(a.shape)})")
        if a.shape[self.dim] % 2:
            raise ValueError(f"{type(self).__name__} splits dim {self.dim} in two halves; its size "
                             f"must be even, got {a.shape[self.dim]}")
        return a.chunk(2, self.dim)


class SwiGLU(_GLU):
    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return F.swiglu(*self._halves(a, b), bits=self.bits)


class GeGLU(_GLU):
    _args = ("approximate", "dim")

    def __init__(self, approximate: str = "none", dim: int = -1, bits: int | None = None):
        super().__init__(dim, bits)
        F._gelu_id(approximate)
        self.approximate = approximate

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return F.geglu(*self._halves(a, b), self.approximate, bits=self.bits)


class GatedMLP(nn.Module):
    """down_proj(f(gate_proj(x)) * up_proj(x)) with f(a) * b fused (:func:`F.swiglu` for f = SiLU,
    :func:`F.geglu` for GELU): the MLP of Llama, Mistral, Qwen, Gemma and most transformers
    decoders, for which mk.convert swaps it. The three projections are any modules (nn.Linear,
    mk.nn.Linear, ...) held under the names they have there, so the state_dict keys do not change.

    For backward the product keeps what the gated unit keeps, (gate, up) or (code of gate, up),
    where an activation module followed by a multiplication keeps f's f'(gate) or code and both
    factors of the product. activation: "silu" or "gelu" (with ``approximate``, as nn.GELU's).
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, activation: str = "silu",
                 approximate: str = "none", bits: int | None = None):
        super().__init__()
        if activation not in ("silu", "gelu"):
            raise ValueError(f"activation must be 'silu' or 'gelu', got {activation!r}")
        F._gelu_id(approximate)
        check_bits(bits)
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.activation, self.approximate, self.bits = activation, approximate, bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.gate_proj(x), self.up_proj(x)
        if self.activation == "silu":
            return self.down_proj(F.swiglu(a, b, bits=self.bits))
        return self.down_proj(F.geglu(a, b, self.approximate, bits=self.bits))

    def extra_repr(self) -> str:
        gelu = f", approximate={self.approximate!r}" if self.activation == "gelu" else ""
        return f"activation={self.activation!r}{gelu}, bits={self.bits}"


class _CodedInput:
    """``save`` and its arguments, shared by Linear and Conv2d (see memkernels.compress)."""

    def _set_save(self, save, eps, nonnegative, group_size):
        coded_input.check_save(save, eps, nonnegative, group_size)
        self.save, self.eps, self.nonnegative, self.group_size = save, eps, nonnegative, group_size

    def _save_args(self) -> dict:
        return {"save": self.save, "eps": self.eps, "nonnegative": self.nonnegative, "group_size": self.group_size}

    def _save_repr(self) -> str:
        if self.save is None:
            return "save=None"
        if self.save == "asa":
            return f"save='asa', eps={self.eps}, nonnegative={self.nonnegative}"
        return f"save={self.save!r}, group_size={self.group_size}"

    @classmethod
    def from_torch(cls, module: nn.Module, save: str | None, **kwargs):
        """A twin of torch layer ``module`` holding the same Parameter objects (so an optimizer
        built on ``module`` keeps updating them), with ``save``."""
        if not isinstance(module, cls._torch_class):
            raise TypeError(f"{cls.__name__}.from_torch: module must be an nn.{cls._torch_class.__name__}, "
                            f"got {type(module).__name__}")
        new = cls._empty_like(module, save, **kwargs)
        new.weight, new.bias = module.weight, module.bias
        return new


class Linear(_CodedInput, nn.Linear):
    """torch.nn.Linear that keeps ``save``'s code of its input for backward.

    save: None (torch's Linear) | "asa" | "int8" | "int4" | "int2". eps, nonnegative (None: detect
    with one reduction a call; give it to skip that) apply to "asa", group_size (a multiple of 8)
    to "intk". Input (..., in_features).
    """

    _torch_class = nn.Linear  # what from_torch takes

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 save: str | None = None, eps: float = 0.01, nonnegative: bool | None = None,
                 group_size: int = 256):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._set_save(save, eps, nonnegative, group_size)

    @classmethod
    def _empty_like(cls, module, save, **kwargs):
        return cls(module.in_features, module.out_features, module.bias is not None, device="meta", save=save,
                   **kwargs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return coded_input.linear(input, self.weight, self.bias, **self._save_args())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._save_repr()}"


class TransposedLinear(_CodedInput, nn.Module):
    """y = input @ weight + bias with weight (in_features, out_features): the layout of
    transformers' Conv1D (GPT-2's projections), whose state_dict it shares; keeps ``save``'s code
    of its input for backward, as :class:`Linear`. mk.convert(..., linear=...) puts one in place of
    each Conv1D. Input (..., in_features); initialised as Conv1D (weight N(0, 0.02^2), bias 0).
    """

    _torch_class = nn.Module  # transformers' Conv1D (transformers is optional: not imported here)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 save: str | None = None, eps: float = 0.01, nonnegative: bool | None = None,
                 group_size: int = 256):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features, device=device, dtype=dtype))
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
                                if bias else None)
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=0.02)
        self._set_save(save, eps, nonnegative, group_size)

    @classmethod
    def _empty_like(cls, module, save, **kwargs):
        in_features, out_features = module.weight.shape
        return cls(in_features, out_features, module.bias is not None, device="meta", save=save, **kwargs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return coded_input.linear(input, self.weight.t(), self.bias, **self._save_args())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._save_repr()}")


class Conv2d(_CodedInput, nn.Conv2d):
    """torch.nn.Conv2d that keeps ``save``'s code of its input for backward; arguments as
    torch.nn.Conv2d's plus those of :class:`Linear`. The input is coded as [N, C * H * W] after
    any padding other than the convolution's own zeros has been applied to it: padding_mode
    reflect / replicate / circular."""

    _torch_class = nn.Conv2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 save: str | None = None, eps: float = 0.01, nonnegative: bool | None = None,
                 group_size: int = 256):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._set_save(save, eps, nonnegative, group_size)

    @classmethod
    def _empty_like(cls, module, save, **kwargs):
        return cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                   module.dilation, module.groups, module.bias is not None, module.padding_mode,
                   device="meta", save=save, **kwargs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.save is None:
            return super().forward(input)
        padding, crop = self.padding, None
        if self.padding_mode != "zeros":  # as nn.Conv2d._conv_forward: pad explicitly, then none
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, self.padding_mode)
            padding = 0
        elif isinstance(padding, str):
            # 'same' / 'valid' as integer padding, by the larger of each side's two amounts. 'same'
            # with an even kernel pads right / bottom one more than left / top: padded both sides
            # alike, the output has one row / column too many at the start, cropped. Padding the
            # input explicitly instead would code those zeros, and asa add eps * s(0) to them.
            left, right, top, bottom = self._reversed_padding_repeated_twice
            padding = (bottom, right)
            if (right, bottom) != (left, top):
                crop = (bottom - top, right - left)
        y = coded_input.conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                               **self._save_args())
        if crop is None:
            return y
        return y[..., crop[0]:, crop[1]:].clone(memory_format=torch.preserve_format)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._save_repr()}"


from memkernels.feedback.layers import FAConv2d, FALinear  # noqa: E402,F401  (random feedback layers)
