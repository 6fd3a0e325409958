// CUDA kernels of the fused zeroth-order round (docs/kernels.md).
//
// The element arithmetic is the same header code as the CPU backend (hiso/zo_round.h), compiled with -fmad=false
// and explicit __fdiv_rn / __fsqrt_rn, so results are bit-identical to the CPU, Triton and torch backends.
// One thread owns one group of four consecutive elements (one Philox call per term), one block owns one chunk of
// kGroupsPerChunk groups of one tensor; the chunk table makes a whole parameter list a single launch.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "zo_cuda.h"

namespace hiso {
namespace cuda {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("hiso CUDA: ") + what + ": " + cudaGetErrorString(err));
  }
}

template <class Raw>
struct Vec4;
template <>
struct alignas(16) Vec4<float> {
  float v[4];
};
template <>
struct alignas(8) Vec4<uint16_t> {
  uint16_t v[4];
};

__device__ __forceinline__ uint32_t raw_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t raw_bits(uint16_t v) { return v; }
template <class Raw>
__device__ __forceinline__ Raw from_bits(uint32_t b);
template <>
__device__ __forceinline__ float from_bits<float>(uint32_t b) {
  return __uint_as_float(b);
}
template <>
__device__ __forceinline__ uint16_t from_bits<uint16_t>(uint32_t b) {
  return static_cast<uint16_t>(b);
}

