"""Checkpoint planning: peak memory against extra compute, and solver speed.

    python bench/checkpoint.py            # models on CPU, solvers on 100/1000/2500-node graphs
    python bench/checkpoint.py --quick    # smaller sweep, solvers up to 1000 nodes, no files

Part 1, for each model (an MLP chain with dropout, a ResNet-style CNN with skips, a GPT-style block
stack) and method, as the budget falls from the no-recomputation peak to the least feasible one:
predicted and measured peak (memkernels.checkpoint.measure_peak: one forward+backward, parameter
gradients excluded) and the measured step time against the unplanned model's, beside
torch.utils.checkpoint.checkpoint_sequential with sqrt(n) segments (nn.Sequential models only).
Part 2, the time of each solver on random chains and residual DAGs (skips of 2-8 nodes) of 100,
1,000 and 2,500 nodes, budget = the "sqrt" schedule's predicted peak; target < 1 s at 1,000 nodes
for "chain" and "dp-approx".

Writes bench/results/checkpoint_<device>.{csv,md,png}.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint_sequential

import _harness as H  # noqa: E402  (puts the repository root on sys.path)
import memkernels.checkpoint as ck  # noqa: E402

sys.path.insert(0, str(H.REPO_ROOT / "tests"))
from test_checkpoint_models import MODELS  # noqa: E402  (the tests' models, one definition)

MODEL_METHODS = ("chain", "dp-approx", "chen-greedy", "sqrt", "log", "all")
SOLVER_METHODS = ("chain", "dp-approx", "chen-greedy", "sqrt", "dp")


def step_times(models: dict, x, repeats: int) -> dict:
    """{name: median ms of one forward+backward step} of models taking turns call by call
    (H.time_ms_interleaved), so that the step-time ratios do not carry the machine's drift."""
    def step(model):
        return lambda: torch.autograd.backward(model(x).sum())
    timings = H.time_ms_interleaved({name: step(m) for name, m in models.items()}, torch.device("cpu"),
                                    warmup=1, repeats=repeats)
    return {name: t.median_ms for name, t in timings.items()}


class SqrtSequential(torch.nn.Module):
    """torch's own checkpoint_sequential with ceil(sqrt(n)) segments."""

    def __init__(self, model: torch.nn.Sequential):
        super().__init__()
        self.model = model
        self.segments = math.ceil(math.sqrt(len(model)))

    def forward(self, x):
        return checkpoint_sequential(self.model, self.segments, x, use_reentrant=False)


def model_rows(quick: bool, repeats: int) -> list[dict]:
    rows = []
    fractions = (1.0, 0.5, 0.0) if quick else (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)
    for name, (build, make_input) in MODELS.items():
        torch.manual_seed(0)
        model, x = build(), make_input()
        graph = ck.trace(model, x)
        # Every row's model (the unplanned one, torch's checkpoint_sequential, each plan) is timed
        # after the plans are made, all taking turns: row["timed"] names its entry in `models`.
        models = {"eager": model}
        entries = [dict(part="model", model=name, method="eager", nodes=len(graph), budget=None,
                              predicted=None, measured=ck.measure_peak(model, x), timed="eager")]
        if isinstance(model, torch.nn.Sequential):
            models["sqrt_sequential"] = SqrtSequential(model)
            entries.append(dict(part="model", model=name, method="torch checkpoint_sequential sqrt(n)",
                                      nodes=len(graph), budget=None, predicted=None,
                                      measured=ck.measure_peak(models["sqrt_sequential"], x),
                                      timed="sqrt_sequential"))
        high = ck.solve(graph, None, "none").predicted_peak
        for method in MODEL_METHODS:
            low = ck.least_budget(graph, method)
            budgets = sorted({int(low + f * (high - low)) for f in fractions}, reverse=True)
            if method in ck.solvers.BUDGET_BLIND:
                budgets = [None]
            for budget in budgets:
                row = dict(part="model", model=name, method=method, nodes=len(graph), budget=budget)
                try:
                    plan = ck.plan(model, x, budget, method, graph=graph)
                except ck.InfeasibleBudget as error:
                    entries.append({**row, "error": H.error_summary(error)})
                    continue
                timed = f"{method} {budget}"
                models[timed] = ck.apply(model, plan)
                entries.append({**row, "predicted": plan.predicted_peak, "measured": plan.measured_peak,
                                      "timed": timed,
                                      "predicted_extra": plan.extra_time / sum(n.time for n in graph.nodes)})
        times = step_times(models, x, repeats)
        for row in entries:
            timed = row.pop("timed", None)
            if timed is not None:
                row.update(step_ms=times[timed], extra=times[timed] / times["eager"] - 1)
        rows += entries
    return rows


