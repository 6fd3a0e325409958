// A launch of the CPU kernel: the tensors of one dtype, the chunks that divide them, and the program to apply.
#pragma once

#include <cstdint>
#include <vector>

#include "hiso/zo_round.h"

namespace hiso {
namespace cpu {

// The undo-log entries of one chunk: the elements that the program's simulated rounds do not bring back to their
// stored bits, as positions in the chunk (global index 4 g_begin + pos, below 2^14 + 2^2) and the stored bits from
// before the program (v32 for fp32, v16 for bf16 / fp16).
struct ChunkLog {
  int64_t chunk = 0;  // index in the launch's chunk table
  int64_t slot = 0;
  uint64_t g_begin = 0;
  std::vector<uint16_t> pos;
  std::vector<uint32_t> v32;
  std::vector<uint16_t> v16;
};

struct Job {
  const int64_t* slots;   // [n_slots, 4]: x address, H address (0 without H), numel, global offset of element 0
  const int64_t* chunks;  // [n_chunks, 2]: slot index, first global group of the chunk
  int64_t n_chunks;
  int64_t groups_per_chunk;
  int dtype;
  bool has_h;
  int rule;
  int distribution;
  int num_threads;
  Program prog;
  // Logged run: rounds [0, n_apply) are applied and stored, rounds [n_apply, n_rounds) are simulated in registers
  // and every element whose simulated bits differ from its stored bits before the program goes to log[chunk].
  // log == nullptr: an ordinary run (n_apply is ignored).
  int64_t n_apply = 0;
  ChunkLog* log = nullptr;
  // Patched run (an ordinary run that finishes a logged chain): patch[chunk] is that chunk's undo log or nullptr;
  // before round n_patch (after the last round if n_patch == n_rounds) every logged element takes its saved
  // value. Rounds [0, n_patch) complete the chain, which brings every other element back to its bits, so rounds
  // [n_patch, n_rounds) start from the exact original tensors: restore and update in one pass, no sparse fix-up.
  const ChunkLog* const* patch = nullptr;
  int64_t n_patch = 0;
};

// One definition per instruction set (see zo_cpu_isa_*.cpp).
#define HISO_DECLARE_ISA(isa)                                                                                 \
  namespace isa {                                                                                             \
  void run_job(const Job& job);                                                                               \
  void fill_directions(uint64_t seed, uint32_t p, int64_t start, int64_t n, int distribution, float* out,     \
                       int num_threads);                                                                      \
  void round_storage(const float* y, void* out, int64_t start, int64_t n, int dtype, int64_t rseed);          \
  double directions_sum(uint64_t seed, int n_dirs, int64_t start, int64_t n, int distribution, int num_threads); \
  void advance_log(const Job& job, std::vector<ChunkLog>& logs);                                              \
  }

HISO_DECLARE_ISA(generic)
#if defined(__x86_64__)
HISO_DECLARE_ISA(avx2)
HISO_DECLARE_ISA(avx512)
#endif
#undef HISO_DECLARE_ISA

}  // namespace cpu
}  // namespace hiso
