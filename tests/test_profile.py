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


def test_peak_memory_runs_the_backward_of_nested_outputs():
    x = torch.randn(1 << 16, requires_grad=True)
    flat = mk.profile.peak_memory(lambda t: t * 2, x)
    assert mk.profile.peak_memory(lambda t: {"y": [t * 2], "n": 1}, x) == pytest.approx(flat, abs=64)


def test_peak_memory_names_the_devices_it_measures():
    with pytest.raises(NotImplementedError, match="peak_memory measures cpu and cuda, not meta"):
        mk.profile.peak_memory(lambda t: t * 2, torch.empty(4, device="meta"))


def test_peak_memory_drops_only_the_profilers_log_lines(capfd):
    """On CPU the profiler's C++ side logs its start and stop to stderr (torch 2.13: two lines a
    call); peak_memory drops those lines and passes on everything else written there."""
    import os
    import sys

    def fn(x):
        os.write(2, b"USDT:2026-11-24 03:58:33 7644:7644 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        print("the user's line", file=sys.stderr)
        return x * 2

    assert mk.profile.peak_memory(fn, torch.ones(256, requires_grad=True)) > 0
    err = capfd.readouterr().err
    assert "the user's line" in err and "profiler_start" not in err and "USDT" not in err


@pytest.mark.parametrize("measure", [mk.profile.saved_bytes, mk.profile.peak_memory, mk.profile.peak_saved_bytes])
@pytest.mark.parametrize("fn", [3, None, "gelu"])
def test_profile_needs_a_callable(measure, fn):
    with pytest.raises(TypeError, match=rf"^fn must be callable .*got {type(fn).__name__}$"):
        measure(fn, torch.randn(4, requires_grad=True))
