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
// How they run (run_parts): on torch's intra-op OpenMP team (at::parallel_for, the threads
// torch.set_num_threads sizes), each thread claiming parts from a shared counter, so a thread
// that arrives late claims less. Why that team and not a pool of our own: any torch op on more
// than 32k elements just before the call (TorchRec's bucketize, the windows of the benchmark)
// leaves that team's worker spinning on the second core for milliseconds (libgomp's default
// wait policy); a helper from another pool (at::launch, this file's first design) then shared
// that core with a spinner and 2 threads ran 0.65-1.0x of one. The spinning worker is the one
// that takes a part here at once. The cost: fork-join waits for every team thread to arrive, so
// threads pay off only on cores of their own; under a loaded machine use torch.set_num_threads(1).
//
// Shapes: offsets / sizes [B] int64 (window start and length of each ID); cuts [parts + 1].

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <limits>
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

// Runs run_part(p) once for every p in [0, parts): on the calling thread and up to `helpers`
// more threads of torch's OpenMP team, each part on one thread. Returns when all parts are done;
// an exception in a part is rethrown here (at::parallel_for). Inside another parallel region it
// runs the parts in order on the calling thread.
inline void run_parts(
    int64_t parts, int64_t helpers, const std::function<void(int64_t)>& run_part) {
  if (helpers <= 0 || parts <= 1) {
    for (int64_t p = 0; p < parts; ++p) {
      run_part(p);
    }
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(helpers + 1, parts), 1, [&](int64_t, int64_t) {
    for (int64_t part = next.fetch_add(1); part < parts; part = next.fetch_add(1)) {
      run_part(part);
    }
  });
}

}  // namespace rayrec
