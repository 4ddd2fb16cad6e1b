// Checkpoint planner: the DP solvers "dp", "dp-approx" and "chain" of memkernels.checkpoint, in C++.
//
// The cost model is the one of memkernels/checkpoint/solvers.py (its docstring defines it); this
// file follows it term by term, and tests/test_checkpoint_solvers.py holds both against the
// pure-Python reference memkernels/checkpoint/reference.py.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <pybind11/pybind11.h>

namespace memkernels::planner {

// The most a budget, and the sum of a problem's bytes that bounds every peak, may be
// (memkernels.checkpoint.graph.MAX_BYTES): int64 sums of the two cannot overflow.
constexpr int64_t kMaxBytes = int64_t{1} << 62;

// Per-node costs of a graph whose nodes are numbered in a topological order.
struct Problem {
  std::vector<double> time;             // forward time of node v
  std::vector<int64_t> internal;        // i_v: bytes of the buffers v's backward keeps that v allocates
  std::vector<int64_t> forward_peak;    // h_v: peak bytes of v's forward above its inputs
  std::vector<int64_t> backward_peak;   // w_v: peak bytes of v's backward above its saved tensors
  std::vector<int64_t> pending_grads;   // g_v: gradient bytes alive while v's backward runs
  std::vector<int64_t> storage_bytes;   // bytes of the output storage v allocates (0 for views)
  std::vector<uint8_t> is_output;       // v's storage is (part of) a graph output
  std::vector<std::vector<int>> preds;  // direct predecessors of v
  std::vector<std::vector<int>> users;  // nodes that read v's storage (through views too)
  std::vector<std::vector<int>> saves;  // owners of the storages v's backward keeps (v itself too)
  std::vector<std::vector<int>> reads;  // nodes whose storages v reads (the storages' owners)
  int64_t checkpoint_bytes = 0;         // what each checkpoint keeps of its own (the RNG state)

  int size() const { return static_cast<int>(time.size()); }
  void validate() const;  // throws std::invalid_argument naming what is wrong
};

// One segment of a schedule: its nodes (ascending) and whether it is recomputed in backward.
using Segment = std::pair<std::vector<int>, bool>;

struct Solution {
  double extra_time;
  std::vector<Segment> segments;
};

// method: "dp" (exact, over every lower set; throws past max_lower_sets of them), "dp-approx"
// (over the ancestor closures), "chain" (over the prefixes of the topological order). The last two
// round kept bytes up to budget / buckets. Returns nothing when no schedule fits the budget.
std::optional<Solution> solve(const std::string& method, const Problem& problem, int64_t budget,
                              int buckets, int64_t max_lower_sets);

void bind(pybind11::module_& m);

}  // namespace memkernels::planner
