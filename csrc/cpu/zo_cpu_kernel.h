// CPU implementation of the fused zeroth-order round (docs/kernels.md), written to auto-vectorise.
//
// This header is compiled once per instruction set (zo_cpu_isa_*.cpp defines HISO_CPU_ISA and a target pragma) and
// the module picks the best one at run time. The arithmetic lives in the shared headers; this file only arranges it
// in tiles of 64 elements (16 Philox groups) whose loops are branch-free so that GCC and Clang turn them into SIMD
// code. Tiles are aligned to the global group index, so a tile never depends on where a tensor starts.
#pragma once

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "hiso/zo_round.h"
#include "zo_cpu_job.h"

namespace hiso {
namespace cpu {
namespace HISO_CPU_ISA {

// Local min / max: std:: templates instantiated under different target pragmas would share one COMDAT symbol, and
// the linker could hand the AVX-512 copy to the baseline build.
template <class T>
static inline T lesser(T a, T b) {
  return a < b ? a : b;
}
template <class T>
static inline T greater(T a, T b) {
  return a < b ? b : a;
}

constexpr int kTileGroups = 16;
constexpr int kTile = 4 * kTileGroups;

// Philox words of 16 consecutive groups in structure-of-arrays form.
struct TileWords {
  alignas(32) uint32_t w[4][kTileGroups];
};

#if defined(HISO_CPU_AVX2)
// Philox4x32-10 of 16 consecutive groups, eight lanes at a time, written with AVX2 intrinsics: GCC vectorises the
// portable loop below by widening every 32 x 32 -> 64-bit multiply to 64-bit lanes and packing the halves back with
// cross-lane permutes (vpshufd / vperm2i128 were half of the generator's time). Here the products of the even and
// the odd lanes come from two vpmuludq and are split into high and low words with shifts and blends, in lane.
// Integer arithmetic throughout: the same words as philox4x32_10, bit for bit (the known-answer tests check).
static inline void mul_wide(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0, 2, 4, 6 as 64-bit products
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

static inline void tile_words(uint32_t c2, uint32_t c3, uint64_t key, uint64_t g0, TileWords& out) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int half = 0; half < kTileGroups / 8; ++half) {
    alignas(32) uint32_t lo_g[8], hi_g[8];
    for (int i = 0; i < 8; ++i) {
      const uint64_t g = g0 + static_cast<uint64_t>(8 * half + i);
      lo_g[i] = static_cast<uint32_t>(g);
      hi_g[i] = static_cast<uint32_t>(g >> 32);
    }
    __m256i c0v = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo_g));
    __m256i c1v = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi_g));
    __m256i c2v = _mm256_set1_epi32(static_cast<int>(c2));
    __m256i c3v = _mm256_set1_epi32(static_cast<int>(c3));
    uint32_t k0 = static_cast<uint32_t>(key);
    uint32_t k1 = static_cast<uint32_t>(key >> 32);
    for (int r = 0; r < 10; ++r) {
      __m256i hi0, lo0, hi1, lo1;
      mul_wide(c0v, m0, hi0, lo0);
      mul_wide(c2v, m1, hi1, lo1);
      const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1v), _mm256_set1_epi32(static_cast<int>(k0)));
      const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3v), _mm256_set1_epi32(static_cast<int>(k1)));
      c1v = lo1;
      c3v = lo0;
      c0v = n0;
      c2v = n2;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(&out.w[0][8 * half]), c0v);
    _mm256_store_si256(reinterpret_cast<__m256i*>(&out.w[1][8 * half]), c1v);
    _mm256_store_si256(reinterpret_cast<__m256i*>(&out.w[2][8 * half]), c2v);
    _mm256_store_si256(reinterpret_cast<__m256i*>(&out.w[3][8 * half]), c3v);
  }
}
#else
static inline void tile_words(uint32_t c2, uint32_t c3, uint64_t key, uint64_t g0, TileWords& out) {
  const uint32_t k0 = static_cast<uint32_t>(key);
  const uint32_t k1 = static_cast<uint32_t>(key >> 32);
#pragma omp simd
  for (int i = 0; i < kTileGroups; ++i) {
    const uint64_t g = g0 + static_cast<uint64_t>(i);
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), c2, c3, k0, k1);
    out.w[0][i] = r.v[0];
    out.w[1][i] = r.v[1];
    out.w[2][i] = r.v[2];
    out.w[3][i] = r.v[3];
  }
}
#endif

