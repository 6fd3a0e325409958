// A launch of the CPU kernel: the tensors of one dtype, the chunks that divide them, and the program to apply.
#pragma once

#include <cstdint>

#include "hiso/zo_round.h"

namespace hiso {
namespace cpu {

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
};

// One definition per instruction set (see zo_cpu_isa_*.cpp).
#define HISO_DECLARE_ISA(isa)                                                                                 \
  namespace isa {                                                                                             \
  void run_job(const Job& job);                                                                               \
  void fill_directions(uint64_t seed, uint32_t p, int64_t start, int64_t n, int distribution, float* out,     \
                       int num_threads);                                                                      \
  void round_storage(const float* y, void* out, int64_t start, int64_t n, int dtype, int64_t rseed);          \
  double directions_sum(uint64_t seed, int n_dirs, int64_t start, int64_t n, int distribution, int num_threads); \
  }

HISO_DECLARE_ISA(generic)
#if defined(__x86_64__)
HISO_DECLARE_ISA(avx2)
HISO_DECLARE_ISA(avx512)
#endif
#undef HISO_DECLARE_ISA

}  // namespace cpu
}  // namespace hiso
