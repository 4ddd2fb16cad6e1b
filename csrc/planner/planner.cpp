// The DP solvers of the checkpoint planner (cost model: memkernels/checkpoint/solvers.py).
//
// A schedule is an increasing chain of lower sets {} = L_0 < L_1 < ... < L_k = V; segment
// S_i = L_i \ L_{i-1} is kept (its saved tensors stay until its backward) or recomputed (run under
// checkpoint, recomputed once when backward reaches it). It fits the budget B when, for every i,
//   K_{i-1} + boundary(L_{i-1}) + peak(S_i, L_i, recomputed_i) <= B   and   K_k + boundary(V) <= B,
// K_i being what S_1..S_i hold: for a kept segment its internal buffers and every storage one of its
// nodes saves, for a recomputed one the storages it reads from before it (the checkpoint's inputs).
// The solvers minimise the summed forward time of the recomputed segments. Loop orders and tie
// rules are the reference's (memkernels/checkpoint/reference.py), so both return the same schedule.
#include "planner/planner.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <stdexcept>

#include <pybind11/stl.h>

namespace memkernels::planner {
namespace {

constexpr int64_t kNever = std::numeric_limits<int64_t>::max();
constexpr double kInf = std::numeric_limits<double>::infinity();

using Bits = std::vector<uint64_t>;

bool test(const Bits& set, int v) { return (set[v >> 6] >> (v & 63)) & 1; }
void insert(Bits& set, int v) { set[v >> 6] |= uint64_t{1} << (v & 63); }

bool strict_subset(const Bits& inner, const Bits& outer) {
  bool smaller = false;
  for (size_t i = 0; i < inner.size(); ++i) {
    if (inner[i] & ~outer[i]) return false;
    smaller |= inner[i] != outer[i];
  }
  return smaller;
}

// Nodes of outer \ inner, ascending.
std::vector<int> difference(const Bits& outer, const Bits& inner) {
  std::vector<int> nodes;
  for (size_t w = 0; w < outer.size(); ++w)
    for (uint64_t bits = outer[w] & ~inner[w]; bits; bits &= bits - 1)
      nodes.push_back(static_cast<int>(w * 64 + __builtin_ctzll(bits)));
  return nodes;
}

std::vector<int> members(const Bits& set, int n) {
  std::vector<int> nodes;
  for (int v = 0; v < n; ++v)
    if (test(set, v)) nodes.push_back(v);
  return nodes;
}

// What peak(S, L, recomputed) needs, for both choices: the largest forward step (F_v), the
// largest backward step (B_v), the pending gradients at S's last node, and S's held bytes and time.
struct SegmentStats {
  int64_t max_forward = 0;   // as recomputed: every boundary byte alive
  int64_t max_backward = 0;
  int64_t max_forward_kept = 0;   // as kept: inputs only it reads and none of its nodes saves die
  int64_t max_backward_kept = 0;  // after their last reader
  int64_t top_grads = 0;
  int64_t later_outputs = 0;  // graph outputs made after the segment (alive in its backward)
  int64_t kept = 0;           // internal buffers and storages its nodes save, when kept
  int64_t inputs = 0;         // bytes of the storages made outside the segment that it reads
  int64_t checkpoint = 0;     // what its checkpoint keeps of its own, when recomputed
  double time = 0.0;

  int64_t held(bool recomputed) const { return recomputed ? inputs + checkpoint : kept; }

  int64_t peak(bool recomputed) const {
    if (!recomputed) return std::max(max_forward_kept, max_backward_kept);
    return std::max(max_forward + top_grads + later_outputs, max_backward) + checkpoint;
  }
};

class Planner {
 public:
  explicit Planner(const Problem& p)
      : p_(p), n_(p.size()), words_((n_ + 63) / 64 + 1), stamp_(p.size(), 0), held_(p.size(), 0) {
    last_use_.resize(n_);
    for (int u = 0; u < n_; ++u) {
      int64_t last = -1;
      for (int c : p_.users[u]) last = std::max<int64_t>(last, c);
      last_use_[u] = p_.is_output[u] ? kNever : last;
    }
    least_kept_.assign(n_, 0);
    for (int v = 0; v < n_; ++v) {
      least_kept_[v] = p_.internal[v];
      for (int o : p_.saves[v])
        if (o == v) least_kept_[v] += p_.storage_bytes[v];
    }
  }

  Bits empty() const { return Bits(words_, 0); }

