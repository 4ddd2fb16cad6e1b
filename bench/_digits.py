"""scikit-learn's digits (shipped with it: nothing is downloaded) as a small training task.

A fixed 75/25 split, and a loop that trains a model with Adam for a number of steps and returns
its test accuracy; the same seed gives the same initial weights, batches and result.
"""
from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def digits_split(seed: int = 0):
    """(x_train, y_train, x_test, y_test): x float32 [n, 64] in [0, 1], y int64; 75/25, stratified."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # noqa: E731
    return as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Percent of x that model classifies as y."""
    with torch.no_grad():
        return 100.0 * (model(x).argmax(dim=1) == y).sum().item() / len(y)


def train_digits(make_model, steps: int, *, seed: int = 0, batch: int = 64, lr: float = 2e-3) -> float:
    """Test accuracy (%) of make_model() after `steps` Adam steps on shuffled training batches;
    the model, the batches and the stochastic rounding all follow torch.manual_seed(seed)."""
    x_train, y_train, x_test, y_test = digits_split()
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.randperm(len(x_train))
    for step in range(steps):
        idx = order[(torch.arange(batch) + step * batch) % len(x_train)]
        loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return accuracy(model, x_test, y_test)
