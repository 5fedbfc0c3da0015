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
// Where the cuts go: at the first bucket boundary at or past part * rows / parts
// (bucket_cuts). TorchRec's windows are its buckets (local_sizes / offsets from the input
// mapper: equal sizes, aligned starts), so no bucket is ever shared by two parts. If a window
// still crosses a cut (caller-made windows of other sizes or alignments), or there are no
// windows (the whole table is one window), the batch runs as one pass.
//
// How they run (run_parts): the calling thread starts on the first part at once, and helpers
// from torch's inter-op pool claim further parts from a shared counter as they wake. The caller
// never waits for a helper that has not started, only for a part a helper is running, so a
// helper that wakes late costs nothing, where a fork-join team (at::parallel_for) stalls the
// call until every thread has been scheduled (on the shared 2-core dev machine that made a
// 4,096-ID call 3-10 ms instead of 0.1). A helper preempted inside a part still holds the
// caller up: threads pay off only on cores of their own (torch.set_num_threads).
//
// Shapes: offsets / sizes [B] int64 (window start and length of each ID); cuts [parts + 1].

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

// Cuts of the table's rows into `wanted` ranges for TorchRec's buckets: equal windows of
// `sizes[0]` rows starting at multiples of it, so each cut is the first bucket boundary at or
// past p * num_rows / wanted and no bucket straddles a cut (the caller still checks every ID's
// window and falls back to one pass if one crosses). Found without reading the batch beyond
// its first window, so it costs nothing per ID. Result: [wanted + 1] ascending row numbers,
// cuts[0] = 0, cuts[wanted] = num_rows (ranges may be empty); empty when there is nothing to cut
// (one range wanted, no windows, an empty batch).
inline std::vector<int64_t> bucket_cuts(
    const int64_t* offsets,
    const int64_t* sizes,
    int64_t batch,
    int64_t num_rows,
    int64_t wanted) {
  if (wanted <= 1 || offsets == nullptr || sizes == nullptr || batch == 0 || sizes[0] <= 0 ||
      wanted > 255) {
    return {};
  }
  const int64_t bucket = sizes[0];
  std::vector<int64_t> cuts(wanted + 1);
  cuts[0] = 0;
  cuts[wanted] = num_rows;
  for (int64_t p = 1; p < wanted; ++p) {
    const int64_t target = p * (num_rows / wanted) + (p * (num_rows % wanted)) / wanted;
    cuts[p] = std::min(num_rows, (target + bucket - 1) / bucket * bucket);
  }
  return cuts;
}

// The range of `cuts` holding row `start` (branchless: a count of the cuts at or below it).
inline int64_t part_holding(int64_t start, const std::vector<int64_t>& cuts) {
  int64_t part = 0;
  const int64_t last = static_cast<int64_t>(cuts.size()) - 1;
  for (int64_t p = 1; p < last; ++p) {
    part += start >= cuts[p] ? 1 : 0;
  }
  return part;
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