  // Bytes of the storages made in `lower` that a node outside it (or the loss) still reads.
  int64_t boundary(const Bits& lower) const {
    int64_t bytes = 0;
    for (int u = 0; u < n_; ++u) {
      if (!test(lower, u) || p_.storage_bytes[u] == 0) continue;
      bool needed = p_.is_output[u];
      for (int c : p_.users[u]) needed = needed || !test(lower, c);
      if (needed) bytes += p_.storage_bytes[u];
    }
    return bytes;
  }

  // Stats of the segment `nodes` (ascending) = upper \ lower.
  SegmentStats segment(const std::vector<int>& nodes, const Bits& lower, const Bits& upper) const {
    SegmentStats s;
    const size_t m = nodes.size();
    // A storage made in S is held by S from its forward until the backward of its first saver in
    // S; storages made before S that S saves count in S's kept bytes only (they are boundary bytes
    // while S runs).
    // The graph's outputs are boundary bytes instead (the caller holds them), alive in the
    // backward of their segment and of every earlier one.
    ++epoch_;
    std::vector<int64_t> freed_at(m, 0);
    int64_t external = 0;
    for (size_t i = 0; i < m; ++i)
      for (int o : p_.saves[nodes[i]]) {
        if (stamp_[o] == epoch_) continue;
        stamp_[o] = epoch_;
        if (test(upper, o) && !test(lower, o)) {
          held_[o] = epoch_;
          if (!p_.is_output[o]) freed_at[i] += p_.storage_bytes[o];
        } else if (!p_.is_output[o]) {
          external += p_.storage_bytes[o];
        }
      }
    int64_t outputs = 0;
    for (int u = 0; u < n_; ++u)
      if (p_.is_output[u] && !test(lower, u)) (test(upper, u) ? outputs : s.later_outputs) += p_.storage_bytes[u];
    std::vector<int64_t> live_change(m + 1, 0);
    for (size_t i = 0; i < m; ++i) {
      const int u = nodes[i];
      if (p_.storage_bytes[u] == 0) continue;
      int64_t end = held_[u] == epoch_ ? kNever : last_use_[u];
      for (int c : p_.users[u])
        if (!test(upper, c)) end = kNever;
      // Alive while the forward reaches nodes u < v <= end of this segment.
      const size_t stop = std::upper_bound(nodes.begin(), nodes.end(), end,
                                           [](int64_t e, int v) { return e < v; }) - nodes.begin();
      if (stop > i + 1) {
        live_change[i + 1] += p_.storage_bytes[u];
        live_change[stop] -= p_.storage_bytes[u];
      }
    }
    // Inputs that only this segment reads and none of its nodes saves (stamp_ still marks the
    // saved ones): a kept segment frees them after their last reader.
    std::vector<int64_t> dead_change(m + 1, 0);
    int64_t dropped = 0;
    ++epoch_;
    const int saved_epoch = epoch_ - 1;
    for (int v : nodes)
      for (int o : p_.reads[v]) {
        if (!test(lower, o) || stamp_[o] == epoch_ || stamp_[o] == saved_epoch || p_.is_output[o]) continue;
        bool only_here = true;
        for (int c : p_.users[o]) only_here = only_here && test(upper, c);
        stamp_[o] = epoch_;
        if (!only_here) continue;
        dropped += p_.storage_bytes[o];
        const size_t after = std::upper_bound(nodes.begin(), nodes.end(), last_use_[o],
                                              [](int64_t e, int x) { return e < x; }) - nodes.begin();
        dead_change[after] += p_.storage_bytes[o];
      }
    int64_t live = 0, internal = 0, held = 0, dead = 0;
    for (size_t i = 0; i < m; ++i) {
      const int v = nodes[i];
      live += live_change[i];
      dead += dead_change[i];
      s.max_forward = std::max(s.max_forward, internal + live + p_.forward_peak[v]);
      s.max_forward_kept = std::max(s.max_forward_kept, internal + live + p_.forward_peak[v] - dead);
      internal += p_.internal[v];
      held += freed_at[i];
      s.max_backward = std::max(s.max_backward, internal + held + p_.backward_peak[v] + p_.pending_grads[v]);
      s.time += p_.time[v];
    }
    s.max_backward += outputs + s.later_outputs;
    s.max_backward_kept = s.max_backward - dropped;
    s.kept = internal + held + external;
    s.checkpoint = p_.checkpoint_bytes;
    s.top_grads = m ? p_.pending_grads[nodes.back()] : 0;
    // A storage the segment reads from outside lies in `lower` (reads are predecessors' owners).
    ++epoch_;
    for (int v : nodes)
      for (int o : p_.reads[v])
        if (test(lower, o) && stamp_[o] != epoch_) {
          stamp_[o] = epoch_;
          s.inputs += p_.storage_bytes[o];
        }
    return s;
  }

