"""Codes of float64 inputs: values that rounding to float32 would put on the wrong side of a border."""
import math

import torch


def float64_around_borders(borders: torch.Tensor) -> torch.Tensor:
    """float64 values on and just beside each float32 border (closer than float32 can tell
    apart), tiny ones on both sides of 0, and ones beyond float32's range."""
    b = borders.double()
    return torch.cat([b, torch.nextafter(b, b + 1), torch.nextafter(b, b - 1),
                      torch.tensor([1e-50, -1e-50, 1e-300, 0.0, -0.0, 1e39, -1e39, 1e300, -1e300,
                                    math.nan, math.inf, -math.inf], dtype=torch.float64)])


def exact_codes(x: torch.Tensor, borders: torch.Tensor) -> torch.Tensor:
    """#{j : borders[j] < x} in float64 for each x, NaN -> 0: the definition, with no kernel's tricks."""
    below = (borders.double()[None, :] < x.double()[:, None]).sum(1)
    return torch.where(x.isnan(), 0, below).to(torch.uint8)
