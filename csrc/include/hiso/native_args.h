// The Python boundary of the native modules (hiso_kernels._cpu, hiso_kernels._cuda): tensors arrive as integer
// addresses (hiso_kernels/backends/base.py: native_program_args), turned here into pointers and a Program.
// Host code only.
#pragma once

#include <cstdint>

#include "hiso/zo_round.h"

namespace hiso {

template <class T>
T* as_ptr(int64_t address) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(address));
}

// The program whose arrays live at these addresses (host memory for the CPU module, device memory for CUDA).
inline Program program_at(int64_t seeds, int64_t dirs, int64_t coef_x, int64_t coef_h, int64_t round_start,
                          int64_t round_wd, int64_t round_rseed, int64_t round_flags, int64_t n_rounds, double beta,
                          double one_minus_beta, double h_min) {
  Program prog{};
  prog.seeds = as_ptr<const int64_t>(seeds);
  prog.dirs = as_ptr<const int64_t>(dirs);
  prog.coef_x = as_ptr<const float>(coef_x);
  prog.coef_h = as_ptr<const float>(coef_h);
  prog.round_start = as_ptr<const int64_t>(round_start);
  prog.round_wd = as_ptr<const float>(round_wd);
  prog.round_rseed = as_ptr<const int64_t>(round_rseed);
  prog.round_flags = as_ptr<const int32_t>(round_flags);
  prog.n_rounds = n_rounds;
  prog.beta = static_cast<float>(beta);
  prog.one_minus_beta = static_cast<float>(one_minus_beta);
  prog.h_min = static_cast<float>(h_min);
  return prog;
}

}  // namespace hiso