// u[4 i + l] = direction value of element 4 (g0 + i) + l.
template <int DIST>
static inline void tile_directions(uint64_t seed, uint32_t p, uint64_t g0, float* __restrict u) {
  TileWords tw;
  tile_words(p, kTagDirection, seed, g0, tw);
  float z[4][kTileGroups];
  if (DIST == kGaussian) {
#pragma omp simd
    for (int i = 0; i < kTileGroups; ++i) {
      gaussian_pair(tw.w[0][i], tw.w[1][i], z[0][i], z[1][i]);
      gaussian_pair(tw.w[2][i], tw.w[3][i], z[2][i], z[3][i]);
    }
  } else {
#pragma omp simd
    for (int i = 0; i < kTileGroups; ++i) {
      z[0][i] = rademacher(tw.w[0][i]);
      z[1][i] = rademacher(tw.w[1][i]);
      z[2][i] = rademacher(tw.w[2][i]);
      z[3][i] = rademacher(tw.w[3][i]);
    }
  }
  for (int i = 0; i < kTileGroups; ++i) {
    u[4 * i + 0] = z[0][i];
    u[4 * i + 1] = z[1][i];
    u[4 * i + 2] = z[2][i];
    u[4 * i + 3] = z[3][i];
  }
}

static inline void tile_rounding_bits(uint64_t rseed, uint64_t g0, uint32_t* __restrict bits) {
  TileWords tw;
  tile_words(0u, kTagRounding, rseed, g0, tw);
  for (int i = 0; i < kTileGroups; ++i) {
    bits[4 * i + 0] = tw.w[0][i];
    bits[4 * i + 1] = tw.w[1][i];
    bits[4 * i + 2] = tw.w[2][i];
    bits[4 * i + 3] = tw.w[3][i];
  }
}

// Stored bits of a value for the undo-log comparison (fp32: its bit pattern; bf16 / fp16: the raw 16 bits).
static inline uint32_t stored_bits(float v) { return float_to_bits(v); }
static inline uint32_t stored_bits(uint16_t v) { return v; }

// Bit l of the result is flags[l] (each 0 or 1): eight bytes at a time, one multiply gathers byte i's low bit into
// bit 56 + i (the partial products of other bytes land at distinct bits below 56 or above 63, so nothing carries).
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "pack_lane_flags reads eight flags as one little-endian word");
static inline uint64_t pack_lane_flags(const uint8_t* flags) {
  uint64_t mask = 0;
  for (int k = 0; k < kTile / 8; ++k) {
    uint64_t eight;
    std::memcpy(&eight, flags + 8 * k, 8);
    mask |= ((eight * 0x0102040810204080ull) >> 56) << (8 * k);
  }
  return mask;
}

// Lanes [lo, hi) of a tile (the part inside the tensor and the chunk).
static inline uint64_t lane_range(int lo, int hi) {
  const uint64_t below_hi = hi >= kTile ? ~0ull : (1ull << hi) - 1;
  return below_hi & ~((1ull << lo) - 1);
}

// A thread's staging area for one chunk's undo log (positions and stored bits), sized for a whole chunk, so that
// appending is a store; the chunk's ChunkLog gets an exact-size copy at the end.
struct LogScratch {
  std::vector<uint16_t> pos;
  std::vector<uint32_t> bits;
  void reserve(int64_t n) {
    if (static_cast<int64_t>(pos.size()) < n) {
      pos.resize(static_cast<size_t>(n));
      bits.resize(static_cast<size_t>(n));
    }
  }
};

static inline LogScratch& thread_scratch() {
  static thread_local LogScratch scratch;
  return scratch;
}

