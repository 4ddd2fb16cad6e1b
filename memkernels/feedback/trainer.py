"""Training by random feedback: BP, FA, DFA and MEM-DFA behind one ``Trainer.step(x, y)``.

A model is a chain of blocks, as in MEM-DFA (Wiktor et al. 2020, arXiv 2012.11745): a weight layer
(Linear or Conv2d) and the weight-free layers after it (activation, norm, pooling, dropout,
flatten). Block l computes a_l = W_l x_l and h_l = post_l(a_l); the last block's h is the model's
output, and the loss's gradient with respect to the last a is the output error e.

- "bp": backpropagation.
- "fa": backpropagation where each weight layer sends grad_out @ B_l, not grad_out @ W_l, to its
  input (memkernels.feedback.layers; B_l of W_l's shape, layer = l).
- "dfa" (Nøkland 2016): every block's graph is kept through one forward; the last block gets e by
  backprop, every other block l gets dL/dh_l := e B_l (B_l: (K, numel of h_l per sample), uniform in
  [-scale, scale], default scale 1 / sqrt(K)), backpropagated through post_l only, which gives
  delta_l = (e B_l) * f'(a_l) for an elementwise activation and whatever any other weight-free layer
  gives; the weight gradient is delta_l^T x_l. One optimizer step at the end.
- "memdfa": the same updates with activation memory constant in depth. Pass 1 runs the forward
  without keeping anything and computes e; pass 2 restores the RNG state (so dropout draws the same
  masks), runs the forward again block by block, keeping only the current block's graph, and
  applies that block's update at once (optimizer.step with only its gradients set), after its
  output was computed with the old weights, so every update equals DFA's.

B_l is never stored: memkernels.ops.feedback_project generates it from Philox keyed by (seed, l).
When post_l is a single ReLU, Tanh, Sigmoid, SiLU or GELU, MEM-DFA takes the fused path: the
activation op gives f'(a_l) and one kernel computes delta_l = (e B_l) * f'(a_l).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch
from torch import nn

from memkernels import ops
from memkernels.activations.spec import Activation
from memkernels.feedback.layers import FAConv2d, FALinear, check_key, check_scale, fa_conv2d_forward, fa_linear

RULES = ("bp", "fa", "dfa", "memdfa")
WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)


def _fused_activation(module: nn.Module) -> Activation | None:
    """The id of an activation whose f' the fused path keeps; None for any other layer."""
    if type(module) is nn.GELU:
        return Activation.GELU if module.approximate == "none" else Activation.GELU_TANH
    return {nn.ReLU: Activation.RELU, nn.Tanh: Activation.TANH, nn.Sigmoid: Activation.SIGMOID,
            nn.SiLU: Activation.SILU}.get(type(module))


@dataclasses.dataclass
class Block:
    """A weight layer and the weight-free layers after it: ``h = post(weight(x))``."""

    weight: nn.Linear | nn.Conv2d
    post: nn.Sequential

    def linear_part(self, x: torch.Tensor, rule: str, seed: int, layer: int) -> torch.Tensor:
        """a = weight(x); under "fa" with B of (seed, layer) in its backward, except for FALinear and
        FAConv2d, which keep their own seed and layer."""
        w = self.weight
        if rule != "fa" or isinstance(w, (FALinear, FAConv2d)):
            return w(x)
        if type(w) is nn.Linear:
            return fa_linear(x, w.weight, w.bias, seed, layer)
        return fa_conv2d_forward(w, x, seed, layer)

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def parameters(self):
        return [*self.weight.parameters(), *self.post.parameters()]


def _chain(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """Nested nn.Sequential (subclasses too) flattened into one list of layers."""
    out = []
    for m in modules:
        if isinstance(m, nn.Sequential) and type(m).forward is not nn.Sequential.forward:
            # Flattened, its own forward would be lost: the trainer would train another model.
            raise ValueError(f"{type(m).__name__} subclasses nn.Sequential with its own forward; the trainer "
                             "runs a chain of layers, so give it as a plain chain")
        out += _chain(list(m.children())) if isinstance(m, nn.Sequential) else [m]
    return out


# Layers with parameters that a block may hold after its weight layer: DFA trains them by the
# gradient through the block's own layers, as MEM-DFA's blocks train a norm's affine parameters.
POST_LAYERS_WITH_PARAMETERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.PReLU)


def _check_weight_free(module: nn.Module, where: str) -> None:
    if any(isinstance(m, WEIGHT_LAYERS) for m in module.modules()):
        raise ValueError(f"{where}: {type(module).__name__} holds a Linear or Conv2d inside; a block is a "
                         "chain: one weight layer, then weight-free layers (give the model as nested "
                         "nn.Sequential or as a list of blocks)")
    for m in module.modules():
        if not isinstance(m, POST_LAYERS_WITH_PARAMETERS) and any(True for _ in m.parameters(recurse=False)):
            raise ValueError(f"{where}: {type(m).__name__} has parameters but is not a Linear, Conv2d, norm "
                             "or PReLU layer; its weights would be trained by backprop inside a block")