  // The segments S = family[to] \ family[from] of a family of lower sets (ascending by size, {}
  // first) that may fit, with their stats.
  // Pruning: S's last backward step holds its internal bytes and the storages its nodes make and
  // save, internal + held. A recomputed S has the boundary of its lower set L on top of that; a kept
  // S frees the boundary bytes only it reads and none of its nodes saves (dropped), so only
  // boundary(L) + peak(S) >= internal + held holds for both: S cannot fit when internal + held
  // passes `room`, the budget less the cheapest kept bytes at L, nor can any larger segment.
  class Segments {
   public:
    Segments(const Planner& planner, const std::vector<Bits>& family)
        : pl_(planner), family_(family), prefixes_(is_prefixes(planner, family)) {
      const int n = pl_.n_;
      const Problem& p = pl_.p_;
      if (!prefixes_) {
        kept_in_.assign(family.size(), 0);
        for (size_t i = 0; i < family.size(); ++i)
          for (int v : members(family[i], n)) kept_in_[i] += pl_.least_kept_[v];
        return;
      }
      expiring_.resize(n + 1);
      for (int u = 0; u < n; ++u)
        if (pl_.last_use_[u] != kNever && pl_.last_use_[u] + 1 <= n && pl_.last_use_[u] + 1 > u + 1)
          expiring_[pl_.last_use_[u] + 1].push_back(u);
      last_read_at_.resize(n);
      for (int u = 0; u < n; ++u)
        if (pl_.last_use_[u] != kNever && pl_.last_use_[u] > u) last_read_at_[pl_.last_use_[u]].push_back(u);
      outputs_after_.assign(n + 1, 0);
      for (int v = n - 1; v >= 0; --v)
        outputs_after_[v] = outputs_after_[v + 1] + (p.is_output[v] ? p.storage_bytes[v] : 0);
      counted_for_.assign(n, -1);
      saved_for_.assign(n, -1);
    }

    // visit(to, stats) for every to > from (ascending) whose set contains family[from] and whose
    // segment may fit `room` (Pruning). Once per `from`: the scratch marks are per start.
    template <typename Visit>
    void for_each_from(int from, int64_t room, Visit&& visit) const {
      if (prefixes_) {
        intervals_from(from, room, visit);
        return;
      }
      // kept_in[to] - kept_in[from] <= internal + held of S: a segment whose bound does not fit
      // is skipped unexamined.
      for (int to = from + 1; to < static_cast<int>(family_.size()); ++to) {
        if (kept_in_[to] - kept_in_[from] > room || !strict_subset(family_[from], family_[to])) continue;
        visit(to, pl_.segment(difference(family_[to], family_[from]), family_[from], family_[to]));
      }
    }

   private:
    // Whether family i is the first i nodes, for every i (the lower sets of a total order).
    static bool is_prefixes(const Planner& planner, const std::vector<Bits>& family) {
      if (static_cast<int>(family.size()) != planner.n_ + 1) return false;
      Bits prefix = planner.empty();
      for (int i = 0; i <= planner.n_; ++i) {
        if (family[i] != prefix) return false;
        if (i < planner.n_) insert(prefix, i);
      }
      return true;
    }

