"""Memory that training keeps: bytes saved for backward, and peak bytes.

``saved_bytes`` counts, with ``torch.autograd.graph.saved_tensors_hooks``, every distinct storage
that autograd keeps for backward while ``fn(*args)`` runs, at its real size (a packed k-bit code
counts ceil(N / 8) * k bytes). Parameters are not counted: they live anyway.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

import torch
from torch import nn
from torch.utils._pytree import tree_flatten


def _parameter_storages(fn, args) -> set:
    params = []
    for obj in (fn, *args):
        if isinstance(obj, nn.Module):
            params += list(obj.parameters())
        elif isinstance(obj, nn.Parameter):
            params.append(obj)
    return {p.untyped_storage().data_ptr() for p in params}


def _check_fn(fn) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable (a function or module, called as fn(*args, **kwargs)), "
                        f"got {type(fn).__name__}")


def saved_bytes(fn, *args, **kwargs) -> int:
    """Bytes of the distinct storages autograd keeps for backward when ``fn(*args, **kwargs)``
    runs (inputs saved by an op count; parameters of ``fn`` if it is a Module, and Parameter
    arguments, do not). Views of one storage count once, at the storage's full size."""
    _check_fn(fn)
    skip = _parameter_storages(fn, args)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if not isinstance(t, nn.Parameter):
            storage = t.untyped_storage()
            if storage.data_ptr() not in skip:
                seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    del out
    return sum(seen.values())


def _run_with_backward(fn, args, kwargs, backward: bool):
    out = fn(*args, **kwargs)
    if backward:
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.requires_grad]
        if outs:
            torch.autograd.backward([o.sum() for o in outs])
    return out


def peak_memory(fn, *args, backward: bool = True, device: torch.device | str | None = None,
                **kwargs) -> int:
    """Peak bytes allocated above the level before the call while ``fn(*args, **kwargs)`` runs
    (and, with ``backward=True``, the backward of the sum of its outputs that require grad, found
    in nested tuples, lists and dicts).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the profiler's allocation events, summed in
    time order. The device is the first tensor argument's unless given.
    """
    _check_fn(fn)
    if device is None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _run_with_backward(fn, args, kwargs, backward)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        raise NotImplementedError(f"peak_memory measures cpu and cuda, not {device.type}")
    from torch.profiler import ProfilerActivity, profile
    with _without_profiler_log(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _run_with_backward(fn, args, kwargs, backward)
    # Every allocation (+bytes) and free (-bytes) in time order; prof.events() folds them into
    # their ops, so read the raw records.
    records = sorted((e for e in prof.profiler.kineto_results.events()
                      if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                     key=lambda e: e.start_ns())
    level = peak = 0
    for e in records:
        level += e.nbytes()
        peak = max(peak, level)
    return peak


# The lines the profiler's C++ side (kineto) writes to stderr each time it starts and stops, e.g.
# "USDT:2026-11-24 03:58:33 7644:7644 SyncActivityProfilerHandler.cpp:52] profiler_start".
_PROFILER_LOG_LINE = re.compile(rb"^(USDT|STAGE):\d{4}-\d\d-\d\d [\d:]+ \d+:\d+ \w+\.cpp:\d+\] ")


@contextlib.contextmanager
def _without_profiler_log():
    """Run the block with file descriptor 2 captured, then write back to it every line but the
    profiler's own start / stop log lines (one peak_memory call would print several; a checkpoint
    plan makes dozens of calls)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True)
                    if not _PROFILER_LOG_LINE.match(line)]
            if kept:
                with open(2, "wb", closefd=False) as stderr:  # a buffered write is written whole
                    stderr.write(b"".join(kept))


def peak_saved_bytes(fn, *args, **kwargs) -> int:
    """The most bytes autograd holds for backward at one moment while ``fn(*args, **kwargs)`` runs.

    A storage counts from when a tensor of it is saved until the last of its saved tensors is
    released (its graph freed by backward, or dropped), at its full size, parameters excluded as in
    saved_bytes. saved_bytes sums everything saved over the call; this is the high-water mark, which
    is what falls when a method frees one part of the graph before building the next.
    """
    _check_fn(fn)
    skip = _parameter_storages(fn, args)
    live: dict[int, list[int]] = {}  # storage pointer -> [saved tensors holding it, bytes]
    level = peak = 0

    class Saved:
        __slots__ = ("tensor", "key", "__weakref__")

        def __init__(self, tensor: torch.Tensor, key: int | None):
            self.tensor, self.key = tensor, key

        def __del__(self):
            nonlocal level
            if self.key is not None:
                entry = live[self.key]
                entry[0] -= 1
                if entry[0] == 0:
                    level -= entry[1]
                    del live[self.key]

    def pack(t: torch.Tensor):
        nonlocal level, peak
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if isinstance(t, nn.Parameter) or key in skip:
            return Saved(t, None)
        entry = live.setdefault(key, [0, 0])
        entry[0] += 1
        if storage.nbytes() > entry[1]:
            level += storage.nbytes() - entry[1]
            entry[1] = storage.nbytes()
            peak = max(peak, level)
        return Saved(t, key)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
        out = fn(*args, **kwargs)
    del out
    return peak
