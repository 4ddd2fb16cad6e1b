"""Linear and Conv2d layers that keep a compressed copy of their input for backward.

A Linear keeps its input x to compute the weight gradient ``grad_out^T @ x``; the input gradient
needs only W. ``save`` chooses what is kept instead of x:

- ``None``: x itself (torch's layer, exactly).
- ``"asa"``: the auxiliary sign activation learning rule of Woo & Jeon (ICLR 2023). Forward
  computes ``W (x + eps * s(x)) + b`` with s(x) = +1 / -1 for x > 0 / otherwise, or 1 / 0 when the
  input is non-negative (after a ReLU); only [x > 0] is kept, 1 bit an element. Backward computes
  the weight gradient from s(x) (the auxiliary activation scaled back by 1/eps) and the input
  gradient from W. This is a different learning rule, not an approximation of backprop: the
  forward output itself moves by ``eps * W s(x)`` and the weight update follows the sign pattern.
- ``"int8"``, ``"int4"``, ``"int2"``: x coded per group of ``group_size`` consecutive features of a
  row with a bfloat16 (min, scale) per group and stochastic rounding (Philox noise from a seed
  drawn from torch's default generator), so the dequantized x, and the weight gradient, are
  unbiased; the forward output and the input gradient are exact. The weight gradient dequantizes
  tile by tile inside the GEMM, never the whole of x.

Bits kept per input element: 1 for asa; k + 32 / group_size for intk (2.125 for int2 at the
default group size 256), against 16 for torch in bfloat16. Linear codes its input as
[prod(leading dims), in_features]; Conv2d as [N, C * H * W] (groups run across channels when
H * W < group_size). A group holding NaN or +-Inf dequantizes to NaN.
"""
from memkernels.compress.coded_input import MODES, conv2d, linear

__all__ = ["MODES", "linear", "conv2d"]
