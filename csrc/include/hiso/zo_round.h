// The per-element arithmetic of one zeroth-order round, shared by the CPU and CUDA backends (docs/kernels.md).
//
// A "program" is a list of rounds; round r holds terms i = round_start[r] .. round_start[r+1]-1, each a direction
// (seed_i, p_i) with an x coefficient a_i and a curvature coefficient b_i. For every element j, round after round:
//
//   acc_x = sum_i a_i u_i            acc_h = sum_i b_i u_i (GSQ)  or  sum_i b_i (u_i^2 - 1) (STEIN)
//   s     = sqrt(H)                  (1 without H)
//   x     <- round(x - (acc_x / s + wd_r x))               to the storage dtype (nearest even or stochastic)
//   H     <- max(beta H + (1 - beta) v, h_min),  v = (acc_h / s)^2 (GSQ) or H acc_h (STEIN)
//            (only in rounds whose round_flags hold kRoundUpdatesH; the others leave H as it is)
//
// Sums run in term order starting from +0; every operation is a single fp32 IEEE operation. The GSQ rule is HiSo's
// (arXiv 2506.02370); the STEIN rule and the h_min floor are ours (docs/kernels.md, docs/decisions.md).
#pragma once

#include "hiso/directions.h"

namespace hiso {

struct Program {
  const int64_t* seeds;        // [T] in [0, 2^63)
  const int64_t* dirs;         // [T] in [0, 2^31)
  const float* coef_x;         // [T] a_i
  const float* coef_h;         // [T] b_i (read only when the rule updates H)
  const int64_t* round_start;  // [R + 1], round_start[0] = 0, round_start[R] = T
  const float* round_wd;       // [R] weight decay factor (eta lambda) of each round
  const int64_t* round_rseed;  // [R] stochastic-rounding seed of each round, -1 for round-to-nearest-even
  const int32_t* round_flags;  // [R] kRoundUpdatesH: the round updates H (when RULE updates H at all)
  int64_t n_rounds;
  float beta;
  float one_minus_beta;
  float h_min;
};

// Storage types. `Raw` is what lives in memory; `load` is exact; `round` returns the stored bits and sets `value`
// to their exact fp32 value, which the next round of a replay continues from.
struct StoreF32 {
  using Raw = float;
  static constexpr bool kRoundsDown = false;
  HISO_HD static float load(Raw v) { return v; }
  HISO_HD static Raw round_nearest(float y, float& value) {
    value = y;
    return y;
  }
  HISO_HD static Raw round_stochastic(float y, uint32_t, float& value) {
    value = y;
    return y;
  }
};

struct StoreBF16 {
  using Raw = uint16_t;
  static constexpr bool kRoundsDown = true;
  HISO_HD static float load(Raw v) { return bf16_to_float(v); }
  HISO_HD static Raw round_nearest(float y, float& value) {
    const Raw r = float_to_bf16_nearest(y);
    value = bf16_to_float(r);
    return r;
  }
  HISO_HD static Raw round_stochastic(float y, uint32_t bits, float& value) {
    const Raw r = float_to_bf16_stochastic(y, bits);
    value = bf16_to_float(r);
    return r;
  }
};

struct StoreF16 {
  using Raw = uint16_t;
  static constexpr bool kRoundsDown = true;
  HISO_HD static float load(Raw v) { return fp16_to_float(v); }
  HISO_HD static Raw round_nearest(float y, float& value) {
    const Raw r = float_to_fp16_nearest(y);
    value = fp16_to_float(r);
    return r;
  }
  HISO_HD static Raw round_stochastic(float y, uint32_t bits, float& value) {
    const Raw r = float_to_fp16_nearest(fp16_stochastic_value(y, bits));
    value = fp16_to_float(r);
    return r;
  }
};

template <int RULE>
HISO_HD void accumulate_term(float u, float a, float b, float& acc_x, float& acc_h) {
  acc_x = acc_x + a * u;
  if (RULE == kRuleGsq) {
    acc_h = acc_h + b * u;
  } else if (RULE == kRuleStein) {
    acc_h = acc_h + b * (u * u - 1.0f);
  }
}

// The x part of a round: y = x - (acc_x / s + wd x) with s = sqrt(h) (acc_x alone without H). Kernels that run
// several rounds with H fixed may compute s once and call this directly: the same operations, the same bits.
template <bool HAS_H>
HISO_HD float round_x(float x, float s, float acc_x, float wd) {
  const float t = HAS_H ? HISO_DIV(acc_x, s) : acc_x;
  return x - (t + wd * x);
}

// Applies the end of a round to one element: returns the unrounded new x and updates h in place.
template <bool HAS_H, int RULE>
HISO_HD float finish_round(float x, float& h, float acc_x, float acc_h, float wd, const Program& prog) {
  const float s = HAS_H ? HISO_SQRT(h) : 1.0f;
  const float y = round_x<HAS_H>(x, s, acc_x, wd);
  if (HAS_H && RULE != kRuleNone) {
    float v;
    if (RULE == kRuleGsq) {
      const float g = HISO_DIV(acc_h, s);
      v = g * g;
    } else {
      v = h * acc_h;
    }
    const float hn = prog.beta * h + prog.one_minus_beta * v;
    h = (hn >= prog.h_min) ? hn : prog.h_min;  // also maps NaN to the floor
  }
  return y;
}

// Whether round r of a program with rule RULE updates H.
template <int RULE>
HISO_HD bool round_updates_h(const Program& prog, int64_t r) {
  return RULE != kRuleNone && (prog.round_flags[r] & kRoundUpdatesH) != 0;
}

// The direction value of lane `lane` (0..3) of the group whose Philox words are w: one Gaussian pair, not two.
template <int DIST>
HISO_HD float lane_direction(const Philox4& w, int lane) {
  if (DIST == kGaussian) {
    float z0, z1;
    const int pair = lane >> 1;
    gaussian_pair(w.v[2 * pair], w.v[2 * pair + 1], z0, z1);
    return (lane & 1) ? z1 : z0;
  }
  return rademacher(w.v[lane]);
}

// A program applied to one element with global index j, from its stored value x and its H value h (1 without H):
// the dense kernels' arithmetic, element by element (the sparse fix-up of an undo log). Returns the stored bits;
// h is not written back by the callers (the dense pass writes H).
template <class S, bool HAS_H, int RULE, int DIST>
HISO_HD typename S::Raw program_element(const Program& prog, uint64_t j, typename S::Raw x_raw, float h) {
  using Raw = typename S::Raw;
  const uint64_t g = j >> 2;
  const int lane = static_cast<int>(j & 3u);
  float x = S::load(x_raw);
  Raw raw = x_raw;
  int64_t last_seed = -1, last_dir = -1;
  float u = 0.0f;
  for (int64_t r = 0; r < prog.n_rounds; ++r) {
    float ax = 0.0f, ah = 0.0f;
    for (int64_t t = prog.round_start[r]; t < prog.round_start[r + 1]; ++t) {
      if (prog.seeds[t] != last_seed || prog.dirs[t] != last_dir) {
        last_seed = prog.seeds[t];
        last_dir = prog.dirs[t];
        u = lane_direction<DIST>(direction_words(static_cast<uint64_t>(last_seed), static_cast<uint32_t>(last_dir), g),
                                 lane);
      }
      accumulate_term<RULE>(u, prog.coef_x[t], RULE != kRuleNone ? prog.coef_h[t] : 0.0f, ax, ah);
    }
    float y;
    if (round_updates_h<RULE>(prog, r)) {
      y = finish_round<HAS_H, RULE>(x, h, ax, ah, prog.round_wd[r], prog);
    } else {
      y = finish_round<HAS_H, kRuleNone>(x, h, ax, ah, prog.round_wd[r], prog);
    }
    if (S::kRoundsDown) {
      const int64_t rseed = prog.round_rseed[r];
      if (rseed >= 0) {
        raw = S::round_stochastic(y, rounding_words(static_cast<uint64_t>(rseed), g).v[lane], x);
      } else {
        raw = S::round_nearest(y, x);
      }
    } else {
      x = y;
      raw = static_cast<Raw>(y);
    }
  }
  return raw;
}

}  // namespace hiso