    // The segments [i, v] = family[v + 1] \ family[i] of prefixes: segment()'s stats restricted
    // to intervals, where a node's output is alive at v iff v <= its last use (or it is held),
    // grown node by node.
    template <typename Visit>
    void intervals_from(int i, int64_t room, Visit& visit) const {
      const Problem& p = pl_.p_;
      SegmentStats s;
      s.checkpoint = p.checkpoint_bytes;
      int64_t live = 0, internal = 0, held = 0, external = 0, outputs = 0, backward = 0;
      int64_t dead = 0, dropped = 0;  // inputs read only up to here and not saved (kept case)
      for (int v = i; v < pl_.n_; ++v) {
        for (int o : p.reads[v])
          if (o < i && counted_for_[o] != i) {
            counted_for_[o] = i;
            s.inputs += p.storage_bytes[o];
          }
        for (int u : expiring_[v]) {
          if (u >= i && saved_for_[u] != i) live -= p.storage_bytes[u];
          if (u < i && v > i && saved_for_[u] != i) dead += p.storage_bytes[u];
        }
        s.max_forward = std::max(s.max_forward, internal + live + p.forward_peak[v]);
        s.max_forward_kept = std::max(s.max_forward_kept, internal + live + p.forward_peak[v] - dead);
        internal += p.internal[v];
        for (int o : p.saves[v])
          if (saved_for_[o] != i) {
            saved_for_[o] = i;
            if (!p.is_output[o]) (o >= i ? held : external) += p.storage_bytes[o];
          }
        if (p.is_output[v]) outputs += p.storage_bytes[v];
        for (int u : last_read_at_[v])
          if (u < i && saved_for_[u] != i) dropped += p.storage_bytes[u];
        if (internal + held > room) break;  // both only grow with v
        backward = std::max(backward, internal + held + p.backward_peak[v] + p.pending_grads[v]);
        s.later_outputs = outputs_after_[v + 1];
        s.max_backward = backward + outputs + s.later_outputs;
        s.max_backward_kept = s.max_backward - dropped;
        s.kept = internal + held + external;
        s.time += p.time[v];
        s.top_grads = p.pending_grads[v];
        if (pl_.last_use_[v] > v || saved_for_[v] == i) live += p.storage_bytes[v];
        visit(v + 1, s);
      }
    }

    const Planner& pl_;
    const std::vector<Bits>& family_;
    const bool prefixes_;
    std::vector<int64_t> kept_in_;  // other families: the least kept bytes of family i's nodes
    std::vector<std::vector<int>> expiring_;      // prefixes: outputs last read by v - 1
    std::vector<std::vector<int>> last_read_at_;  // prefixes: storages whose last reader is v
    std::vector<int64_t> outputs_after_;          // prefixes: bytes of the graph outputs >= v
    mutable std::vector<int> counted_for_;  // counted_for_[o] == i: o is in the inputs of [i, ..]
    mutable std::vector<int> saved_for_;    // saved_for_[o] == i: o is in the kept bytes of [i, ..]
  };

  // Bucketed DP over a family of lower sets (ascending by size, {} first, V last).
  std::optional<Solution> bucketed(const std::vector<Bits>& family, int64_t budget, int buckets) const {
    const int f = static_cast<int>(family.size());
    const int64_t unit = std::max<int64_t>(1, (budget + buckets - 1) / buckets);
    const int64_t top = budget / unit;  // largest bucket whose bytes fit
    const int width = static_cast<int>(top + 1);
    std::vector<double> best(static_cast<size_t>(f) * width, kInf);
    struct Back { int from; int bucket; bool recomputed; };
    std::vector<Back> back(static_cast<size_t>(f) * width, Back{-1, -1, false});
    std::vector<int64_t> boundaries(f);
    for (int i = 0; i < f; ++i) boundaries[i] = boundary(family[i]);
    best[0] = 0.0;

    auto relax = [&](int from, int to, const SegmentStats& s) {
      const int64_t base = boundaries[from];
      for (int recomputed = 0; recomputed < 2; ++recomputed) {
        const int64_t room = budget - base - s.peak(recomputed);
        if (room < 0) continue;
        const int64_t last = std::min<int64_t>(top, room / unit);
        const int64_t add = (s.held(recomputed) + unit - 1) / unit;
        const double dt = recomputed ? s.time : 0.0;
        for (int64_t k = 0; k <= last && k + add <= top; ++k) {
          const double t = best[static_cast<size_t>(from) * width + k];
          if (t == kInf) continue;
          const size_t target = static_cast<size_t>(to) * width + (k + add);
          if (t + dt < best[target]) {
            best[target] = t + dt;
            back[target] = Back{from, static_cast<int>(k), recomputed == 1};
          }
        }
      }
    };

    const Segments segments(*this, family);
    for (int from = 0; from < f; ++from) {
      int first = -1;
      for (int k = 0; k < width && first < 0; ++k)
        if (best[static_cast<size_t>(from) * width + k] < kInf) first = k;
      if (first < 0) continue;
      segments.for_each_from(from, budget - first * unit, [&](int to, const SegmentStats& s) { relax(from, to, s); });
    }

    int best_k = -1;
    const int64_t end_boundary = boundaries[f - 1];
    for (int k = 0; k < width; ++k) {
      const double t = best[static_cast<size_t>(f - 1) * width + k];
      if (t < kInf && k * unit + end_boundary <= budget && (best_k < 0 || t < best[static_cast<size_t>(f - 1) * width + best_k]))
        best_k = k;
    }
    if (best_k < 0) return std::nullopt;
    Solution solution{best[static_cast<size_t>(f - 1) * width + best_k], {}};
    for (int at = f - 1, k = best_k; at != 0;) {
      const Back b = back[static_cast<size_t>(at) * width + k];
      solution.segments.emplace_back(difference(family[at], family[b.from]), b.recomputed);
      at = b.from;
      k = b.bucket;
    }
    std::reverse(solution.segments.begin(), solution.segments.end());
    return solution;
  }