// One chunk: groups [g_begin, g_end) of one tensor, all rounds of the program, one read and one write per element.
// A term with the same (seed, direction) as the term before it reuses its values (the chain +mu, -mu, -mu, +mu of a
// perturbation and its restore draws the direction once). LOG: rounds from job.n_apply on are simulated, not stored,
// and the elements they do not bring back to their original bits are recorded in job.log[chunk].
template <class S, bool HAS_H, int RULE, int DIST, bool LOG>
static void process_chunk(const Job& job, int64_t chunk) {
  using Raw = typename S::Raw;
  const Program& prog = job.prog;
  const int64_t slot = job.chunks[2 * chunk];
  const uint64_t g_begin = static_cast<uint64_t>(job.chunks[2 * chunk + 1]);
  const int64_t* s = job.slots + 4 * slot;
  Raw* __restrict x = reinterpret_cast<Raw*>(static_cast<intptr_t>(s[0]));
  float* __restrict h = reinterpret_cast<float*>(static_cast<intptr_t>(s[1]));
  const int64_t numel = s[2];
  const int64_t offset = s[3];
  const uint64_t g_last = static_cast<uint64_t>(offset + numel - 1) >> 2;
  const uint64_t g_end = lesser<uint64_t>(g_begin + static_cast<uint64_t>(job.groups_per_chunk), g_last + 1);
  const int64_t n_store = LOG ? job.n_apply : prog.n_rounds;  // rounds applied before the store

  alignas(64) float xv[kTile];
  alignas(64) float hv[kTile];
  alignas(64) float ax[kTile];
  alignas(64) float ah[kTile];
  alignas(64) float u[kTile];
  alignas(64) float y[kTile];
  alignas(64) float sv[kTile];  // sqrt(H) while no round changes H
  alignas(64) uint32_t rbits[kTile];
  alignas(64) Raw raw[kTile];
  alignas(64) Raw x0[kTile];  // LOG: the stored values before the program
  ChunkLog* log = LOG ? job.log + chunk : nullptr;
  LogScratch* scratch = LOG ? &thread_scratch() : nullptr;
  int64_t n_logged = 0;
  const ChunkLog* patch = (!LOG && job.patch != nullptr) ? job.patch[chunk] : nullptr;
  size_t patch_next = 0;  // the patch's next entry (entries are in position order)
  if (LOG) {
    log->chunk = chunk;
    log->slot = slot;
    log->g_begin = g_begin;
    scratch->reserve(4 * job.groups_per_chunk);
  }

  for (uint64_t g0 = g_begin; g0 < g_end; g0 += kTileGroups) {
    const int64_t local0 = static_cast<int64_t>(4 * g0) - offset;  // tensor position of the tile's first element
    const int lo = static_cast<int>(greater<int64_t>(0, -local0));
    const int hi = static_cast<int>(
        lesser<int64_t>(lesser<int64_t>(kTile, numel - local0), static_cast<int64_t>(4 * (g_end - g0))));
    const bool full = lo == 0 && hi == kTile;  // interior tiles: fixed trip counts, so the loops vectorise
    if (full) {
      const Raw* __restrict xs = x + local0;
#pragma omp simd
      for (int l = 0; l < kTile; ++l) xv[l] = S::load(xs[l]);
      if (LOG) {
#pragma omp simd
        for (int l = 0; l < kTile; ++l) x0[l] = xs[l];
      }
      if (HAS_H) {
        const float* __restrict hs = h + local0;
#pragma omp simd
        for (int l = 0; l < kTile; ++l) hv[l] = hs[l];
      }
    } else {
      for (int l = 0; l < kTile; ++l) {
        xv[l] = 0.0f;
        hv[l] = 1.0f;
      }
      for (int l = lo; l < hi; ++l) xv[l] = S::load(x[local0 + l]);
      if (LOG) {
        for (int l = 0; l < kTile; ++l) x0[l] = Raw{};  // lanes outside the tensor: compared, never logged
        for (int l = lo; l < hi; ++l) x0[l] = x[local0 + l];
      }
      if (HAS_H) {
        for (int l = lo; l < hi; ++l) hv[l] = h[local0 + l];
      }
    }
    // Patched run: the tile's logged lanes take their saved bits (value and, for 16-bit storage, raw).
    auto apply_patch = [&]() {
      const int tile_pos = static_cast<int>(4 * (g0 - g_begin));
      const size_t n_entries = patch->pos.size();
      while (patch_next < n_entries && static_cast<int>(patch->pos[patch_next]) < tile_pos + kTile) {
        const int l = static_cast<int>(patch->pos[patch_next]) - tile_pos;
        if constexpr (sizeof(Raw) == 4) {
          xv[l] = bits_to_float(patch->v32[patch_next]);
        } else {
          raw[l] = patch->v16[patch_next];
          xv[l] = S::load(raw[l]);
        }
        ++patch_next;
      }
    };
    int64_t last_seed = -1, last_dir = -1;  // the direction now in u (none yet)
    bool sqrt_h_valid = false;               // sv holds sqrt(hv)
    for (int64_t r = 0; r < prog.n_rounds; ++r) {
      if (patch != nullptr && r == job.n_patch) apply_patch();
      if (LOG && r == n_store) {  // the applied rounds are done: store them, then simulate the rest
        if (full) {
          Raw* __restrict xd = x + local0;
          if (S::kRoundsDown) {
#pragma omp simd
            for (int l = 0; l < kTile; ++l) xd[l] = raw[l];
          } else {
#pragma omp simd
            for (int l = 0; l < kTile; ++l) xd[l] = static_cast<Raw>(xv[l]);
          }
        } else {
          for (int l = lo; l < hi; ++l) x[local0 + l] = S::kRoundsDown ? raw[l] : static_cast<Raw>(xv[l]);
        }
      }
      // Vector stores, not the memset GCC would make of a plain loop: a 256-byte `rep stos` per round cost 15% of
      // a logged run (setup.py also passes -fno-tree-loop-distribute-patterns). H-less rules never read ah.
#pragma omp simd
      for (int l = 0; l < kTile; ++l) ax[l] = 0.0f;
      if (RULE != kRuleNone) {
#pragma omp simd
        for (int l = 0; l < kTile; ++l) ah[l] = 0.0f;
      }
      for (int64_t t = prog.round_start[r]; t < prog.round_start[r + 1]; ++t) {
        if (prog.seeds[t] != last_seed || prog.dirs[t] != last_dir) {
          last_seed = prog.seeds[t];
          last_dir = prog.dirs[t];
          tile_directions<DIST>(static_cast<uint64_t>(last_seed), static_cast<uint32_t>(last_dir), g0, u);
        }
        const float a = prog.coef_x[t];
        const float b = (RULE != kRuleNone) ? prog.coef_h[t] : 0.0f;
#pragma omp simd
        for (int l = 0; l < kTile; ++l) accumulate_term<RULE>(u[l], a, b, ax[l], ah[l]);
      }
      const float wd = prog.round_wd[r];
      if (round_updates_h<RULE>(prog, r)) {
#pragma omp simd
        for (int l = 0; l < kTile; ++l) y[l] = finish_round<HAS_H, RULE>(xv[l], hv[l], ax[l], ah[l], wd, prog);
        sqrt_h_valid = false;
      } else if (HAS_H) {  // H fixed in this round: sqrt(h) once per tile until a round changes H
        if (!sqrt_h_valid) {
#pragma omp simd
          for (int l = 0; l < kTile; ++l) sv[l] = HISO_SQRT(hv[l]);
          sqrt_h_valid = true;
        }
#pragma omp simd
        for (int l = 0; l < kTile; ++l) y[l] = round_x<true>(xv[l], sv[l], ax[l], wd);
      } else {
#pragma omp simd
        for (int l = 0; l < kTile; ++l) y[l] = round_x<false>(xv[l], 1.0f, ax[l], wd);
      }
      if (S::kRoundsDown) {
        const int64_t rseed = prog.round_rseed[r];
        if (rseed >= 0) {
          tile_rounding_bits(static_cast<uint64_t>(rseed), g0, rbits);
#pragma omp simd
          for (int l = 0; l < kTile; ++l) raw[l] = S::round_stochastic(y[l], rbits[l], xv[l]);
        } else {
#pragma omp simd
          for (int l = 0; l < kTile; ++l) raw[l] = S::round_nearest(y[l], xv[l]);
        }
      } else {
#pragma omp simd
        for (int l = 0; l < kTile; ++l) xv[l] = y[l];
      }
    }
    if (patch != nullptr && job.n_patch == prog.n_rounds) apply_patch();
    if (LOG) {  // compare the simulated end of the chain with the original bits (vectorised; most tiles match)
      alignas(64) uint8_t differs[kTile];
      uint32_t any = 0;
#pragma omp simd reduction(| : any)
      for (int l = 0; l < kTile; ++l) {
        const uint32_t end_bits = S::kRoundsDown ? stored_bits(raw[l]) : float_to_bits(xv[l]);
        const uint32_t d = end_bits ^ stored_bits(x0[l]);
        differs[l] = d != 0;
        any |= d;
      }
      if (any == 0) continue;
      // Visit only the differing lanes (about 7 of 64 on fp32 weights of std 0.02): a branch per lane mispredicted
      // and push_back's capacity checks cost more than the arithmetic of the whole chain.
      uint64_t mask = pack_lane_flags(differs) & lane_range(lo, hi);
      const uint16_t tile_pos = static_cast<uint16_t>(4 * (g0 - g_begin));
      while (mask != 0) {
        const int l = __builtin_ctzll(mask);
        mask &= mask - 1;
        scratch->pos[n_logged] = static_cast<uint16_t>(tile_pos + l);
        scratch->bits[n_logged] = stored_bits(x0[l]);
        ++n_logged;
      }
      continue;
    }
    if (full) {
      Raw* __restrict xd = x + local0;
      if (S::kRoundsDown) {
#pragma omp simd
        for (int l = 0; l < kTile; ++l) xd[l] = raw[l];
      } else {
#pragma omp simd
        for (int l = 0; l < kTile; ++l) xd[l] = static_cast<Raw>(xv[l]);
      }
      if (HAS_H && RULE != kRuleNone) {
        float* __restrict hd = h + local0;
#pragma omp simd
        for (int l = 0; l < kTile; ++l) hd[l] = hv[l];
      }
    } else {
      if (S::kRoundsDown) {
        for (int l = lo; l < hi; ++l) x[local0 + l] = raw[l];
      } else {
        for (int l = lo; l < hi; ++l) x[local0 + l] = static_cast<Raw>(xv[l]);
      }
      if (HAS_H && RULE != kRuleNone) {
        for (int l = lo; l < hi; ++l) h[local0 + l] = hv[l];
      }
    }
  }
  if (LOG && n_logged > 0) {  // one exact-size copy per chunk: a chunk's log lives until the restore
    log->pos.assign(scratch->pos.data(), scratch->pos.data() + n_logged);
    if (sizeof(Raw) == 4) {
      log->v32.assign(scratch->bits.data(), scratch->bits.data() + n_logged);
    } else {
      log->v16.resize(static_cast<size_t>(n_logged));
      for (int64_t e = 0; e < n_logged; ++e) log->v16[e] = static_cast<uint16_t>(scratch->bits[e]);
    }
  }
}

