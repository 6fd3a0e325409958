// Host-side entry points of the CUDA kernels (implemented in zo_cuda.cu, bound to Python in zo_cuda_module.cpp).
//
// All pointers are device pointers except where noted; `stream` is a cudaStream_t (the caller's current stream).
// Functions throw std::runtime_error with the CUDA error string on failure.
#pragma once

#include <cstdint>
#include <string>

#include "hiso/zo_round.h"

namespace hiso {
namespace cuda {

//: one thread per group of four elements, one block per chunk
constexpr int kGroupsPerChunk = 256;

// Apply `prog` to the tensors of one dtype described by `slots` ([n, 4]) and `chunks` ([n_chunks, 2]),
// chunks of kGroupsPerChunk groups (see hiso_kernels/backends/base.py: LaunchPlan).
void launch_program(const int64_t* slots, const int64_t* chunks, int64_t n_chunks, int dtype, bool has_h, int rule,
                    int distribution, const Program& prog, void* stream);

// The undo log of a logged launch (device pointers): rounds [0, n_apply) are stored, the rest only simulated, and
// every element whose simulated end differs in bits from its stored value goes to (index: global index, value: the
// stored bits, uint32 for fp32 and uint16 for bf16 / fp16). Each warp reserves its entries with one atomic add on
// counts[0]; counts[1] counts the entries written. A warp whose entries do not fit in `capacity` writes neither
// them nor its x and sets skip[warp] (warp = chunk * kWarpsPerChunk + warp in block): the caller redoes those
// elements on the fallback path.
struct LogArgs {
  int64_t* index;
  void* value;
  unsigned long long* counts;
  int8_t* skip;
  int64_t capacity;
  int64_t n_apply;
};
constexpr int kWarpsPerChunk = kGroupsPerChunk / 32;

// launch_program's logged variant (no H update; 1 <= n_apply < prog.n_rounds).
void launch_logged(const int64_t* slots, const int64_t* chunks, int64_t n_chunks, int dtype, bool has_h,
                   int distribution, const Program& prog, const LogArgs& log, void* stream);

// out[i] = u(seed, p, start + i) for i < n (fp32).
void launch_directions(uint64_t seed, uint32_t p, int64_t start, int64_t n, int distribution, float* out,
                       void* stream);

// Generator-only kernel for benchmarks: partial[b] = sum over the block's elements j and over p < n_dirs of
// u(seed, p, start + j). Writes ceil(n / (4 kGroupsPerChunk)) partial sums.
void launch_directions_sum(uint64_t seed, int n_dirs, int64_t start, int64_t n, int distribution, float* partial,
                           void* stream);

int device_count();

// "" if the kernels can run on `device` (its architecture is in this build and the driver can load it), else the
// CUDA error. Sets *binary_version (e.g. 90) on success. Launches nothing.
std::string probe_device(int device, int* binary_version);
std::string runtime_version();

}  // namespace cuda
}  // namespace hiso