// The body of both kernels. LOG: a logged launch (see LogArgs in zo_cuda.h); RULE is then kRuleNone. Its threads
// outside the tensor stay to the end (the warp's reservation needs all 32 lanes).
template <class S, bool HAS_H, int RULE, int DIST, bool LOG>
__device__ __forceinline__ void program_body(const int64_t* __restrict__ slots, const int64_t* __restrict__ chunks,
                                             const Program& prog, const LogArgs& log) {
  using Raw = typename S::Raw;
  const int64_t chunk = blockIdx.x;
  const int64_t slot = chunks[2 * chunk];
  const uint64_t g = static_cast<uint64_t>(chunks[2 * chunk + 1]) + threadIdx.x;
  const int64_t* s = slots + 4 * slot;
  Raw* __restrict__ x = reinterpret_cast<Raw*>(s[0]);
  float* __restrict__ h = reinterpret_cast<float*>(s[1]);
  const int64_t numel = s[2];
  const int64_t offset = s[3];
  const int64_t local0 = static_cast<int64_t>(4 * g) - offset;
  const bool active = !(local0 >= numel || local0 + 4 <= 0);
  if (!LOG && !active) return;  // this thread's group lies outside the tensor
  const bool full = local0 >= 0 && local0 + 4 <= numel;
  // Whole aligned groups move as one 8- or 16-byte access.
  const bool vec = full && (reinterpret_cast<uintptr_t>(x + local0) % sizeof(Vec4<Raw>) == 0) &&
                   (!HAS_H || reinterpret_cast<uintptr_t>(h + local0) % 16 == 0);

  float xv[4], hv[4];
  Raw raw[4];
  if (vec) {
    const Vec4<Raw> xr = *reinterpret_cast<const Vec4<Raw>*>(x + local0);
#pragma unroll
    for (int l = 0; l < 4; ++l) xv[l] = S::load(xr.v[l]);
    if (HAS_H) {
      const float4 hr = *reinterpret_cast<const float4*>(h + local0);
      hv[0] = hr.x;
      hv[1] = hr.y;
      hv[2] = hr.z;
      hv[3] = hr.w;
    } else {
#pragma unroll
      for (int l = 0; l < 4; ++l) hv[l] = 1.0f;
    }
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t i = local0 + l;
      const bool in = i >= 0 && i < numel;
      xv[l] = in ? S::load(x[i]) : 0.0f;
      hv[l] = (HAS_H && in) ? h[i] : 1.0f;
    }
  }

  uint32_t app[4] = {0u, 0u, 0u, 0u};  // LOG: the stored bits after the applied rounds (n_apply >= 1 sets them)

  int64_t last_seed = -1, last_dir = -1;  // a term with the previous term's direction reuses its values
  float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t r = 0; r < prog.n_rounds; ++r) {
    if (LOG && r == log.n_apply) {
#pragma unroll
      for (int l = 0; l < 4; ++l) app[l] = S::kRoundsDown ? raw_bits(raw[l]) : raw_bits(xv[l]);
    }
    float ax[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float ah[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int64_t t_end = __ldg(prog.round_start + r + 1);
    for (int64_t t = __ldg(prog.round_start + r); t < t_end; ++t) {
      const int64_t seed = __ldg(prog.seeds + t);
      const int64_t dir = __ldg(prog.dirs + t);
      if (seed != last_seed || dir != last_dir) {
        last_seed = seed;
        last_dir = dir;
        group_directions<DIST>(direction_words(static_cast<uint64_t>(seed), static_cast<uint32_t>(dir), g), z);
      }
      const float a = __ldg(prog.coef_x + t);
      const float b = (RULE != kRuleNone) ? __ldg(prog.coef_h + t) : 0.0f;
#pragma unroll
      for (int l = 0; l < 4; ++l) accumulate_term<RULE>(z[l], a, b, ax[l], ah[l]);
    }
    const float wd = __ldg(prog.round_wd + r);
    float y[4];
    if (RULE != kRuleNone && (__ldg(prog.round_flags + r) & kRoundUpdatesH) != 0) {
#pragma unroll
      for (int l = 0; l < 4; ++l) y[l] = finish_round<HAS_H, RULE>(xv[l], hv[l], ax[l], ah[l], wd, prog);
    } else {
#pragma unroll
      for (int l = 0; l < 4; ++l) y[l] = finish_round<HAS_H, kRuleNone>(xv[l], hv[l], ax[l], ah[l], wd, prog);
    }
    if (S::kRoundsDown) {
      const int64_t rseed = __ldg(prog.round_rseed + r);
      if (rseed >= 0) {
        const Philox4 rw = rounding_words(static_cast<uint64_t>(rseed), g);
#pragma unroll
        for (int l = 0; l < 4; ++l) raw[l] = S::round_stochastic(y[l], rw.v[l], xv[l]);
      } else {
#pragma unroll
        for (int l = 0; l < 4; ++l) raw[l] = S::round_nearest(y[l], xv[l]);
      }
    } else {
#pragma unroll
      for (int l = 0; l < 4; ++l) xv[l] = y[l];
    }
  }

  if (!S::kRoundsDown) {
#pragma unroll
    for (int l = 0; l < 4; ++l) raw[l] = static_cast<Raw>(xv[l]);
  }
  if (LOG) {
    // the stored bits from before the run, read again (x is written only below; fewer registers live in the loop)
    uint32_t orig[4];
    int bad[4];
    int count = 0;
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t i = local0 + l;
      const bool in = i >= 0 && i < numel;
      orig[l] = in ? raw_bits(x[i]) : 0u;
      bad[l] = (in && raw_bits(raw[l]) != orig[l]) ? 1 : 0;
      count += bad[l];
    }
    const int lane = threadIdx.x & 31;
    int incl = count;  // inclusive prefix sum of the counts over the warp
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xFFFFFFFFu, incl, d);
      if (lane >= d) incl += v;
    }
    const int total = __shfl_sync(0xFFFFFFFFu, incl, 31);
    unsigned long long base = 0;
    if (lane == 0 && total > 0) base = atomicAdd(log.counts, static_cast<unsigned long long>(total));
    // broadcast as two 32-bit halves (the 64-bit __shfl_sync overload goes through a stack slot)
    const unsigned int lo = __shfl_sync(0xFFFFFFFFu, static_cast<unsigned int>(base), 0);
    const unsigned int hi = __shfl_sync(0xFFFFFFFFu, static_cast<unsigned int>(base >> 32), 0);
    base = (static_cast<unsigned long long>(hi) << 32) | lo;
    const bool fits = base + static_cast<unsigned long long>(total) <= static_cast<unsigned long long>(log.capacity);
    if (!fits) {
      if (lane == 0) log.skip[chunk * kWarpsPerChunk + (threadIdx.x >> 5)] = 1;
      return;  // the warp's elements stay as they were
    }
    if (lane == 0 && total > 0) atomicAdd(log.counts + 1, static_cast<unsigned long long>(total));
    int64_t at = static_cast<int64_t>(base) + incl - count;
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (bad[l]) {
        log.index[at] = offset + local0 + l;
        if (sizeof(Raw) == 4) {
          static_cast<uint32_t*>(log.value)[at] = orig[l];
        } else {
          static_cast<uint16_t*>(log.value)[at] = static_cast<uint16_t>(orig[l]);
        }
        ++at;
      }
      raw[l] = from_bits<Raw>(app[l]);
    }
    if (!active) return;
  }
  constexpr bool kWritesH = HAS_H && RULE != kRuleNone && !LOG;
  if (vec) {
    Vec4<Raw> xr;
#pragma unroll
    for (int l = 0; l < 4; ++l) xr.v[l] = raw[l];
    *reinterpret_cast<Vec4<Raw>*>(x + local0) = xr;
    if (kWritesH) *reinterpret_cast<float4*>(h + local0) = make_float4(hv[0], hv[1], hv[2], hv[3]);
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t i = local0 + l;
      if (i >= 0 && i < numel) {
        x[i] = raw[l];
        if (kWritesH) h[i] = hv[l];
      }
    }
  }
}

