"""mk.profile: bytes kept for backward and peak bytes."""
import pytest
import torch
from torch import nn

import memkernels as mk


def test_saved_bytes_counts_storages_once_and_skips_parameters():
    x = torch.randn(1000, requires_grad=True)
    assert mk.profile.saved_bytes(lambda t: t * t, x) == 4000  # x saved twice: one storage
    assert mk.profile.saved_bytes(lambda t: t.exp(), x) == 4000  # exp keeps its result
    assert mk.profile.saved_bytes(lambda t: t[:10].sin(), x) == 4000  # a view keeps its storage
    lin = nn.Linear(1000, 10)
    assert mk.profile.saved_bytes(lin, x[None]) == 4000  # the input, not the weight
    assert mk.profile.saved_bytes(lambda t: t + 1, x) == 0
    with torch.no_grad():
        assert mk.profile.saved_bytes(lambda t: t.exp(), x) == 0


def test_peak_memory(device):
    n = 1 << 20
    x = torch.randn(n, device=device, requires_grad=True)
    forward_only = mk.profile.peak_memory(lambda t: t * 2, x, backward=False)
    assert 4 * n <= forward_only <= 4 * n + 4096  # the output
    with_backward = mk.profile.peak_memory(lambda t: t * 2, x)
    assert 8 * n <= with_backward <= 8 * n + 4096  # the output and the input's gradient


def test_peak_memory_names_the_devices_it_measures():
    with pytest.raises(NotImplementedError, match="peak_memory measures cpu and cuda, not meta"):
        mk.profile.peak_memory(lambda t: t * 2, torch.empty(4, device="meta"))