// Floating-point environment guard: IEEE results need denormals kept (no FTZ / DAZ), whatever the caller set.
struct IeeeDenormals {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned int saved;
  IeeeDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved & ~(0x8000u | 0x0040u)); }
  ~IeeeDenormals() { _mm_setcsr(saved); }
#endif
};

template <class S, bool HAS_H, int RULE, int DIST, bool LOG>
static void run_typed(const Job& job) {
#pragma omp parallel num_threads(job.num_threads) if (job.n_chunks > 1 && job.num_threads > 1)
  {
    IeeeDenormals guard;
#pragma omp for schedule(static)
    for (int64_t c = 0; c < job.n_chunks; ++c) process_chunk<S, HAS_H, RULE, DIST, LOG>(job, c);
  }
}

template <class S, bool HAS_H, int RULE, bool LOG>
static void run_dist(const Job& job) {
  if (job.distribution == kGaussian) {
    run_typed<S, HAS_H, RULE, kGaussian, LOG>(job);
  } else {
    run_typed<S, HAS_H, RULE, kRademacher, LOG>(job);
  }
}

template <class S>
static void run_storage(const Job& job) {
  if (job.log != nullptr) {  // logged runs never write H (the module checks that no round updates it)
    if (job.has_h) {
      run_dist<S, true, kRuleNone, true>(job);
    } else {
      run_dist<S, false, kRuleNone, true>(job);
    }
  } else if (!job.has_h) {
    run_dist<S, false, kRuleNone, false>(job);
  } else if (job.rule == kRuleGsq) {
    run_dist<S, true, kRuleGsq, false>(job);
  } else if (job.rule == kRuleStein) {
    run_dist<S, true, kRuleStein, false>(job);
  } else {
    run_dist<S, true, kRuleNone, false>(job);
  }
}

