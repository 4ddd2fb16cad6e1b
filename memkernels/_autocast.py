"""torch.autocast's cast of a linear or convolution's inputs, for autograd functions that wrap one."""
from __future__ import annotations

import torch


def autocast_inputs(*tensors):
    """The tensors (None allowed) cast as autocast casts F.linear / F.conv2d's inputs where it is on
    for the first one's device: floating tensors other than float64 to the autocast dtype. An
    autograd function given these runs forward and backward in that one dtype, wherever its
    backward runs."""
    device_type = tensors[0].device.type
    # meta (a deferred init, a shape check) has no autocast: is_autocast_enabled would raise there
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)