template <class S, bool HAS_H, int RULE, int DIST>
__global__ void __launch_bounds__(kGroupsPerChunk)
    zo_program_kernel(const int64_t* __restrict__ slots, const int64_t* __restrict__ chunks, Program prog) {
  program_body<S, HAS_H, RULE, DIST, false>(slots, chunks, prog, LogArgs{});
}

// The logged variant. Minimum one block per SM: ptxas may then use the few more registers the log's state needs
// (with the default it spilled 8 bytes in some variants).
template <class S, bool HAS_H, int DIST>
__global__ void __launch_bounds__(kGroupsPerChunk, 1)
    zo_logged_kernel(const int64_t* __restrict__ slots, const int64_t* __restrict__ chunks, Program prog,
                     LogArgs log) {
  program_body<S, HAS_H, kRuleNone, DIST, true>(slots, chunks, prog, log);
}

template <int DIST>
__global__ void __launch_bounds__(kGroupsPerChunk)
    directions_kernel(uint64_t seed, uint32_t p, int64_t start, int64_t n, float* __restrict__ out) {
  const uint64_t g = (static_cast<uint64_t>(start) >> 2) + static_cast<uint64_t>(blockIdx.x) * kGroupsPerChunk +
                     threadIdx.x;
  const int64_t local0 = static_cast<int64_t>(4 * g) - start;
  if (local0 >= n) return;
  float z[4];
  group_directions<DIST>(direction_words(seed, p, g), z);
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    const int64_t i = local0 + l;
    if (i >= 0 && i < n) out[i] = z[l];
  }
}

template <int DIST>
__global__ void __launch_bounds__(kGroupsPerChunk) directions_sum_kernel(uint64_t seed, int n_dirs, int64_t start,
                                                                         int64_t n, float* __restrict__ partial) {
  __shared__ float warp_sums[kGroupsPerChunk / 32];
  const uint64_t g = (static_cast<uint64_t>(start) >> 2) + static_cast<uint64_t>(blockIdx.x) * kGroupsPerChunk +
                     threadIdx.x;
  const int64_t local0 = static_cast<int64_t>(4 * g) - start;
  float acc = 0.0f;
  if (local0 < n) {
    for (int p = 0; p < n_dirs; ++p) {
      float z[4];
      group_directions<DIST>(direction_words(seed, static_cast<uint32_t>(p), g), z);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const int64_t i = local0 + l;
        acc += (i >= 0 && i < n) ? z[l] : 0.0f;
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xFFFFFFFFu, acc, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kGroupsPerChunk / 32; ++w) total += warp_sums[w];
    partial[blockIdx.x] = total;
  }
}

template <class S, bool HAS_H, int RULE>
void launch_dist(const int64_t* slots, const int64_t* chunks, int64_t n_chunks, int distribution,
                 const Program& prog, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(n_chunks));
  if (distribution == kGaussian) {
    zo_program_kernel<S, HAS_H, RULE, kGaussian><<<grid, kGroupsPerChunk, 0, stream>>>(slots, chunks, prog);
  } else {
    zo_program_kernel<S, HAS_H, RULE, kRademacher><<<grid, kGroupsPerChunk, 0, stream>>>(slots, chunks, prog);
  }
}

template <class S, bool HAS_H>
void launch_logged_dist(const int64_t* slots, const int64_t* chunks, int64_t n_chunks, int distribution,
                        const Program& prog, const LogArgs& log, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(n_chunks));
  if (distribution == kGaussian) {
    zo_logged_kernel<S, HAS_H, kGaussian><<<grid, kGroupsPerChunk, 0, stream>>>(slots, chunks, prog, log);
  } else {
    zo_logged_kernel<S, HAS_H, kRademacher><<<grid, kGroupsPerChunk, 0, stream>>>(slots, chunks, prog, log);
  }
}

template <class S>
void launch_logged_storage(const int64_t* slots, const int64_t* chunks, int64_t n_chunks, bool has_h,
                           int distribution, const Program& prog, const LogArgs& log, cudaStream_t stream) {
  if (has_h) {
    launch_logged_dist<S, true>(slots, chunks, n_chunks, distribution, prog, log, stream);
  } else {
    launch_logged_dist<S, false>(slots, chunks, n_chunks, distribution, prog, log, stream);
  }
}

template <class S>
void launch_storage(const int64_t* slots, const int64_t* chunks, int64_t n_chunks, bool has_h, int rule,
                    int distribution, const Program& prog, cudaStream_t stream) {
  if (!has_h) {
    launch_dist<S, false, kRuleNone>(slots, chunks, n_chunks, distribution, prog, stream);
  } else if (rule == kRuleGsq) {
    launch_dist<S, true, kRuleGsq>(slots, chunks, n_chunks, distribution, prog, stream);
  } else if (rule == kRuleStein) {
    launch_dist<S, true, kRuleStein>(slots, chunks, n_chunks, distribution, prog, stream);
  } else {
    launch_dist<S, true, kRuleNone>(slots, chunks, n_chunks, distribution, prog, stream);
  }
}

