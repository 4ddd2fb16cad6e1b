"""Checkpoint planning: which activations to keep and which to recompute under a memory budget.

    import memkernels as mk
    plan = mk.checkpoint.plan(model, x, budget="2GB", method="dp-approx")
    print(plan)
    model = mk.checkpoint.apply(model, plan)

    g = mk.checkpoint.trace(model, x)                              # a Graph with measured costs
    g = mk.checkpoint.Graph.chain(times, output_bytes, saved_bytes)  # or Graph(nodes, edges)
    s = mk.checkpoint.solve(g, budget, method="dp")                # s.extra_time, s.predicted_peak, s.kept

The cost model and the methods are defined in memkernels/checkpoint/solvers.py.
"""
from memkernels.checkpoint.budget import parse_budget
from memkernels.checkpoint.graph import Graph, Node, trace
from memkernels.checkpoint.plan import Plan, PlannedModule, apply, measure_peak, plan
from memkernels.checkpoint.solvers import (METHODS, InfeasibleBudget, Solution, evaluate,
                                           least_budget, solve)

__all__ = ["Graph", "Node", "trace", "solve", "Solution", "evaluate", "least_budget", "METHODS",
           "InfeasibleBudget", "plan", "Plan", "PlannedModule", "apply", "measure_peak", "parse_budget"]
