"""Fused activations as functions, with torch.nn.functional's signatures plus ``bits``.

Each computes its torch twin's forward values (to float tolerance) and keeps for backward one
thing of the input's size: ``bits=None`` keeps, in the input's dtype, f'(x) or whichever of x and
y its f' costs least to recompute from (exact; which one, per activation, dtype and device: the
README's "Fused activations"); ``bits`` in {1, 2, 3, 4, 8} keeps a packed code of that many bits
an element whose level is the optimal piecewise-constant f' (tables in
memkernels/activations/tables.json). ``relu``, ``leaky_relu`` and ``hardsigmoid``, whose f' takes
two values, always keep 1 exact bit.

``inplace`` is accepted for signature compatibility; the result is always a new tensor (where a
code or f'(x) is kept, the input is freed when nothing else holds it).
"""
from __future__ import annotations

import torch

from memkernels.activations.autograd import activation, gated
from memkernels.activations.spec import Activation as A
from memkernels.activations.spec import check_param

__all__ = ["gelu", "silu", "mish", "softplus", "elu", "selu", "celu", "leaky_relu", "relu",
           "sigmoid", "tanh", "hardswish", "hardsigmoid", "swiglu", "geglu"]


def _gelu_id(approximate: str) -> A:
    if approximate == "none":
        return A.GELU
    if approximate == "tanh":
        return A.GELU_TANH
    raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


def gelu(input: torch.Tensor, approximate: str = "none", bits: int | None = None) -> torch.Tensor:
    return activation(input, _gelu_id(approximate), bits=bits)


def silu(input: torch.Tensor, inplace: bool = False, bits: int | None = None) -> torch.Tensor:
    return activation(input, A.SILU, bits=bits)


def mish(input: torch.Tensor, inplace: bool = False, bits: int | None = None) -> torch.Tensor:
    return activation(input, A.MISH, bits=bits)


def softplus(input: torch.Tensor, beta: float = 1.0, threshold: float = 20.0,
             bits: int | None = None) -> torch.Tensor:
    check_param("beta", beta)
    check_param("threshold", threshold)
    if beta == 0:
        raise ValueError("beta must be non-zero")
    return activation(input, A.SOFTPLUS, beta, threshold, bits=bits)


def elu(input: torch.Tensor, alpha: float = 1.0, inplace: bool = False,
        bits: int | None = None) -> torch.Tensor:
    check_param("alpha", alpha)
    return activation(input, A.ELU, alpha, bits=bits)


def selu(input: torch.Tensor, inplace: bool = False, bits: int | None = None) -> torch.Tensor:
    return activation(input, A.SELU, bits=bits)


def celu(input: torch.Tensor, alpha: float = 1.0, inplace: bool = False,
         bits: int | None = None) -> torch.Tensor:
    check_param("alpha", alpha)
    if alpha == 0:
        raise ValueError("alpha must be non-zero for celu (it divides by alpha)")
    return activation(input, A.CELU, alpha, bits=bits)


def leaky_relu(input: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False,
               bits: int | None = None) -> torch.Tensor:
    check_param("negative_slope", negative_slope)
    return activation(input, A.LEAKY_RELU, negative_slope, bits=bits)


def relu(input: torch.Tensor, inplace: bool = False, bits: int | None = None) -> torch.Tensor:
    return activation(input, A.RELU, bits=bits)


def sigmoid(input: torch.Tensor, bits: int | None = None) -> torch.Tensor:
    return activation(input, A.SIGMOID, bits=bits)


def tanh(input: torch.Tensor, bits: int | None = None) -> torch.Tensor:
    return activation(input, A.TANH, bits=bits)


def hardswish(input: torch.Tensor, inplace: bool = False, bits: int | None = None) -> torch.Tensor:
    return activation(input, A.HARDSWISH, bits=bits)


def hardsigmoid(input: torch.Tensor, inplace: bool = False, bits: int | None = None) -> torch.Tensor:
    return activation(input, A.HARDSIGMOID, bits=bits)


def swiglu(a: torch.Tensor, b: torch.Tensor, bits: int | None = None) -> torch.Tensor:
    """silu(a) * b for a, b of one shape and dtype. Keeps (a, b) when bits is None (exact), else
    b and a `bits`-bit code of a (grad_b then uses the interval mean of silu(a))."""
    return gated(a, b, A.SILU, bits)


def geglu(a: torch.Tensor, b: torch.Tensor, approximate: str = "none",
          bits: int | None = None) -> torch.Tensor:
    """gelu(a) * b; what it keeps as in :func:`swiglu`."""
    return gated(a, b, _gelu_id(approximate), bits)