def split_blocks(model: nn.Module | Sequence[nn.Module]) -> tuple[nn.Sequential, list[Block]]:
    """(prefix, blocks) of an nn.Sequential (nested ones flattened) or of a list of blocks.

    Each block starts at a Linear or Conv2d and takes the layers up to the next one. The prefix is
    the parameter-free layers before the first weight layer (e.g. Flatten); it runs without grad.
    In a list, each item is one block: a Linear/Conv2d or a Sequential that starts with one (only
    the first item may have a prefix).
    """
    if isinstance(model, nn.Sequential):
        groups = [_chain([model])]
        where = "model"
    elif isinstance(model, (list, tuple, nn.ModuleList)):
        groups = [_chain([m]) for m in model]
        where = "blocks"
    else:
        raise TypeError(f"model must be an nn.Sequential or a list of blocks, got {type(model).__name__}")
    if not groups:
        raise ValueError("blocks is empty")
    prefix, blocks = [], []
    for i, layers in enumerate(groups):
        starts = [j for j, m in enumerate(layers) if isinstance(m, WEIGHT_LAYERS)]
        if not starts:
            raise ValueError(f"{where}[{i}] has no Linear or Conv2d" if where == "blocks"
                             else "model has no Linear or Conv2d")
        if where == "blocks" and (len(starts) != 1 or (starts[0] != 0 and i > 0)):
            raise ValueError(f"blocks[{i}] must start with its one Linear or Conv2d, got "
                             f"{[type(m).__name__ for m in layers]}")
        if i == 0:
            prefix = layers[:starts[0]]
        ends = starts[1:] + [len(layers)]
        for start, end in zip(starts, ends):
            for j in range(start + 1, end):
                _check_weight_free(layers[j], f"{where}[{i}]" if where == "blocks" else f"layer {j}")
            blocks.append(Block(layers[start], nn.Sequential(*layers[start + 1:end])))
    for m in prefix:
        if any(True for _ in m.parameters()):
            raise ValueError(f"{type(m).__name__} comes before the first weight layer and has parameters; "
                             "the layers before the first Linear/Conv2d must be parameter-free")
    return nn.Sequential(*prefix), blocks


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class Trainer:
    """One training step of `model` by `rule` ("bp", "fa", "dfa", "memdfa").

        trainer = mk.feedback.Trainer(model, rule="memdfa", loss=F.cross_entropy, optimizer=opt, seed=0)
        loss = trainer.step(x, y)       # the loss of the forward before the update (a detached tensor)

    `model`: an nn.Sequential or a list of blocks (see split_blocks); `loss(output, y)` a scalar;
    `optimizer` over the model's parameters (MEM-DFA calls its step once a block, with only that
    block's gradients set; every parameter is stepped once a training step). `seed` names every
    B_l; `scale` bounds DFA's B_l entries (default 1 / sqrt(K), K the size of e per sample); FA's
    B_l are scaled like W_l's initialisation. Every rule trains the model's own forward: "fa" takes
    nn.Linear, nn.Conv2d (any padding), FALinear and FAConv2d (these with their own seed and layer),
    and rejects other weight layers, whose forward it cannot reproduce with B in its backward.
    MEM-DFA restores the model's buffers after pass 1, so BatchNorm's running statistics are updated
    once, as by DFA. Blocks with no parameter that requires grad are not trained; e is still computed.
    After a step bp, fa and dfa leave its gradients in p.grad; MEM-DFA frees each block's after its
    update (never all at once) and leaves every p.grad None.
    """

    def __init__(self, model: nn.Module | Sequence[nn.Module], rule: str, loss: Callable, optimizer, seed: int = 0,
                 scale: float | None = None):
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        seed = check_key(seed, 0)[0]
        if not callable(loss):
            raise TypeError(f"loss must be callable, got {type(loss).__name__}")
        if not (callable(getattr(optimizer, "step", None)) and callable(getattr(optimizer, "zero_grad", None))):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.prefix, self.blocks = split_blocks(model)
        if rule == "fa":
            for i, block in enumerate(self.blocks):
                if not isinstance(block.weight, (FALinear, FAConv2d)) and type(block.weight) not in WEIGHT_LAYERS:
                    w = type(block.weight)
                    raise ValueError(f"rule 'fa' cannot train block {i}'s {w.__module__}.{w.__qualname__}: it "
                                     "takes nn.Linear, nn.Conv2d, FALinear and FAConv2d, whose forward it "
                                     "reproduces with B in the backward")
        self.model = model if isinstance(model, nn.Module) else nn.ModuleList(model)
        self.rule, self.loss, self.optimizer, self.seed, self.scale = rule, loss, optimizer, seed, check_scale(scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output (the forward every rule trains)."""
        h = self.prefix(x)
        for block in self.blocks:
            h = block.post(block.weight(h))
        return h

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"_step_{self.rule}")(x, y)

    # ---- the rules ----

    def _step_bp(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(self(x), y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _step_fa(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        h = self.prefix(x)
        for layer, block in enumerate(self.blocks):
            h = block.post(block.linear_part(h, "fa", self.seed, layer))
        loss = self._loss(h, y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _step_dfa(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            h = self.prefix(x)
        pending = []
        for block in self.blocks[:-1]:
            h, kept = self._block_forward(block, h, fused=False)
            pending.append(kept)
        loss, e = self._output_error(self.blocks[-1], h, y)
        for layer, kept in enumerate(pending):
            self._block_backward(layer, kept, e)
        self.optimizer.step()
        return loss

    def _step_memdfa(self, x, y):
        rng = _rng_state(x.device)
        buffers = [b.clone() for b in self.model.buffers()]  # BatchNorm's statistics: pass 2 alone updates them
        with torch.no_grad():  # pass 1: the output error, keeping nothing
            h = self._forward_hidden(x)
        _, e = self._output_error(self.blocks[-1], h, y, update=False)
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), buffers):
                b.copy_(saved)
        _set_rng_state(rng, x.device)  # pass 2 draws pass 1's dropout masks again
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            h = self.prefix(x)
        for layer, block in enumerate(self.blocks[:-1]):  # pass 2: one block's graph at a time
            h, kept = self._block_forward(block, h, fused=True)
            self._block_backward(layer, kept, e)
            del kept
            self._apply(block)  # after h was computed with the old weights: DFA's update
        loss, _ = self._output_error(self.blocks[-1], h, y)
        self._apply(self.blocks[-1])
        return loss

    # ---- pieces ----

    def _loss(self, output: torch.Tensor, y) -> torch.Tensor:
        loss = self.loss(output, y)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss(output, y) must return a scalar tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss(output, y) must return a scalar tensor, got shape {tuple(loss.shape)}")
        return loss

    def _forward_hidden(self, x):
        """The input of the last block, without grad."""
        h = self.prefix(x)
        for block in self.blocks[:-1]:
            h = block.post(block.weight(h))
        return h

    def _block_forward(self, block: Block, x: torch.Tensor, fused: bool):
        """(h, pending) of a hidden block: h detached for the next block; pending what _block_backward
        needs: (h with its graph, None), or with `fused` where post is a lone activation, (a with its
        graph, f'(a)) from the activation op, with no graph through the activation. DFA does not
        fuse: holding a and f'(a) of every block until e is known would keep more than autograd
        keeps through the activation (its output, which is the next block's saved input). pending is
        None where the block has nothing to train."""
        if not block.trainable:
            with torch.no_grad():
                return block.post(block.weight(x)), None
        a = block.weight(x)
        act = _fused_activation(block.post[0]) if fused and len(block.post) == 1 else None
        if act is None:
            h = block.post(a)
            return h.detach(), (h, None)
        h, derivative = ops.activation_forward(a.detach(), int(act), 0.0, 0.0, 0, None)
        return h, (a, derivative)

    def _block_backward(self, layer: int, pending, e: torch.Tensor) -> None:
        """Gradients of hidden block `layer` from dL/dh := e B_l."""
        if pending is None:
            return
        root, derivative = pending
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(max(1, e.shape[1]))
        if derivative is not None:  # fused: delta = (e B) * f'(a) in one kernel
            derivative = derivative.reshape(len(e), -1)
        grad = ops.feedback_project(e, self.seed, layer, math.prod(root.shape[1:]), scale, derivative)
        root.backward(grad.view_as(root))

    def _output_error(self, block: Block, x: torch.Tensor, y, update: bool = True):
        """(loss, e (N, K)) of the last block on input x; with `update` its parameter gradients too."""
        with torch.set_grad_enabled(update):
            a = block.weight(x)
        with torch.enable_grad():
            if a.requires_grad:
                a.retain_grad()
            else:  # pass 1, or a frozen weight layer: e is needed all the same
                a.requires_grad_()
            loss = self._loss(block.post(a), y)
            if update:
                loss.backward()
                e = a.grad
            else:
                (e,) = torch.autograd.grad(loss, a)
        return loss.detach(), e.reshape(len(e), -1)

    def _apply(self, block: Block) -> None:
        """Step the optimizer on this block's gradients alone, then drop them."""
        self.optimizer.step()
        for p in block.parameters():
            p.grad = None