void run_job(const Job& job) {
  switch (job.dtype) {
    case kFloat32:
      run_storage<StoreF32>(job);
      break;
    case kBFloat16:
      run_storage<StoreBF16>(job);
      break;
    default:
      run_storage<StoreF16>(job);
      break;
  }
}

// The sparse fix-up of an undo log: every entry's saved value becomes what the program makes of it (H read from the
// tensors, not written), with the dense kernels' arithmetic (program_element).
template <class S, bool HAS_H, int RULE, int DIST>
static void advance_typed(const Job& job, std::vector<ChunkLog>& logs) {
  using Raw = typename S::Raw;
  const int64_t n = static_cast<int64_t>(logs.size());
#pragma omp parallel num_threads(job.num_threads) if (n > 1 && job.num_threads > 1)
  {
    IeeeDenormals guard;
#pragma omp for schedule(dynamic, 4)
    for (int64_t c = 0; c < n; ++c) {
      ChunkLog& cl = logs[c];
      const int64_t* s = job.slots + 4 * cl.slot;
      const float* h = reinterpret_cast<const float*>(static_cast<intptr_t>(s[1]));
      const int64_t offset = s[3];
      for (size_t e = 0; e < cl.pos.size(); ++e) {
        const uint64_t j = 4 * cl.g_begin + cl.pos[e];
        const float hj = HAS_H ? h[static_cast<int64_t>(j) - offset] : 1.0f;
        if constexpr (sizeof(Raw) == 4) {
          const Raw v = program_element<S, HAS_H, RULE, DIST>(job.prog, j, bits_to_float(cl.v32[e]), hj);
          cl.v32[e] = stored_bits(v);
        } else {
          const Raw v = program_element<S, HAS_H, RULE, DIST>(job.prog, j, static_cast<Raw>(cl.v16[e]), hj);
          cl.v16[e] = static_cast<uint16_t>(stored_bits(v));
        }
      }
    }
  }
}

