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
