// Python module hiso_kernels._cpu: the CPU backend's entry points.
//
// The module takes raw addresses rather than torch tensors so that it builds with pybind11 alone and does not depend
// on torch's C++ ABI: one wheel works with every torch release. hiso_kernels/backends/cpu.py validates everything
// and keeps the tensors alive for the duration of a call.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <tuple>

#include "zo_cpu_job.h"

namespace py = pybind11;

namespace hiso {
namespace cpu {
namespace {

using RunFn = void (*)(const Job&);
using FillFn = void (*)(uint64_t, uint32_t, int64_t, int64_t, int, float*, int);
using RoundFn = void (*)(const float*, void*, int64_t, int64_t, int, int64_t);
using SumFn = double (*)(uint64_t, int, int64_t, int64_t, int, int);

struct Isa {
  const char* name;
  RunFn run;
  FillFn fill;
  RoundFn round;
  SumFn sum;
  bool supported;
};

Isa make_isa(const std::string& name) {
  if (name == "generic") return {"generic", &generic::run_job, &generic::fill_directions, &generic::round_storage,
                               &generic::directions_sum, true};
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (name == "avx2") {
    return {"avx2", &avx2::run_job, &avx2::fill_directions, &avx2::round_storage, &avx2::directions_sum,
            __builtin_cpu_supports("avx2") != 0};
  }
  if (name == "avx512") {
    const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    return {"avx512", &avx512::run_job, &avx512::fill_directions, &avx512::round_storage, &avx512::directions_sum,
            ok};
  }
#endif
  return {"", nullptr, nullptr, nullptr, nullptr, false};
}

Isa best_isa() {
#if defined(__x86_64__)
  for (const char* name : {"avx512", "avx2"}) {
    Isa isa = make_isa(name);
    if (isa.supported) return isa;
  }
#endif
  return make_isa("generic");
}

Isa& current_isa() {
  static Isa isa = best_isa();
  return isa;
}

template <class T>
T* as_ptr(int64_t address) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(address));
}

// Called from Python with keyword arguments only (the names below; see backends/base.py: native_program_args).
void run(int64_t slots, int64_t chunks, int64_t n_chunks, int64_t groups_per_chunk, int dtype, bool has_h, int rule,
         int distribution, int num_threads, int64_t seeds, int64_t dirs, int64_t coef_x, int64_t coef_h,
         int64_t round_start, int64_t round_wd, int64_t round_rseed, int64_t n_rounds, double beta,
         double one_minus_beta, double h_min) {
  if (dtype < kFloat32 || dtype > kFloat16) throw std::invalid_argument("unknown dtype code");
  if (rule < kRuleNone || rule > kRuleStein) throw std::invalid_argument("unknown curvature rule code");
  if (distribution < kGaussian || distribution > kRademacher) throw std::invalid_argument("unknown distribution code");
  if (groups_per_chunk <= 0 || groups_per_chunk % 16 != 0)
    throw std::invalid_argument("groups_per_chunk must be a positive multiple of 16");
  Job job;
  job.slots = as_ptr<const int64_t>(slots);
  job.chunks = as_ptr<const int64_t>(chunks);
  job.n_chunks = n_chunks;
  job.groups_per_chunk = groups_per_chunk;
  job.dtype = dtype;
  job.has_h = has_h;
  job.rule = rule;
  job.distribution = distribution;
  job.num_threads = num_threads < 1 ? 1 : num_threads;
  job.prog.seeds = as_ptr<const int64_t>(seeds);
  job.prog.dirs = as_ptr<const int64_t>(dirs);
  job.prog.coef_x = as_ptr<const float>(coef_x);
  job.prog.coef_h = as_ptr<const float>(coef_h);
  job.prog.round_start = as_ptr<const int64_t>(round_start);
  job.prog.round_wd = as_ptr<const float>(round_wd);
  job.prog.round_rseed = as_ptr<const int64_t>(round_rseed);
  job.prog.n_rounds = n_rounds;
  job.prog.beta = static_cast<float>(beta);
  job.prog.one_minus_beta = static_cast<float>(one_minus_beta);
  job.prog.h_min = static_cast<float>(h_min);
  py::gil_scoped_release release;
  current_isa().run(job);
}

void fill_directions(uint64_t seed, uint32_t p, int64_t start, int64_t n, int distribution, int64_t out,
                     int num_threads) {
  py::gil_scoped_release release;
  current_isa().fill(seed, p, start, n, distribution, as_ptr<float>(out), num_threads < 1 ? 1 : num_threads);
}

void round_to_storage(int64_t y, int64_t out, int64_t start, int64_t n, int dtype, int64_t rseed) {
  if (dtype < kFloat32 || dtype > kFloat16) throw std::invalid_argument("unknown dtype code");
  py::gil_scoped_release release;
  current_isa().round(as_ptr<const float>(y), as_ptr<void>(out), start, n, dtype, rseed);
}

}  // namespace
}  // namespace cpu
}  // namespace hiso

PYBIND11_MODULE(_cpu, m) {
  using namespace hiso::cpu;
  m.doc() = "hiso CPU kernels (C++, OpenMP, SIMD); internal: use hiso_kernels' public functions.";
  m.def("run", &run, "Apply a zeroth-order program to the tensors of one dtype (raw addresses).", py::kw_only(),
        py::arg("slots"), py::arg("chunks"), py::arg("n_chunks"), py::arg("groups_per_chunk"), py::arg("dtype"),
        py::arg("has_h"), py::arg("rule"), py::arg("distribution"), py::arg("num_threads"), py::arg("seeds"),
        py::arg("dirs"), py::arg("coef_x"), py::arg("coef_h"), py::arg("round_start"), py::arg("round_wd"),
        py::arg("round_rseed"), py::arg("n_rounds"), py::arg("beta"), py::arg("one_minus_beta"), py::arg("h_min"));
  m.def("fill_directions", &fill_directions, "Write directions of (seed, p) for global indices [start, start+n).");
  m.def(
      "directions_sum",
      [](uint64_t seed, int n_dirs, int64_t start, int64_t n, int distribution, int num_threads) {
        py::gil_scoped_release release;
        return current_isa().sum(seed, n_dirs, start, n, distribution, num_threads < 1 ? 1 : num_threads);
      },
      "Generator-only benchmark kernel: sum of n_dirs directions over [start, start+n).");
  m.def("round_to_storage", &round_to_storage,
        "Round fp32 values to a storage dtype as the kernels do (rseed < 0: nearest even; else stochastic with the "
        "rounding bits of global indices start..start+n-1). For tests.");
  m.def(
      "philox4x32_10",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        const hiso::Philox4 r = hiso::philox4x32_10(c0, c1, c2, c3, k0, k1);
        return std::make_tuple(r.v[0], r.v[1], r.v[2], r.v[3]);
      },
      "Philox4x32-10 of one counter (for known-answer tests).");
  m.def("isa", []() { return std::string(current_isa().name); }, "Instruction set of the kernels in use.");
  m.def(
      "supported_isas",
      []() {
        py::list names;
        for (const char* name : {"generic", "avx2", "avx512"}) {
          if (make_isa(name).supported) names.append(name);
        }
        return names;
      },
      "Instruction sets this build has and this processor runs.");
  m.def(
      "set_isa",
      [](const std::string& name) {
        Isa isa = make_isa(name);
        if (!isa.supported) throw std::invalid_argument("instruction set '" + name + "' is not available here");
        current_isa() = isa;
      },
      "Select the instruction set (tests compare them; the default is the best supported).");
  m.attr("openmp") = py::bool_(true);
}