def random_graph(n: int, dag: bool, seed: int = 0) -> ck.Graph:
    rng = random.Random(seed)
    nodes = [ck.Node(str(v), rng.uniform(1e-4, 1e-3), rng.choice([1, 2, 4]) * 2**20,
                     kept_bytes=rng.choice([0, 2**20]),
                     saved_by=rng.choice([(), (v,), (v + 1,)]) if v + 1 < n else (),
                     is_output=v == n - 1) for v in range(n)]
    edges = [(v - 1, v) for v in range(1, n)]
    if dag:
        edges += [(v - rng.randint(2, 8), v) for v in range(9, n) if rng.random() < 0.3]
    return ck.Graph(nodes, edges)


def solver_rows(sizes) -> list[dict]:
    rows = []
    for n in sizes:
        for dag in (False, True):
            graph = random_graph(n, dag)
            budget = ck.solve(graph, None, "sqrt").predicted_peak
            for method in SOLVER_METHODS:
                row = dict(part="solver", graph="dag" if dag else "chain", nodes=n, method=method,
                           budget=budget)
                t0 = time.perf_counter()
                try:
                    solution = ck.solve(graph, budget, method)
                except (ValueError, NotImplementedError) as error:
                    rows.append({**row, "error": H.error_summary(error)})
                    continue
                row.update(solve_s=time.perf_counter() - t0, predicted=solution.predicted_peak,
                           extra=solution.extra_time / sum(node.time for node in graph.nodes))
                rows.append(row)
    return rows


def plot_tradeoff(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows if r["part"] == "model"))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 5), squeeze=False)
    for ax, name in zip(axes[0], models):
        mine = [r for r in rows if r["part"] == "model" and r["model"] == name and r.get("measured")]
        for method in dict.fromkeys(r["method"] for r in mine):
            points = sorted((r["extra"], r["measured"] / 2**20) for r in mine if r["method"] == method)
            ax.plot(*zip(*points), marker="o", label=method)
        ax.set_title(name)
        ax.set_xlabel("extra step time (measured, fraction of eager)")
        ax.set_ylabel("measured peak, MiB")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sweep, no result files")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 10)
    sizes = (100, 1000) if args.quick else (100, 1000, 2500)
    rows = model_rows(args.quick, repeats) + solver_rows(sizes)

    model_table = H.markdown_table([r for r in rows if r["part"] == "model"], [
        H.Column("model", "model"), H.Column("method", "method"), H.Column("budget", "budget B", "{:,}"),
        H.Column("predicted", "predicted peak B", "{:,}"), H.Column("measured", "measured peak B", "{:,}"),
        H.Column("step_ms", "step ms", "{:.2f}"), H.Column("extra", "extra time (measured)", "{:+.0%}"),
        H.Column("predicted_extra", "extra time (model)", "{:+.0%}"), H.Column("error", "error")])
    solver_table = H.markdown_table([r for r in rows if r["part"] == "solver"], [
        H.Column("graph", "graph"), H.Column("nodes", "nodes"), H.Column("method", "method"),
        H.Column("solve_s", "solve s", "{:.3f}"), H.Column("predicted", "predicted peak B", "{:,}"),
        H.Column("extra", "extra time", "{:+.1%}"), H.Column("error", "error")])
    print(model_table, "\n", solver_table, sep="\n")
    if args.quick:
        return
    device = torch.device("cpu")
    stem = H.RESULTS_DIR / f"checkpoint_{H.device_tag(device)}"
    H.write_csv(rows, stem.with_suffix(".csv"))
    H.write_markdown(stem.with_suffix(".md"), "Checkpoint planning",
                     H.environment_lines(device, [H.command_line()]),
                     ["## Peak memory against extra compute", model_table,
                      "## Solver time (budget: the sqrt schedule's predicted peak)", solver_table])
    plot_tradeoff(rows, stem)


if __name__ == "__main__":
    main()