unsigned int blocks_for(int64_t start, int64_t n) {
  const int64_t groups = ((start + n + 3) >> 2) - (start >> 2);
  const int64_t blocks = (groups + kGroupsPerChunk - 1) / kGroupsPerChunk;
  if (blocks > 0x7FFFFFFF) throw std::invalid_argument("hiso CUDA: range too large for one launch");
  return static_cast<unsigned int>(blocks);
}

// Calls f(Store{}) with the storage type of a dtype code (every launcher dispatches the same way).
template <class F>
void with_storage(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32:
      f(StoreF32{});
      break;
    case kBFloat16:
      f(StoreBF16{});
      break;
    case kFloat16:
      f(StoreF16{});
      break;
    default:
      throw std::invalid_argument("hiso CUDA: unknown dtype code");
  }
}

}  // namespace

void launch_program(const int64_t* slots, const int64_t* chunks, int64_t n_chunks, int dtype, bool has_h, int rule,
                    int distribution, const Program& prog, void* stream_ptr) {
  if (n_chunks <= 0) return;
  if (n_chunks > 0x7FFFFFFF) throw std::invalid_argument("hiso CUDA: too many chunks for one launch");
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  with_storage(dtype, [&](auto store) {
    launch_storage<decltype(store)>(slots, chunks, n_chunks, has_h, rule, distribution, prog, stream);
  });
  check(cudaGetLastError(), "zo_program_kernel launch");
}

void launch_logged(const int64_t* slots, const int64_t* chunks, int64_t n_chunks, int dtype, bool has_h,
                   int distribution, const Program& prog, const LogArgs& log, void* stream_ptr) {
  if (n_chunks <= 0) return;
  if (n_chunks > 0x7FFFFFFF) throw std::invalid_argument("hiso CUDA: too many chunks for one launch");
  if (log.n_apply < 1 || log.n_apply >= prog.n_rounds)
    throw std::invalid_argument("hiso CUDA: a logged launch needs 1 <= n_apply < n_rounds");
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  with_storage(dtype, [&](auto store) {
    launch_logged_storage<decltype(store)>(slots, chunks, n_chunks, has_h, distribution, prog, log, stream);
  });
  check(cudaGetLastError(), "zo_logged_kernel launch");
}

void launch_directions(uint64_t seed, uint32_t p, int64_t start, int64_t n, int distribution, float* out,
                       void* stream_ptr) {
  if (n <= 0) return;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const unsigned int blocks = blocks_for(start, n);
  if (distribution == kGaussian) {
    directions_kernel<kGaussian><<<blocks, kGroupsPerChunk, 0, stream>>>(seed, p, start, n, out);
  } else {
    directions_kernel<kRademacher><<<blocks, kGroupsPerChunk, 0, stream>>>(seed, p, start, n, out);
  }
  check(cudaGetLastError(), "directions_kernel launch");
}

void launch_directions_sum(uint64_t seed, int n_dirs, int64_t start, int64_t n, int distribution, float* partial,
                           void* stream_ptr) {
  if (n <= 0) return;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const unsigned int blocks = blocks_for(start, n);
  if (distribution == kGaussian) {
    directions_sum_kernel<kGaussian><<<blocks, kGroupsPerChunk, 0, stream>>>(seed, n_dirs, start, n, partial);
  } else {
    directions_sum_kernel<kRademacher><<<blocks, kGroupsPerChunk, 0, stream>>>(seed, n_dirs, start, n, partial);
  }
  check(cudaGetLastError(), "directions_sum_kernel launch");
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error
    return 0;
  }
  return n;
}

std::string probe_device(int device, int* binary_version) {
  *binary_version = 0;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return cudaGetErrorString(err);  // no driver, or a driver too old for this runtime
  }
  if (device < 0 || device >= count) return "no such device";
  int previous = 0;
  if ((err = cudaGetDevice(&previous)) != cudaSuccess || (err = cudaSetDevice(device)) != cudaSuccess) {
    cudaGetLastError();
    return cudaGetErrorString(err);
  }
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, zo_program_kernel<StoreBF16, true, kRuleGsq, kGaussian>);
  cudaSetDevice(previous);
  if (err != cudaSuccess) {
    cudaGetLastError();  // e.g. "no kernel image is available for execution on the device"
    return cudaGetErrorString(err);
  }
  *binary_version = attr.binaryVersion;
  return "";
}

std::string runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

}  // namespace cuda
}  // namespace hiso
