"""Convert a small model's activations to memkernels' fused ones and train it a few steps.

Prints the bytes autograd keeps for backward before and after `mk.convert`, and the loss of both
models as they train on scikit-learn's digits (shipped with the package: nothing is downloaded).
"""
import argparse
import copy

import torch
from sklearn.datasets import load_digits
from torch import nn

import memkernels as mk


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hidden), nn.GELU(),
        nn.Linear(hidden, hidden), nn.SiLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, 10))


def train(model, x, y, steps, lr=2e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        idx = torch.arange(step * 128, step * 128 + 128) % len(x)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    baseline = make_model(args.hidden)
    fused, report = mk.convert(copy.deepcopy(baseline), bits=args.bits, return_report=True)
    print(report)

    batch = x[:128]
    kept_before = mk.profile.saved_bytes(baseline, batch)
    kept_after = mk.profile.saved_bytes(fused, batch)
    print(f"bytes kept for backward, batch of 128: torch {kept_before:,}  memkernels (bits={args.bits}) "
          f"{kept_after:,}  ({kept_before / kept_after:.2f}x less)")

    torch_losses = train(baseline, x, y, args.steps)
    fused_losses = train(fused, x, y, args.steps)
    for step in range(0, args.steps, max(1, args.steps // 6)):
        print(f"step {step:3d}  loss torch {torch_losses[step]:.4f}  memkernels {fused_losses[step]:.4f}")
    print(f"final     loss torch {torch_losses[-1]:.4f}  memkernels {fused_losses[-1]:.4f}")


if __name__ == "__main__":
    main()
