// Split one batch of MPZCH inserts into parts that touch disjoint rows, so that the parts can
// run on different threads and still give exactly the sequential result; and run them so.
//
// Why it is exact: an ID reads and writes only rows of its window [offset, offset + modulo)
// (its probe slots, and under opt-in its reserved slot, all lie inside). Cut the table's rows
// into ranges; if every ID's window lies inside one range, IDs of different ranges never touch
// the same row, so running each range's IDs in input order on its own thread writes the same
// identities, metadata and runtime_meta, and returns the same slots and evictions, as one
// input-order pass over the whole batch.
//
// Where the cuts go: near part * rows / parts, moved up to the nearest window start seen in the
// batch. TorchRec's windows are its buckets (local_sizes / offsets from the input mapper), so a
// cut lands on a bucket boundary and no bucket is ever shared by two threads. If a window still
// crosses a cut (caller-made overlapping windows), or there are no windows (the whole table is
// one window), the batch is not split.
//
// How they run (run_parts): the calling thread starts on the first part at once, and helpers
// from torch's inter-op pool claim further parts from a shared counter as they wake. The caller
// never waits for a helper that has not started, only for a part a helper is running, so a
// helper that wakes late costs nothing, where a fork-join team (at::parallel_for) stalls the
// call until every thread has been scheduled (on the shared 2-core dev machine that made a
// 4,096-ID call 3-10 ms instead of 0.1). A helper preempted inside a part still holds the
// caller up: threads pay off only on cores of their own (torch.set_num_threads).
//
// Shapes: offsets / sizes [B] int64 (window start and length of each ID). Result: order [B]
// (ID indices grouped by part, input order inside a part) and begins [parts + 1].

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

namespace rayrec {

struct Partition {
  int64_t parts = 1;             // 1: run the batch as one sequential pass (order unused)
  std::vector<int64_t> order;    // part p is order[begins[p], begins[p + 1])
  std::vector<int64_t> begins;
};

// At most `wanted` non-empty parts; one (sequential) when the windows allow no clean cut.
inline Partition partition_by_rows(
    const int64_t* offsets,
    const int64_t* sizes,
    int64_t batch,
    int64_t num_rows,
    int64_t wanted) {
  Partition result;
  if (wanted <= 1 || offsets == nullptr || sizes == nullptr || batch == 0) {
    return result;
  }
  // cuts[p] is the first row of part p: the smallest window start at or past the target row
  // p * num_rows / wanted (cuts[wanted] = num_rows). One pass keeps the smallest start seen in
  // each target range, a suffix minimum over the ranges gives the cuts: O(batch + parts), where
  // testing every ID against every cut cost more than the probes themselves at 8 parts.
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::vector<int64_t> targets(wanted + 1);
  for (int64_t p = 0; p <= wanted; ++p) {
    targets[p] = p * num_rows / wanted;
  }
  std::vector<int64_t> smallest(wanted, kNone);  // smallest start in [targets[r], targets[r + 1])
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t start = offsets[i];
    if (start < 0 || start >= num_rows) {
      return result;  // out of the table: the caller's window check reports it
    }
    int64_t range = std::min(wanted - 1, start / std::max<int64_t>(1, num_rows / wanted));
    while (range + 1 < wanted && start >= targets[range + 1]) {
      ++range;
    }
    while (range > 0 && start < targets[range]) {
      --range;
    }
    smallest[range] = std::min(smallest[range], start);
  }
  std::vector<int64_t> cuts(wanted + 1, num_rows);
  cuts[0] = 0;
  for (int64_t p = wanted - 1; p >= 1; --p) {
    cuts[p] = std::min(smallest[p], cuts[p + 1]);  // no window at or past the target: empty part
  }

  // Each ID goes to the part holding its window's start; the window must end inside it.
  std::vector<int64_t> part_of(batch);
  std::vector<int64_t> counts(wanted, 0);
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t part =
        static_cast<int64_t>(std::upper_bound(cuts.begin() + 1, cuts.end() - 1, offsets[i]) -
                             (cuts.begin() + 1));
    if (offsets[i] + sizes[i] > cuts[part + 1]) {
      return Partition{};  // a window crosses a cut: sequential
    }
    part_of[i] = part;
    ++counts[part];
  }

  // Drop empty parts; fewer than two left means nothing to run side by side.
  std::vector<int64_t> slot_of_part(wanted, -1);
  result.begins.assign(1, 0);
  for (int64_t p = 0; p < wanted; ++p) {
    if (counts[p] > 0) {
      slot_of_part[p] = static_cast<int64_t>(result.begins.size()) - 1;
      result.begins.push_back(result.begins.back() + counts[p]);
    }
  }
  result.parts = static_cast<int64_t>(result.begins.size()) - 1;
  if (result.parts < 2) {
    return Partition{};
  }
  result.order.resize(batch);
  std::vector<int64_t> next(result.begins.begin(), result.begins.end() - 1);
  for (int64_t i = 0; i < batch; ++i) {
    result.order[next[slot_of_part[part_of[i]]]++] = i;  // stable: input order inside a part
  }
  return result;
}

// Runs run_part(p) once for every p in [0, parts): on the calling thread and on up to `helpers`
// threads of torch's inter-op pool, each part on one thread. Returns when all parts are done.
inline void run_parts(
    int64_t parts, int64_t helpers, const std::function<void(int64_t)>& run_part) {
  // Heap state: a helper may wake after the call has returned; it then claims nothing and only
  // touches this block, which it keeps alive. run_part is only called for a claimed part, and
  // every claimed part finishes before the caller returns.
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t parts;
    const std::function<void(int64_t)>* run_part;
  };
  auto shared = std::make_shared<Shared>();
  shared->parts = parts;
  shared->run_part = &run_part;
  const auto work = [](Shared& state) {
    for (int64_t part = state.next.fetch_add(1); part < state.parts;
         part = state.next.fetch_add(1)) {
      (*state.run_part)(part);
      state.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t h = 0; h < std::min(helpers, parts - 1); ++h) {
    at::launch([shared, work] { work(*shared); });
  }
  work(*shared);
  while (shared->done.load(std::memory_order_acquire) < parts) {
    std::this_thread::yield();  // a helper is finishing a part it claimed
  }
}

}  // namespace rayrec