  // Exact DP: Pareto fronts of (kept bytes, extra time) over every lower set. Each lower set's
  // candidates come from the smaller sets in ascending order (the reference's order); a front is
  // final once every smaller set has pushed to it. Pruning a pending list on the way keeps what a
  // single pruning at the end would: a state it drops has a state before it that is no worse.
  std::optional<Solution> exact(int64_t budget, int64_t max_lower_sets) const {
    std::vector<Bits> family = lower_sets(max_lower_sets);
    const int f = static_cast<int>(family.size());
    struct State { int64_t kept; double time; int from; int from_state; bool recomputed; };
    const auto keep_front = [](std::vector<State>& states) {
      std::stable_sort(states.begin(), states.end(), [](const State& a, const State& b) {
        return a.kept != b.kept ? a.kept < b.kept : a.time < b.time;
      });
      size_t out = 0;
      for (const State& c : states)
        if (out == 0 || c.time < states[out - 1].time) states[out++] = c;
      states.resize(out);
    };
    std::vector<std::vector<State>> fronts(f);
    std::vector<size_t> pruned_size(f, 0);
    std::vector<int64_t> boundaries(f);
    for (int i = 0; i < f; ++i) boundaries[i] = boundary(family[i]);
    fronts[0].push_back(State{0, 0.0, -1, -1, false});
    const Segments segments(*this, family);
    for (int from = 0; from < f; ++from) {
      std::vector<State>& front = fronts[from];
      keep_front(front);  // its candidates, pushed by every smaller set
      if (front.empty()) continue;
      segments.for_each_from(from, budget - front.front().kept, [&](int to, const SegmentStats& s) {
        std::vector<State>& pending = fronts[to];
        for (int recomputed = 0; recomputed < 2; ++recomputed) {
          for (int i = 0; i < static_cast<int>(front.size()); ++i) {
            const State& st = front[i];
            if (st.kept + boundaries[from] + s.peak(recomputed) > budget) continue;
            pending.push_back(State{st.kept + s.held(recomputed), st.time + (recomputed ? s.time : 0.0), from, i,
                                    recomputed == 1});
          }
        }
        if (pending.size() > 2 * pruned_size[to] + 1024) {
          keep_front(pending);
          pruned_size[to] = pending.size();
        }
      });
    }
    const auto& last = fronts[f - 1];
    int pick = -1;
    for (int i = 0; i < static_cast<int>(last.size()); ++i)
      if (last[i].kept + boundaries[f - 1] <= budget && (pick < 0 || last[i].time < last[pick].time)) pick = i;
    if (pick < 0) return std::nullopt;
    Solution solution{last[pick].time, {}};
    for (int at = f - 1, i = pick; at != 0;) {
      const State& st = fronts[at][i];
      solution.segments.emplace_back(difference(family[at], family[st.from]), st.recomputed);
      at = st.from;
      i = st.from_state;
    }
    std::reverse(solution.segments.begin(), solution.segments.end());
    return solution;
  }