template <class S, bool HAS_H, int RULE>
static void advance_dist(const Job& job, std::vector<ChunkLog>& logs) {
  if (job.distribution == kGaussian) {
    advance_typed<S, HAS_H, RULE, kGaussian>(job, logs);
  } else {
    advance_typed<S, HAS_H, RULE, kRademacher>(job, logs);
  }
}

template <class S>
static void advance_storage(const Job& job, std::vector<ChunkLog>& logs) {
  if (!job.has_h) {
    advance_dist<S, false, kRuleNone>(job, logs);
  } else if (job.rule == kRuleGsq) {
    advance_dist<S, true, kRuleGsq>(job, logs);
  } else if (job.rule == kRuleStein) {
    advance_dist<S, true, kRuleStein>(job, logs);
  } else {
    advance_dist<S, true, kRuleNone>(job, logs);
  }
}

void advance_log(const Job& job, std::vector<ChunkLog>& logs) {
  switch (job.dtype) {
    case kFloat32:
      advance_storage<StoreF32>(job, logs);
      break;
    case kBFloat16:
      advance_storage<StoreBF16>(job, logs);
      break;
    default:
      advance_storage<StoreF16>(job, logs);
      break;
  }
}

template <class S>
static void round_storage_typed(const float* y, void* out, int64_t start, int64_t n, int64_t rseed) {
  using Raw = typename S::Raw;
  Raw* o = static_cast<Raw*>(out);
  IeeeDenormals guard;
  alignas(64) uint32_t bits[kTile];
  for (int64_t base = -(start & 3); base < n; base += kTile) {
    const uint64_t g0 = static_cast<uint64_t>(start + base) >> 2;
    if (rseed >= 0) tile_rounding_bits(static_cast<uint64_t>(rseed), g0, bits);
    const int lo = static_cast<int>(greater<int64_t>(0, -base));
    const int hi = static_cast<int>(lesser<int64_t>(kTile, n - base));
    float value;
    for (int l = lo; l < hi; ++l) {
      o[base + l] = rseed >= 0 ? S::round_stochastic(y[base + l], bits[l], value) : S::round_nearest(y[base + l], value);
    }
  }
}

