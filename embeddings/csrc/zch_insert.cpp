// rayrec::zero_collision_hash: a CPU insert path for multi-probe zero-collision hashing (MPZCH).
//
// Why this file exists: fbgemm 1.8's CPU kernel for fbgemm::zero_collision_hash only does
// readonly lookups; inserts (training) exist only as a CUDA kernel. This op takes the same
// arguments, writes `identities` / `metadata` / `runtime_meta` in the same layout, and returns
// the same (slots, evict_slots) pair, so a table trained here is read correctly by fbgemm's
// readonly kernel on CPU or CUDA (the layout contract is shared/specs/mpzch-compat.md).
//
// Where the CUDA kernel runs one thread per ID with compare-and-swap, this one processes IDs in
// input order: deterministic, and "first in the batch wins" is one of the outcomes the CUDA race
// allows. Large batches are split by bucket (zch_partition.h) into parts that share no row and
// run on up to torch.get_num_threads() threads of torch's OpenMP team; inside a part the order
// is the input order, so the result is bit-identical to one sequential pass whatever the
// thread count.
//
// Optionally the call reports what it did (`counters`, see Counts below), so that the caller's
// statistics cost O(batch) instead of scanning the table before and after.
//
// Shapes: input [B] int64/int32, identities [N, 1] (int64, or int32 holding id % INT32_MAX),
// metadata [N, 1] int32, runtime_meta [N, 1] int64, local_sizes / offsets [B] int64,
// input_metadata / opt_in_rands [B] int32. Output slots [B] int64, evict_slots [E] int64.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <ctime>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "zch_partition.h"

namespace rayrec {
namespace {

using at::Tensor;

constexpr int64_t kEmptySlot = -1;           // identities value of an unused row
constexpr int64_t kInt32Max = 2147483647;    // int32 tables store id % INT32_MAX
constexpr int64_t kSecondsPerHour = 3600;

// ---------------------------------------------------------------------------------------------
// MurmurHash3 x64-128 of the two 64-bit blocks (id, 0) with seed 0, folded to h1 ^ h2: the start
// slot hash fbgemm uses. Because the second block and the seed are zero, the second lane's body
// collapses to h2 = h1 * 5 + 0x38495ab5 (h2 starts at 0 and mixes in k2 = 0).
constexpr uint64_t kC1 = 0x87c37b91114253d5ULL;
constexpr uint64_t kC2 = 0x4cf5ad432745937fULL;

inline uint64_t rotate_left(uint64_t value, int bits) {
  return (value << bits) | (value >> (64 - bits));
}

inline uint64_t final_mix(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ULL;
  k ^= k >> 33;
  return k;
}

inline uint64_t slot_hash(uint64_t id) {
  uint64_t h1 = rotate_left(rotate_left(id * kC1, 31) * kC2, 27) * 5 + 0x52dce729ULL;
  uint64_t h2 = h1 * 5 + 0x38495ab5ULL;
  h1 ^= 16;  // total length in bytes
  h2 ^= 16;
  h1 += h2;
  h2 += h1;
  h1 = final_mix(h1);
  h2 = final_mix(h2);
  h1 += h2;
  h2 += h1;
  return h1 ^ h2;
}

// ---------------------------------------------------------------------------------------------
// Everything one call needs, resolved once: raw pointers plus strides, so the per-ID loop does
// no dispatch or bounds bookkeeping beyond the window checks it must do anyway.
template <typename TIdentity>
struct Table {
  TIdentity* identities;
  int64_t identities_stride;
  int64_t num_rows;
  int32_t* metadata;  // nullptr unless eviction is on
  int64_t metadata_stride;
  int64_t* runtime_meta;  // nullptr unless the caller tracks per-slot frequency
  int64_t runtime_meta_stride;