  // Every lower set, ascending by size, then by its sorted nodes.
  std::vector<Bits> lower_sets(int64_t max_lower_sets) const {
    std::set<std::vector<int>> level{{}};
    std::vector<Bits> all;
    // The sets of the next level are lower sets too: counted as they are found, so that a graph
    // with too many throws before they fill memory.
    const auto check_count = [&](size_t found) {
      if (static_cast<int64_t>(found) > max_lower_sets)
        throw std::invalid_argument("method \"dp\": the graph has more than " + std::to_string(max_lower_sets) +
                                    " lower sets; use \"dp-approx\" or \"chain\"");
    };
    for (int size = 0; size <= n_; ++size) {
      std::set<std::vector<int>> next;
      for (const auto& nodes : level) {
        Bits set = empty();
        for (int v : nodes) insert(set, v);
        all.push_back(set);
        check_count(all.size() + next.size());
        for (int v = 0; v < n_; ++v) {
          if (test(set, v)) continue;
          bool ready = true;
          for (int q : p_.preds[v]) ready = ready && test(set, q);
          if (!ready) continue;
          std::vector<int> grown = nodes;
          grown.insert(std::upper_bound(grown.begin(), grown.end(), v), v);
          next.insert(std::move(grown));
          check_count(all.size() + next.size());
        }
      }
      level = std::move(next);
    }
    return all;
  }

  // {}, then each node's ancestor closure (deduplicated), then V; ascending by size, then by nodes.
  std::vector<Bits> ancestor_closures() const {
    std::vector<Bits> closure(n_, empty());
    for (int v = 0; v < n_; ++v) {
      insert(closure[v], v);
      for (int q : p_.preds[v])
        for (int w = 0; w < words_; ++w) closure[v][w] |= closure[q][w];
    }
    std::map<std::pair<int, std::vector<int>>, Bits> sorted;
    Bits all = empty();
    for (int v = 0; v < n_; ++v) insert(all, v);
    closure.push_back(all);
    closure.push_back(empty());
    for (const Bits& set : closure) {
      std::vector<int> nodes = members(set, n_);
      const int size = static_cast<int>(nodes.size());
      sorted.emplace(std::make_pair(size, std::move(nodes)), set);
    }
    std::vector<Bits> family;
    for (auto& [key, set] : sorted) family.push_back(set);
    return family;
  }

  std::vector<Bits> prefixes() const {
    std::vector<Bits> family;
    Bits set = empty();
    family.push_back(set);
    for (int v = 0; v < n_; ++v) {
      insert(set, v);
      family.push_back(set);
    }
    return family;
  }