void round_storage(const float* y, void* out, int64_t start, int64_t n, int dtype, int64_t rseed) {
  switch (dtype) {
    case kFloat32:
      round_storage_typed<StoreF32>(y, out, start, n, rseed);
      break;
    case kBFloat16:
      round_storage_typed<StoreBF16>(y, out, start, n, rseed);
      break;
    default:
      round_storage_typed<StoreF16>(y, out, start, n, rseed);
      break;
  }
}

template <int DIST>
static void fill_directions_dist(uint64_t seed, uint32_t p, int64_t start, int64_t n, float* out, int num_threads) {
  const uint64_t g_first = static_cast<uint64_t>(start) >> 2;
  const uint64_t g_stop = static_cast<uint64_t>(start + n + 3) >> 2;
  const int64_t n_tiles = static_cast<int64_t>((g_stop - g_first + kTileGroups - 1) / kTileGroups);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (n_tiles > 64 && num_threads > 1)
  for (int64_t t = 0; t < n_tiles; ++t) {
    IeeeDenormals guard;
    alignas(64) float u[kTile];
    const uint64_t g0 = g_first + static_cast<uint64_t>(t) * kTileGroups;
    tile_directions<DIST>(seed, p, g0, u);
    const int64_t local0 = static_cast<int64_t>(4 * g0) - start;
    const int lo = static_cast<int>(greater<int64_t>(0, -local0));
    const int hi = static_cast<int>(lesser<int64_t>(kTile, n - local0));
    for (int l = lo; l < hi; ++l) out[local0 + l] = u[l];
  }
}

// Generator-only kernel (benchmarks): sum of u(seed, p, j) over j in [start, start + n) and p < n_dirs. It does the
// work of a fused kernel minus the memory traffic, which gives the generator term of the roofline.
template <int DIST>
static double directions_sum_dist(uint64_t seed, int n_dirs, int64_t start, int64_t n, int num_threads) {
  const uint64_t g_first = static_cast<uint64_t>(start) >> 2;
  const uint64_t g_stop = static_cast<uint64_t>(start + n + 3) >> 2;
  const int64_t n_tiles = static_cast<int64_t>((g_stop - g_first + kTileGroups - 1) / kTileGroups);
  double total = 0.0;
#pragma omp parallel num_threads(num_threads) if (n_tiles > 64 && num_threads > 1) reduction(+ : total)
  {
    IeeeDenormals guard;
    alignas(64) float u[kTile];
    alignas(64) float acc[kTile];
    for (int l = 0; l < kTile; ++l) acc[l] = 0.0f;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const uint64_t g0 = g_first + static_cast<uint64_t>(t) * kTileGroups;
      const int64_t local0 = static_cast<int64_t>(4 * g0) - start;
      const int lo = static_cast<int>(greater<int64_t>(0, -local0));
      const int hi = static_cast<int>(lesser<int64_t>(kTile, n - local0));
      for (int p = 0; p < n_dirs; ++p) {
        tile_directions<DIST>(seed, static_cast<uint32_t>(p), g0, u);
        if (lo == 0 && hi == kTile) {
#pragma omp simd
          for (int l = 0; l < kTile; ++l) acc[l] += u[l];
        } else {
          for (int l = lo; l < hi; ++l) acc[l] += u[l];
        }
      }
    }
    for (int l = 0; l < kTile; ++l) total += acc[l];
  }
  return total;
}

double directions_sum(uint64_t seed, int n_dirs, int64_t start, int64_t n, int distribution, int num_threads) {
  return distribution == kGaussian ? directions_sum_dist<kGaussian>(seed, n_dirs, start, n, num_threads)
                                   : directions_sum_dist<kRademacher>(seed, n_dirs, start, n, num_threads);
}

void fill_directions(uint64_t seed, uint32_t p, int64_t start, int64_t n, int distribution, float* out,
                     int num_threads) {
  if (distribution == kGaussian) {
    fill_directions_dist<kGaussian>(seed, p, start, n, out, num_threads);
  } else {
    fill_directions_dist<kRademacher>(seed, p, start, n, out, num_threads);
  }
}

}  // namespace HISO_CPU_ISA
}  // namespace cpu
}  // namespace hiso