  TIdentity& identity_at(int64_t slot) const {
    return identities[slot * identities_stride];
  }
  int32_t& metadata_at(int64_t slot) const {
    return metadata[slot * metadata_stride];
  }
  // metadata = max(old, incoming): the CUDA kernel's atomicMax.
  void raise_metadata(int64_t slot, int32_t value) const {
    if (metadata != nullptr) {
      int32_t& current = metadata_at(slot);
      current = std::max(current, value);
    }
  }
  void count_hit(int64_t slot) const {
    if (runtime_meta != nullptr) {
      runtime_meta[slot * runtime_meta_stride] += 1;
    }
  }
  void restart_count(int64_t slot) const {
    if (runtime_meta != nullptr) {
      runtime_meta[slot * runtime_meta_stride] = 1;
    }
  }
};

struct CallOptions {
  int64_t max_probe;
  bool readonly;
  bool support_evict;
  bool disable_fallback;
  int64_t eviction_policy;
  int32_t eviction_threshold;
  int32_t current_hour;
  int64_t opt_in_prob;
  int64_t num_reserved_slots;
};

// Is `identity` in its window? Walks like the CUDA pre-scan: an empty slot ends the walk
// (absent), a matching slot means present. Only eviction and opt-in admission need the answer.
template <typename TIdentity>
bool in_window(
    const Table<TIdentity>& table,
    TIdentity identity,
    int64_t start,
    int64_t offset,
    int64_t block,
    int64_t max_probe) {
  int64_t index = start;
  for (int64_t probe = 0; probe < max_probe; ++probe) {
    const TIdentity current = table.identity_at(index + offset);
    if (current == static_cast<TIdentity>(kEmptySlot)) {
      return false;
    }
    if (current == identity) {
      return true;
    }
    index = index + 1 == block ? 0 : index + 1;
  }
  return false;
}

// What one ID's insert did. An ID "owns" its slot after kHit, kClaimedEmpty and kEvicted.
enum class Outcome : uint8_t {
  kNoRow,         // no slot of its own: fallback (or -1 with disable_fallback)
  kShared,        // opt-in admission failed: shares a reserved slot, owns nothing
  kHit,           // already held its slot
  kClaimedEmpty,  // took an empty row
  kEvicted,       // took an expired row from another ID
};

struct Claim {
  int64_t local = -1;         // slot within the window (before offset); -1: fallback applies
  Outcome outcome = Outcome::kNoRow;
  int64_t evicted_slot = -1;  // global slot, with kEvicted
  int32_t evicted_expiry = 0; // that slot's metadata before the eviction, with kEvicted
};

// What one call did, summed over its IDs: the `counters` output, in this order.
struct Counts {
  int64_t new_rows = 0;            // empty rows claimed
  int64_t owned = 0;               // IDs that hold their own slot after their insert
  int64_t evictions = 0;           // eviction events
  int64_t evicted_expiry_sum = 0;  // sum of the evicted rows' metadata before eviction
  int64_t parts = 1;               // parts the batch ran in (threads used, at most)