 private:
  const Problem& p_;
  const int n_;
  const int words_;
  std::vector<int64_t> last_use_;
  std::vector<int64_t> least_kept_;  // bytes any segment holding v keeps for it: internal, self-saved output
  mutable std::vector<int> stamp_;  // stamp_[o] == epoch_: storage o already counted
  mutable std::vector<int> held_;   // held_[o] == epoch_: storage o is saved inside the segment
  mutable int epoch_ = 0;
};

}  // namespace

void Problem::validate() const {
  const size_t n = time.size();
  const std::pair<const char*, size_t> sizes[] = {
      {"internal", internal.size()}, {"forward_peak", forward_peak.size()},
      {"backward_peak", backward_peak.size()}, {"pending_grads", pending_grads.size()},
      {"storage_bytes", storage_bytes.size()}, {"is_output", is_output.size()},
      {"preds", preds.size()}, {"users", users.size()}, {"saves", saves.size()},
      {"reads", reads.size()}};
  for (const auto& [name, size] : sizes)
    if (size != n)
      throw std::invalid_argument(std::string("planner: ") + name + " has " + std::to_string(size) +
                                  " entries, time has " + std::to_string(n));
  for (size_t v = 0; v < n; ++v) {
    for (int q : preds[v])
      if (q < 0 || static_cast<size_t>(q) >= v)
        throw std::invalid_argument("planner: preds[" + std::to_string(v) + "] holds " + std::to_string(q) +
                                    "; nodes must be numbered in a topological order");
    for (int o : reads[v])
      if (o < 0 || static_cast<size_t>(o) >= v)
        throw std::invalid_argument("planner: reads[" + std::to_string(v) + "] holds " + std::to_string(o) +
                                    "; a node reads only earlier nodes' storages");
    for (int c : users[v])
      if (c <= static_cast<int>(v) || static_cast<size_t>(c) >= n)
        throw std::invalid_argument("planner: users[" + std::to_string(v) + "] holds " + std::to_string(c) +
                                    "; a user must come after the node");
    for (int o : saves[v])
      if (o < 0 || static_cast<size_t>(o) > v)
        throw std::invalid_argument("planner: saves[" + std::to_string(v) + "] holds " + std::to_string(o) +
                                    "; a node saves its own or earlier nodes' storages");
  }
  // Any schedule's peak is below every storage and internal buffer, a checkpoint's bytes per node
  // and the largest single-node peaks and pending gradients: kept within kMaxBytes, no int64 sum
  // the solvers form (with a budget of at most kMaxBytes) overflows.
  const std::pair<const char*, const std::vector<int64_t>*> byte_arrays[] = {
      {"internal", &internal}, {"storage_bytes", &storage_bytes}, {"forward_peak", &forward_peak},
      {"backward_peak", &backward_peak}, {"pending_grads", &pending_grads}};
  for (const auto& [name, bytes] : byte_arrays)
    for (int64_t b : *bytes)
      if (b < 0) throw std::invalid_argument(std::string("planner: ") + name + " must be >= 0, got " + std::to_string(b));
  if (checkpoint_bytes < 0)
    throw std::invalid_argument("planner: checkpoint_bytes must be >= 0, got " + std::to_string(checkpoint_bytes));
  int64_t bound = 0;
  const auto add = [&](int64_t bytes) {
    if (bytes > kMaxBytes - bound) throw std::invalid_argument("planner: the byte counts add up to more than 2**62");
    bound += bytes;
  };
  for (const auto* bytes : {&internal, &storage_bytes})
    for (int64_t b : *bytes) add(b);
  for (const auto* peaks : {&forward_peak, &backward_peak, &pending_grads})
    if (n > 0) add(*std::max_element(peaks->begin(), peaks->end()));
  for (size_t v = 0; v < n; ++v) add(checkpoint_bytes);
}

std::optional<Solution> solve(const std::string& method, const Problem& problem, int64_t budget,
                              int buckets, int64_t max_lower_sets) {
  problem.validate();
  if (budget < 0 || budget > kMaxBytes)
    throw std::invalid_argument("planner: budget must be in [0, 2**62] bytes, got " + std::to_string(budget));
  if (buckets < 1) throw std::invalid_argument("planner: buckets must be >= 1, got " + std::to_string(buckets));
  if (problem.size() == 0) return Solution{0.0, {}};
  Planner planner(problem);
  if (method == "dp") return planner.exact(budget, max_lower_sets);
  if (method == "dp-approx") return planner.bucketed(planner.ancestor_closures(), budget, buckets);
  if (method == "chain") return planner.bucketed(planner.prefixes(), budget, buckets);
  throw std::invalid_argument("planner: method must be \"dp\", \"dp-approx\" or \"chain\", got \"" + method + "\"");
}

void bind(pybind11::module_& m) {
  m.def(
      "planner_solve",
      [](const std::string& method, std::vector<double> time, std::vector<int64_t> internal,
         std::vector<int64_t> forward_peak, std::vector<int64_t> backward_peak,
         std::vector<int64_t> pending_grads, std::vector<int64_t> storage_bytes,
         std::vector<uint8_t> is_output, std::vector<std::vector<int>> preds,
         std::vector<std::vector<int>> users, std::vector<std::vector<int>> saves,
         std::vector<std::vector<int>> reads, int64_t checkpoint_bytes, int64_t budget, int buckets,
         int64_t max_lower_sets) -> pybind11::object {
        Problem problem{std::move(time), std::move(internal), std::move(forward_peak),
                        std::move(backward_peak), std::move(pending_grads), std::move(storage_bytes),
                        std::move(is_output), std::move(preds), std::move(users), std::move(saves),
                        std::move(reads), checkpoint_bytes};
        std::optional<Solution> solution;
        {
          pybind11::gil_scoped_release release;
          solution = solve(method, problem, budget, buckets, max_lower_sets);
        }
        if (!solution) return pybind11::none();
        return pybind11::make_tuple(solution->extra_time, solution->segments);
      },
      pybind11::arg("method"), pybind11::arg("time"), pybind11::arg("internal"),
      pybind11::arg("forward_peak"), pybind11::arg("backward_peak"), pybind11::arg("pending_grads"),
      pybind11::arg("storage_bytes"), pybind11::arg("is_output"), pybind11::arg("preds"),
      pybind11::arg("users"), pybind11::arg("saves"), pybind11::arg("reads"), pybind11::arg("checkpoint_bytes"),
      pybind11::arg("budget"),
      pybind11::arg("buckets"), pybind11::arg("max_lower_sets"),
      "Checkpoint schedule of least extra time under `budget` bytes, or None when none fits: "
      "(extra_time, [(nodes, recomputed), ...]). method: \"dp\" | \"dp-approx\" | \"chain\". "
      "The cost model is memkernels.checkpoint.solvers'.");
}

}  // namespace memkernels::planner
