"""torch.autocast's cast of a linear or convolution's inputs, for autograd functions that wrap one."""
from __future__ import annotations

import torch

# The device types autocast exists for, asked once: torch 2.11's compile cannot trace
# is_autocast_available (meta, a deferred init or a shape check, has no autocast, and
# is_autocast_enabled raises there).
_AUTOCAST_DEVICE_TYPES = frozenset(
    d for d in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "maia", torch._C._get_privateuse1_backend_name())
    if torch.amp.is_autocast_available(d))


def autocast_inputs(*tensors):
    """The tensors (None allowed) cast as autocast casts F.linear / F.conv2d's inputs where it is on
    for the first one's device: floating tensors other than float64 to the autocast dtype. An
    autograd function given these runs forward and backward in that one dtype, wherever its
    backward runs."""
    device_type = tensors[0].device.type
    if device_type not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)