  void add(const Claim& claim) {
    switch (claim.outcome) {
      case Outcome::kClaimedEmpty:
        ++new_rows;
        ++owned;
        break;
      case Outcome::kEvicted:
        ++evictions;
        evicted_expiry_sum += claim.evicted_expiry;
        ++owned;
        break;
      case Outcome::kHit:
        ++owned;
        break;
      default:
        break;
    }
  }
  void add(const Counts& other) {
    new_rows += other.new_rows;
    owned += other.owned;
    evictions += other.evictions;
    evicted_expiry_sum += other.evicted_expiry_sum;
  }
};
constexpr int64_t kNumCounters = 5;

// One ID: its local slot (before offset) and what happened. Writes identities/metadata/
// runtime_meta exactly as the CUDA kernel would had this ID run alone after every earlier ID in
// the batch that shares its window.
template <typename TIdentity>
Claim insert_one(
    const Table<TIdentity>& table,
    const CallOptions& options,
    TIdentity identity,
    int64_t start,
    int64_t offset,
    int64_t block,
    int32_t metadata_value,
    bool may_opt_out,
    int64_t reserved_slot) {
  const TIdentity empty = static_cast<TIdentity>(kEmptySlot);
  const bool needs_prescan = options.support_evict || may_opt_out;
  const bool present = needs_prescan &&
      in_window(table, identity, start, offset, block, options.max_probe);
  Claim claim;

  // Opt-in admission: a new ID whose draw failed shares a reserved slot (never owns it).
  if (may_opt_out && !present) {
    table.raise_metadata(reserved_slot + offset, metadata_value);
    // The CUDA loop condition decrements max_probe before testing opt_in, so with
    // max_probe == 0 the opt-out still ends in the fallback branch.
    if (options.max_probe > 0) {
      claim.local = reserved_slot;
      claim.outcome = Outcome::kShared;
    }
    return claim;
  }

  const bool lru = options.eviction_policy == 1;
  int64_t lru_index = -1;
  int32_t lru_hours = INT32_MAX;
  int64_t index = start;
  for (int64_t probe = 0; probe < options.max_probe; ++probe) {
    const int64_t slot = index + offset;
    TIdentity& current = table.identity_at(slot);
    if (current == identity || (!options.readonly && current == empty)) {
      claim.outcome = current == identity ? Outcome::kHit : Outcome::kClaimedEmpty;
      if (!options.readonly) {
        current = identity;
        table.raise_metadata(slot, metadata_value);
        table.count_hit(slot);
      }
      claim.local = index;
      return claim;
    }
    if (options.support_evict) {
      // A slot's metadata is -1 only while a CUDA writer is mid-claim; here it can only mean a
      // row filled without metadata, which we treat as the oldest possible row.
      const int32_t seen = table.metadata_at(slot);
      const bool expired = options.eviction_threshold > seen && seen < metadata_value;
      if (!lru && !present && expired) {
        // TTL (policy 0): the first expired slot in probe order is taken at once.
        current = identity;
        table.raise_metadata(slot, metadata_value);
        table.restart_count(slot);
        return Claim{index, Outcome::kEvicted, slot, seen};
      }
      if (lru && expired && seen < lru_hours) {
        lru_index = index;  // strict '<': the earliest slot wins ties
        lru_hours = seen;
      }
    }
    index = index + 1 == block ? 0 : index + 1;
  }

  // LRU (policy 1): only after a full window with no empty or own slot, take the oldest expired.
  if (lru && lru_index != -1) {
    const int64_t slot = lru_index + offset;
    table.identity_at(slot) = identity;
    table.raise_metadata(slot, metadata_value);
    table.restart_count(slot);
    return Claim{lru_index, Outcome::kEvicted, slot, lru_hours};
  }
  return claim;
}

// How many IDs ahead the probe loop prefetches its first slot. The table is far larger than
// L1/L2 (1M rows = 8 MB), so each ID's first probe is a cache miss; the input-order pass cannot
// overlap them by itself because every ID waits on the previous one's writes. Prefetching only
// warms caches, so results stay exactly those of the plain sequential pass.
constexpr int64_t kPrefetchDistance = 16;

// A batch is split into parts of at least this many IDs (below, waking a thread costs more than
// the probes it would take over: 512 IDs take 15-25 us in one thread), and into up to
// kPartsPerThread parts per thread, so that a helper that wakes late, or is preempted inside a
// part, leaves the caller little to wait for.
constexpr int64_t kMinIdsPerPart = 512;
constexpr int64_t kPartsPerThread = 4;

// Batches below this many IDs run on the calling thread alone. The split path does more work in
// all (a partition pass before the probes, a merge inside them) and forks the team twice, which
// smaller batches do not earn back: 2 threads against 1 on the 2-core dev machine
// (benchmarks/mpzch_insert_threads.py --batch N --rounds 5, quiet): 4k IDs 0.88x, 8k 1.1-1.3x,
// 16k 1.2-1.3x, 64k 1.8x.
constexpr int64_t kMinIdsToSplit = 8192;

// The per-ID inputs of one call: pointers into the caller's tensors, read where each ID is probed.
struct Batch {
  const int64_t* local_sizes;  // nullptr: one window, the whole table
  const int64_t* offsets;
  const int32_t* input_metadata;
  const int32_t* opt_in_rands;
};

// One ID's hash and first probe slot (global row), with its window. Computed as the probe loop
// reaches the ID's prefetch point rather than in a pass of its own, which wrote three [B]
// arrays for the probe loop to read back. Measured no faster (an in-process interleaved A/B:
// 2-thread scaling and the readonly rate unchanged); kept as the form with less state.
struct Probe {
  uint64_t hash;
  int64_t first_slot;
  int64_t modulo;
  int64_t offset;
};

template <typename TInput>
inline Probe probe_of(
    const TInput* ids, const Batch& batch, int64_t num_rows, int64_t reserved, int64_t k) {
  const int64_t modulo = batch.local_sizes != nullptr ? batch.local_sizes[k] : num_rows;
  const int64_t offset = batch.offsets != nullptr ? batch.offsets[k] : 0;
  const uint64_t hash = slot_hash(static_cast<uint64_t>(static_cast<int64_t>(ids[k])));
  return Probe{
      hash, offset + static_cast<int64_t>(hash % static_cast<uint64_t>(modulo - reserved)),
      modulo, offset};
}

// Inserts IDs k = index[j] for j in [begin, end) (k = j without `index`), in that order; a
// part's index lists its IDs in input order. Results go to output[j] / evict_slots[j], i.e. in
// list order: a part's list is a contiguous run, so parts on different threads write disjoint
// runs of one buffer (writing output[k] would interleave their IDs on every cache line).
// Every window must have been checked (check_window) before: nothing here throws.
template <typename TInput, typename TIdentity>
Counts insert_ids(
    const TInput* ids,
    const Batch& batch,
    const Table<TIdentity>& table,
    const CallOptions& options,
    int64_t begin,
    int64_t end,
    int64_t* output,
    int64_t* evict_slots,
    const int64_t* index = nullptr) {
  const bool same_dtype = std::is_same_v<TInput, TIdentity>;
  const bool opt_in_on = options.opt_in_prob != -1;
  const int64_t reserved = opt_in_on ? options.num_reserved_slots : 0;
  // the next kPrefetchDistance IDs' probes, computed (and their first slots prefetched) ahead
  constexpr int64_t kRing = 32;
  static_assert(kRing > kPrefetchDistance && (kRing & (kRing - 1)) == 0, "ring of 2^n > distance");
  Probe ring[kRing];
  const auto id_at = [&](int64_t j) { return index != nullptr ? index[j] : j; };
  const auto look_ahead = [&](int64_t j) {
    const Probe probe = probe_of(ids, batch, table.num_rows, reserved, id_at(j));
    ring[j & (kRing - 1)] = probe;
    __builtin_prefetch(&table.identity_at(probe.first_slot), 1);
    if (table.metadata != nullptr) {
      __builtin_prefetch(&table.metadata_at(probe.first_slot), 1);
    }
  };
  for (int64_t j = begin; j < std::min(end, begin + kPrefetchDistance); ++j) {
    look_ahead(j);
  }
  Counts counts;
  for (int64_t j = begin; j < end; ++j) {
    if (j + kPrefetchDistance < end) {
      look_ahead(j + kPrefetchDistance);
    }
    const int64_t k = id_at(j);
    const Probe& probe = ring[j & (kRing - 1)];
    const TInput item = ids[k];
    const uint64_t hash = probe.hash;
    const int64_t modulo = probe.modulo;
    const int64_t offset = probe.offset;
    const int64_t block = modulo - reserved;
    const int64_t start = probe.first_slot - offset;
    const TIdentity identity = same_dtype
        ? static_cast<TIdentity>(item)
        : static_cast<TIdentity>(static_cast<int64_t>(item) % kInt32Max);
    const int32_t metadata_value =
        batch.input_metadata != nullptr ? batch.input_metadata[k] : options.current_hour;
    const int64_t reserved_slot = opt_in_on
        ? block + static_cast<int64_t>(hash % static_cast<uint64_t>(options.num_reserved_slots))
        : -1;
    const bool may_opt_out = !options.readonly && batch.opt_in_rands != nullptr &&
        batch.opt_in_rands[k] >= options.opt_in_prob;

    const Claim claim = insert_one<TIdentity>(
        table, options, identity, start, offset, block, metadata_value, may_opt_out,
        reserved_slot);
    counts.add(claim);
    if (evict_slots != nullptr) {
      evict_slots[j] = claim.evicted_slot;
    }
    int64_t local = claim.local;
    if (local == -1) {
      if (options.disable_fallback) {
        output[j] = -1;
        continue;
      }
      // Fallback: share the first probe slot (or a reserved slot under opt-in), silently.
      local = opt_in_on ? reserved_slot
                        : static_cast<int64_t>(hash % static_cast<uint64_t>(modulo));
    }
    output[j] = local + offset;
  }
  return counts;
}

// Whether an ID's window [offset, offset + modulo), with `block` probe slots, lies in the table.
inline bool window_fits(int64_t offset, int64_t modulo, int64_t block, int64_t num_rows) {
  return block > 0 && offset >= 0 && offset + modulo <= num_rows;
}

// The window check of one ID: a clear error naming it.
void check_window(int64_t i, int64_t offset, int64_t modulo, int64_t block, int64_t num_rows) {
  TORCH_CHECK(
      window_fits(offset, modulo, block, num_rows),
      "rayrec::zero_collision_hash: ID #", i, " has window [", offset, ", ", offset + modulo,
      ") with ", block, " probe slots, outside a table of ", num_rows, " rows");
}

// One input-order pass on the calling thread: check every window first (a bad one fails the
// call before any row is written), then probe in input order.
template <typename TInput, typename TIdentity>
Counts insert_sequential(
    const TInput* ids,
    int64_t size,
    const Table<TIdentity>& table,
    const CallOptions& options,
    const Batch& batch,
    int64_t* output,
    int64_t* evict_slots) {
  if (batch.offsets != nullptr) {
    const int64_t reserved = options.opt_in_prob != -1 ? options.num_reserved_slots : 0;
    for (int64_t i = 0; i < size; ++i) {
      const int64_t modulo = batch.local_sizes[i];
      check_window(i, batch.offsets[i], modulo, modulo - reserved, table.num_rows);
    }
  } else if (size > 0) {
    check_window(0, 0, table.num_rows,
                 table.num_rows - (options.opt_in_prob != -1 ? options.num_reserved_slots : 0),
                 table.num_rows);
  }
  return insert_ids<TInput, TIdentity>(ids, batch, table, options, 0, size, output, evict_slots);
}

// The same result from parts of rows on several threads (zch_partition.h says why it is exact).
// The sequential kernel costs ~30 ns an ID, so nothing may run serially in front of the
// threads, and no pass may move the batch around or branch on a coin flip per ID: (A) by input
// chunk, on every thread, find each ID's part from its window and append its index to the
// chunk's list for that part; (B) each part walks its chunks' lists in chunk order, i.e. its IDs
// in input order, hashing them and reading the per-ID inputs in place (increasing indices:
// near-sequential reads) and writing its own output buffers; (C) inside (B), each chunk's
// outputs are put back in input order once its last part is done. Tried first and slower: a
// counting sort copying every per-ID input into part order (scattered writes), and each part
// scanning the whole batch and skipping other parts' IDs (a mispredicted branch on every other
// ID). nullopt: a window crosses a cut (not TorchRec's equal, aligned buckets).
template <typename TInput, typename TIdentity>
std::optional<Counts> insert_split(
    const TInput* ids,
    int64_t size,
    const Table<TIdentity>& table,
    const CallOptions& options,
    const Batch& batch,
    const std::vector<int64_t>& cuts,
    int64_t threads,
    int64_t* output,
    int64_t* evict_slots) {
  const bool opt_in_on = options.opt_in_prob != -1;
  const int64_t parts = static_cast<int64_t>(cuts.size()) - 1;
  const int64_t chunks = std::min(threads * kPartsPerThread, std::max<int64_t>(1, size / kMinIdsPerPart));
  const auto chunk_begin = [&](int64_t c) { return c * size / chunks; };
  const int64_t helpers = threads - 1;

  // (A) the per-(chunk, part) index lists, from each ID's window alone (hashes wait for the
  // probes, insert_ids); a bad window is only recorded here (no exceptions off the calling
  // thread), reported below before any row is written
  std::unique_ptr<int64_t[]> lists(new int64_t[size]);  // chunk c's part p list: a run inside c's range
  std::vector<int64_t> list_begin(chunks * parts);
  std::vector<int64_t> list_end(chunks * parts);
  std::vector<int64_t> first_bad(chunks, -1);
  std::vector<uint8_t> crosses(chunks, 0);
  run_parts(chunks, helpers, [&](int64_t c) {
    const int64_t lo = chunk_begin(c);
    const int64_t hi = chunk_begin(c + 1);
    std::vector<int64_t> count(parts, 0);
    std::vector<uint8_t> part_of(hi - lo);
    bool crossing = false;  // written to crosses[c] once: neighbouring chunks share its cache line
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t offset = batch.offsets[i];
      const int64_t modulo = batch.local_sizes[i];
      const int64_t block = opt_in_on ? modulo - options.num_reserved_slots : modulo;
      if (!window_fits(offset, modulo, block, table.num_rows)) {
        if (first_bad[c] < 0) {
          first_bad[c] = i;
        }
        part_of[i - lo] = 0;
        continue;
      }
      const int64_t part = part_holding(offset, cuts);
      crossing |= offset + modulo > cuts[part + 1];
      part_of[i - lo] = static_cast<uint8_t>(part);
      ++count[part];
    }
    crosses[c] = crossing;
    // list cursors kept locally: list_end's entries of neighbouring chunks share cache lines
    std::vector<int64_t> cursor(parts);
    int64_t at = lo;
    for (int64_t p = 0; p < parts; ++p) {
      list_begin[c * parts + p] = cursor[p] = at;
      at += count[p];
    }
    for (int64_t i = lo; i < hi; ++i) {
      lists[cursor[part_of[i - lo]]++] = i;
    }
    for (int64_t p = 0; p < parts; ++p) {
      list_end[c * parts + p] = cursor[p];
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    if (first_bad[c] >= 0) {
      const int64_t i = first_bad[c];
      const int64_t modulo = batch.local_sizes[i];
      check_window(i, batch.offsets[i], modulo,
                           opt_in_on ? modulo - options.num_reserved_slots : modulo, table.num_rows);
    }
  }
  if (std::any_of(crosses.begin(), crosses.end(), [](uint8_t x) { return x != 0; })) {
    return std::nullopt;
  }

  // (B) the probes: part p's IDs in input order, on whichever thread claims p, each result
  // written at its position in `lists` (one buffer: every part writes its own runs of it);
  // (C) chunk c's results back in input order, by the part that finishes c last (the others
  // have moved on to later chunks, so the merge overlaps their probes instead of waiting for
  // a fork of its own). Chunk c's lists are a permutation of its own input range, so merges of
  // different chunks write disjoint ranges of the outputs. The acq_rel count makes the other
  // parts' results for c visible to the merging thread.
  std::unique_ptr<int64_t[]> found(new int64_t[size]);
  std::unique_ptr<int64_t[]> found_evicted(evict_slots != nullptr ? new int64_t[size] : nullptr);
  std::unique_ptr<std::atomic<int64_t>[]> arrived(new std::atomic<int64_t>[chunks]);
  for (int64_t c = 0; c < chunks; ++c) {
    arrived[c].store(0, std::memory_order_relaxed);
  }
  const auto merge = [&](int64_t c) {
    for (int64_t j = chunk_begin(c); j < chunk_begin(c + 1); ++j) {
      output[lists[j]] = found[j];
    }
    if (evict_slots != nullptr) {
      for (int64_t j = chunk_begin(c); j < chunk_begin(c + 1); ++j) {
        evict_slots[lists[j]] = found_evicted[j];
      }
    }
  };
  std::vector<Counts> part_counts(parts);
  std::vector<int64_t> part_sizes(parts, 0);
  run_parts(parts, helpers, [&](int64_t p) {
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t begin = list_begin[c * parts + p];
      const int64_t end = list_end[c * parts + p];
      part_counts[p].add(insert_ids<TInput, TIdentity>(
          ids, batch, table, options, begin, end, found.get(), found_evicted.get(), lists.get()));
      part_sizes[p] += end - begin;
      if (arrived[c].fetch_add(1, std::memory_order_acq_rel) == parts - 1) {
        merge(c);
      }
    }
  });

  Counts total;
  int64_t used = 0;
  for (int64_t p = 0; p < parts; ++p) {
    total.add(part_counts[p]);
    used += part_sizes[p] > 0 ? 1 : 0;
  }
  total.parts = used;
  return total;
}

template <typename TInput, typename TIdentity>
Counts hash_batch(
    const Tensor& input,
    const Table<TIdentity>& table,
    const CallOptions& options,
    const Batch& batch,
    int64_t* output,
    int64_t* evict_slots) {
  const TInput* ids = input.const_data_ptr<TInput>();
  const int64_t size = input.numel();
  const int64_t threads = at::get_num_threads();
  // one part per thread, and only batches that pay for the split (kMinIdsToSplit)
  const int64_t wanted = threads > 1 && size >= kMinIdsToSplit ? threads : 1;
  const std::vector<int64_t> cuts =
      bucket_cuts(batch.offsets, batch.local_sizes, size, table.num_rows, wanted);
  if (cuts.size() > 2) {
    const std::optional<Counts> split = insert_split<TInput, TIdentity>(
        ids, size, table, options, batch, cuts, threads, output, evict_slots);
    if (split.has_value()) {
      return *split;  // its parts count is the non-empty parts: 1 when every ID fell in one
    }
  }
  return insert_sequential<TInput, TIdentity>(ids, size, table, options, batch, output, evict_slots);
}

void check_vector(
    const std::optional<Tensor>& tensor,
    const char* name,
    at::ScalarType dtype,
    int64_t batch) {
  if (!tensor.has_value()) {
    return;
  }
  TORCH_CHECK(tensor->device().is_cpu(), "rayrec::zero_collision_hash: ", name,
              " must be a CPU tensor");
  TORCH_CHECK(tensor->scalar_type() == dtype, "rayrec::zero_collision_hash: ", name,
              " must be ", dtype, ", got ", tensor->scalar_type());
  TORCH_CHECK(tensor->numel() == batch, "rayrec::zero_collision_hash: ", name, " has ",
              tensor->numel(), " elements for ", batch, " IDs");
}

void check_rows(
    const std::optional<Tensor>& tensor,
    const char* name,
    at::ScalarType dtype,
    int64_t num_rows) {
  if (!tensor.has_value()) {
    return;
  }
  TORCH_CHECK(tensor->device().is_cpu(), "rayrec::zero_collision_hash: ", name,
              " must be a CPU tensor");
  TORCH_CHECK(tensor->scalar_type() == dtype, "rayrec::zero_collision_hash: ", name,
              " must be ", dtype, ", got ", tensor->scalar_type());
  TORCH_CHECK(tensor->dim() == 2 && tensor->size(0) == num_rows && tensor->size(1) == 1,
              "rayrec::zero_collision_hash: ", name, " must have shape [", num_rows,
              ", 1], got ", tensor->sizes());
}

std::optional<Tensor> contiguous_or_none(const std::optional<Tensor>& tensor) {
  return tensor.has_value() ? std::optional<Tensor>(tensor->contiguous()) : std::nullopt;
}

template <typename T>
const T* pointer_or_null(const std::optional<Tensor>& tensor) {
  return tensor.has_value() ? tensor->const_data_ptr<T>() : nullptr;
}

template <typename TIdentity>
Table<TIdentity> make_table(
    Tensor& identities,
    const std::optional<Tensor>& metadata,
    const std::optional<Tensor>& runtime_meta,
    bool readonly) {
  return Table<TIdentity>{
      identities.data_ptr<TIdentity>(),
      identities.stride(0),
      identities.size(0),
      metadata.has_value() ? metadata->data_ptr<int32_t>() : nullptr,
      metadata.has_value() ? metadata->stride(0) : 0,
      (runtime_meta.has_value() && !readonly) ? runtime_meta->data_ptr<int64_t>() : nullptr,
      runtime_meta.has_value() ? runtime_meta->stride(0) : 0,
  };
}

std::tuple<Tensor, Tensor> zero_collision_hash_cpu(
    const Tensor& input,
    Tensor& identities,
    int64_t max_probe,
    bool circular_probe,
    int64_t exp_hours,
    bool readonly,
    const std::optional<Tensor>& local_sizes,
    const std::optional<Tensor>& offsets,
    const std::optional<Tensor>& metadata,
    bool output_on_uvm,
    bool disable_fallback,
    bool _modulo_identity_DPRECATED,
    const std::optional<Tensor>& input_metadata,
    int64_t eviction_threshold,
    int64_t eviction_policy,
    int64_t opt_in_prob,
    int64_t num_reserved_slots,
    const std::optional<Tensor>& opt_in_rands,
    const std::optional<Tensor>& runtime_meta,
    const std::optional<Tensor>& counters) {
  // The same argument rules as fbgemm's kernels, with messages that say what was wrong.
  TORCH_CHECK(input.device().is_cpu() && identities.device().is_cpu(),
              "rayrec::zero_collision_hash is the CPU kernel; use "
              "torch.ops.fbgemm.zero_collision_hash on CUDA");
  TORCH_CHECK(input.dim() == 1, "rayrec::zero_collision_hash: input must be 1-D, got ",
              input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kLong || input.scalar_type() == at::kInt,
              "rayrec::zero_collision_hash: input must be int64 or int32, got ",
              input.scalar_type());
  TORCH_CHECK(identities.dim() == 2 && identities.size(1) == 1,
              "rayrec::zero_collision_hash: identities must have shape [N, 1], got ",
              identities.sizes());
  TORCH_CHECK(identities.scalar_type() == at::kLong || identities.scalar_type() == at::kInt,
              "rayrec::zero_collision_hash: identities must be int64 or int32, got ",
              identities.scalar_type());
  TORCH_CHECK(input.scalar_type() != at::kInt || identities.scalar_type() == at::kInt,
              "rayrec::zero_collision_hash: int32 input needs int32 identities");
  TORCH_CHECK(circular_probe, "rayrec::zero_collision_hash: circular_probe must be true");
  TORCH_CHECK(!output_on_uvm, "rayrec::zero_collision_hash: output_on_uvm is not supported");
  TORCH_CHECK(!_modulo_identity_DPRECATED,
              "rayrec::zero_collision_hash: _modulo_identity_DPRECATED must be false");
  TORCH_CHECK(max_probe >= 0, "rayrec::zero_collision_hash: max_probe must be >= 0");

  const int64_t batch = input.size(0);
  const int64_t num_rows = identities.size(0);
  check_vector(local_sizes, "local_sizes", at::kLong, batch);
  check_vector(offsets, "offsets", at::kLong, batch);
  check_vector(input_metadata, "input_metadata", at::kInt, batch);
  check_vector(opt_in_rands, "opt_in_rands", at::kInt, batch);
  check_rows(metadata, "metadata", at::kInt, num_rows);
  check_rows(runtime_meta, "runtime_meta", at::kLong, num_rows);
  if (counters.has_value()) {
    TORCH_CHECK(counters->device().is_cpu() && counters->scalar_type() == at::kLong &&
                    counters->dim() == 1 && counters->size(0) == kNumCounters &&
                    counters->is_contiguous(),
                "rayrec::zero_collision_hash: counters must be a contiguous CPU int64 tensor of "
                "shape [", kNumCounters, "], got ", counters->scalar_type(), " ",
                counters->sizes());
    counters->zero_();
  }
  TORCH_CHECK(local_sizes.has_value() == offsets.has_value(),
              "rayrec::zero_collision_hash: pass local_sizes and offsets together");

  if (input_metadata.has_value()) {
    TORCH_CHECK(exp_hours == -1, "rayrec::zero_collision_hash: input_metadata needs exp_hours=-1");
    TORCH_CHECK(eviction_threshold != -1,
                "rayrec::zero_collision_hash: input_metadata needs an eviction_threshold");
  }
  if (eviction_threshold != -1) {
    TORCH_CHECK(input_metadata.has_value(),
                "rayrec::zero_collision_hash: eviction_threshold needs input_metadata");
  }
  TORCH_CHECK(eviction_policy == 0 || eviction_policy == 1,
              "rayrec::zero_collision_hash: eviction_policy must be 0 (TTL) or 1 (LRU), got ",
              eviction_policy);

  const int64_t current_hour = (static_cast<int64_t>(std::time(nullptr)) / kSecondsPerHour) %
      static_cast<int64_t>(INT32_MAX);
  if (exp_hours > 0) {
    TORCH_CHECK(!input_metadata.has_value() && eviction_threshold == -1,
                "rayrec::zero_collision_hash: exp_hours excludes input_metadata/threshold");
    eviction_threshold = current_hour - exp_hours;  // deprecated form of a TTL threshold
  }
  const bool support_evict = !readonly && (eviction_threshold > 0 || eviction_policy > 0);
  TORCH_CHECK(support_evict == metadata.has_value(), "rayrec::zero_collision_hash: metadata ",
              support_evict ? "is required" : "must be None",
              " when eviction is ", support_evict ? "on" : "off",
              " (readonly=", readonly, ", eviction_threshold=", eviction_threshold,
              ", eviction_policy=", eviction_policy, ")");
  if (opt_in_prob != -1) {
    TORCH_CHECK(opt_in_prob > 0 && opt_in_prob <= 100,
                "rayrec::zero_collision_hash: opt_in_prob must be in [1, 100] or -1");
    TORCH_CHECK(num_reserved_slots > 0,
                "rayrec::zero_collision_hash: opt-in needs num_reserved_slots > 0");
    TORCH_CHECK(opt_in_prob != 100 || !opt_in_rands.has_value(),
                "rayrec::zero_collision_hash: opt_in_prob=100 takes no opt_in_rands");
  }
  if (num_reserved_slots != -1 || opt_in_rands.has_value()) {
    TORCH_CHECK(opt_in_prob != -1,
                "rayrec::zero_collision_hash: num_reserved_slots/opt_in_rands need opt_in_prob");
  }
  if (readonly) {
    // fbgemm's CPU readonly kernel accepts no write-side arguments.
    TORCH_CHECK(exp_hours == -1 && !input_metadata.has_value() && eviction_threshold == -1 &&
                    !opt_in_rands.has_value(),
                "rayrec::zero_collision_hash: readonly takes no eviction or opt-in arguments");
  }

  Tensor output = at::empty({batch}, input.options().dtype(at::kLong));
  Tensor evict_slots;  // undefined (None in Python) when eviction is off, as in fbgemm
  if (support_evict) {
    evict_slots = at::full({batch}, kEmptySlot, input.options().dtype(at::kLong));
  }
  if (batch == 0) {
    return {output, evict_slots};
  }

  const Tensor ids = input.contiguous();
  const auto sizes = contiguous_or_none(local_sizes);
  const auto offs = contiguous_or_none(offsets);
  const auto in_meta = contiguous_or_none(input_metadata);
  const auto rands = contiguous_or_none(opt_in_rands);
  const CallOptions options{
      max_probe,
      readonly,
      support_evict,
      disable_fallback,
      eviction_policy,
      static_cast<int32_t>(eviction_threshold),
      static_cast<int32_t>(current_hour),
      opt_in_prob,
      num_reserved_slots,
  };

  const Batch batch_inputs{
      pointer_or_null<int64_t>(sizes), pointer_or_null<int64_t>(offs),
      pointer_or_null<int32_t>(in_meta), pointer_or_null<int32_t>(rands)};
  int64_t* evict_out = support_evict ? evict_slots.data_ptr<int64_t>() : nullptr;
  Counts counts;
  AT_DISPATCH_SWITCH(
      identities.scalar_type(), "rayrec_zch_identity",
      AT_PRIVATE_CASE_TYPE_USING_HINT(at::kInt, identity_t, [&] {
        const auto table = make_table<identity_t>(identities, metadata, runtime_meta, readonly);
        AT_DISPATCH_SWITCH(
            ids.scalar_type(), "rayrec_zch_input",
            AT_PRIVATE_CASE_TYPE_USING_HINT(at::kInt, input_t, [&] {
              counts = hash_batch<input_t, identity_t>(
                  ids, table, options, batch_inputs, output.data_ptr<int64_t>(), evict_out);
            })
            AT_PRIVATE_CASE_TYPE_USING_HINT(at::kLong, input_t, [&] {
              counts = hash_batch<input_t, identity_t>(
                  ids, table, options, batch_inputs, output.data_ptr<int64_t>(), evict_out);
            }));
      })
      AT_PRIVATE_CASE_TYPE_USING_HINT(at::kLong, identity_t, [&] {
        const auto table = make_table<identity_t>(identities, metadata, runtime_meta, readonly);
        AT_DISPATCH_SWITCH(
            ids.scalar_type(), "rayrec_zch_input",
            AT_PRIVATE_CASE_TYPE_USING_HINT(at::kLong, input_t, [&] {
              counts = hash_batch<input_t, identity_t>(
                  ids, table, options, batch_inputs, output.data_ptr<int64_t>(), evict_out);
            }));
      }));
  if (counters.has_value()) {
    int64_t* out = counters->data_ptr<int64_t>();
    out[0] = counts.new_rows;
    out[1] = counts.owned;
    out[2] = counts.evictions;
    out[3] = counts.evicted_expiry_sum;
    out[4] = counts.parts;
  }

  if (support_evict) {
    // Unique and sorted, -1 removed: what fbgemm's torch::_unique(masked_select(...)) gives.
    evict_slots = std::get<0>(at::_unique(evict_slots.masked_select(evict_slots != kEmptySlot)));
  }
  return {output, evict_slots};
}

}  // namespace

// Same argument list and defaults as fbgemm::zero_collision_hash, plus alias annotations:
// identities, metadata and runtime_meta are written in place, which functionalization
// (torch.compile) must know about. One argument more at the end, `counters` (int64 [5],
// written when given): empty rows claimed, IDs owning their slot after their insert, eviction
// events, the evicted rows' summed metadata before eviction, and the parts the batch ran in.
TORCH_LIBRARY(rayrec, m) {
  m.def(
      "zero_collision_hash("
      "Tensor input, "
      "Tensor(a!) identities, "
      "int max_probe, "
      "bool circular_probe=False, "
      "int exp_hours=-1, "
      "bool readonly=False, "
      "Tensor? local_sizes=None, "
      "Tensor? offsets=None, "
      "Tensor(b!)? metadata=None, "
      "bool output_on_uvm=False, "
      "bool disable_fallback=False, "
      "bool _modulo_identity_DPRECATED=False, "
      "Tensor? input_metadata=None, "
      "int eviction_threshold=-1, "
      "int eviction_policy=0, "
      "int opt_in_prob=-1, "
      "int num_reserved_slots=-1, "
      "Tensor? opt_in_rands=None, "
      "Tensor(c!)? runtime_meta=None, "
      "Tensor(d!)? counters=None"
      ") -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rayrec, CPU, m) {
  m.impl("zero_collision_hash", TORCH_FN(zero_collision_hash_cpu));
}

}  // namespace rayrec
