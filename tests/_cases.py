"""The activations under test: (name, mk function, torch function, kwargs, Activation id, p0, p1);
and helpers for the tests of losses straight on their output."""
import torch
import torch.nn.functional as TF

import memkernels.functional as MF
from memkernels.activations.spec import Activation as A

CASES = [
    ("gelu", MF.gelu, TF.gelu, {}, A.GELU, 0.0, 0.0),
    ("gelu_tanh", MF.gelu, TF.gelu, {"approximate": "tanh"}, A.GELU_TANH, 0.0, 0.0),
    ("silu", MF.silu, TF.silu, {}, A.SILU, 0.0, 0.0),
    ("mish", MF.mish, TF.mish, {}, A.MISH, 0.0, 0.0),
    ("softplus", MF.softplus, TF.softplus, {}, A.SOFTPLUS, 1.0, 20.0),
    ("softplus_b2_t3", MF.softplus, TF.softplus, {"beta": 2.0, "threshold": 3.0}, A.SOFTPLUS, 2.0, 3.0),
    ("elu", MF.elu, TF.elu, {}, A.ELU, 1.0, 0.0),
    ("elu_a05", MF.elu, TF.elu, {"alpha": 0.5}, A.ELU, 0.5, 0.0),
    ("selu", MF.selu, TF.selu, {}, A.SELU, 0.0, 0.0),
    ("celu_a2", MF.celu, TF.celu, {"alpha": 2.0}, A.CELU, 2.0, 0.0),
    ("leaky_relu", MF.leaky_relu, TF.leaky_relu, {}, A.LEAKY_RELU, 0.01, 0.0),
    ("leaky_relu_02", MF.leaky_relu, TF.leaky_relu, {"negative_slope": 0.2}, A.LEAKY_RELU, 0.2, 0.0),
    ("relu", MF.relu, TF.relu, {}, A.RELU, 0.0, 0.0),
    ("sigmoid", MF.sigmoid, TF.sigmoid, {}, A.SIGMOID, 0.0, 0.0),
    ("tanh", MF.tanh, TF.tanh, {}, A.TANH, 0.0, 0.0),
    ("hardswish", MF.hardswish, TF.hardswish, {}, A.HARDSWISH, 0.0, 0.0),
    ("hardsigmoid", MF.hardsigmoid, TF.hardsigmoid, {}, A.HARDSIGMOID, 0.0, 0.0),
]
IDS = [c[0] for c in CASES]

# Losses straight on an activation's output: the backward of sum hands the activation an expanded
# scalar as grad_out (every stride 0), that of mean a dense tensor of 1 / numel.
LOSSES = ("sum", "mean")


def loss_grad(loss, y):
    """The grad_out that autograd hands y's grad_fn for getattr(y, loss)(), as autograd makes it."""
    z = torch.zeros_like(y, requires_grad=True)
    (g,) = torch.autograd.grad(getattr(z, loss)(), z)
    return g


def kept_tensors(fn, *args):
    """(fn(*args), the tensors that autograd keeps for its backward, in the order kept)."""
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(*args)
    return y, kept


def kept_beyond(fn, *args):
    """Bytes of the storages that fn(*args) keeps for backward other than its arguments' and its
    output's: what it allocates to keep (f'(x), a code, a copy)."""
    y, kept = kept_tensors(fn, *args)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    for t in (*args, y):
        storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values())
