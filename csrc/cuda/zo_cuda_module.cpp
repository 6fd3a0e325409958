// Python module hiso_kernels._cuda: the CUDA backend's entry points.
//
// Like the CPU module it takes raw device addresses and the caller's stream handle, and links the CUDA runtime
// statically, so it does not depend on torch's C++ ABI. CUDA streams are driver objects shared by every runtime in
// the process, so the stream torch hands out is valid here.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <tuple>

#include "hiso/native_args.h"
#include "zo_cuda.h"

namespace py = pybind11;
using namespace hiso::cuda;

#ifndef HISO_CUDA_ARCHS
#define HISO_CUDA_ARCHS "unknown"  // setup.py defines the compiled architectures, e.g. "80;90"
#endif

namespace {

using hiso::as_ptr;

// Called from Python with keyword arguments only (the names below; see backends/base.py: native_program_args).
void run(int64_t slots, int64_t chunks, int64_t n_chunks, int64_t groups_per_chunk, int dtype, bool has_h, int rule,
         int distribution, int64_t seeds, int64_t dirs, int64_t coef_x, int64_t coef_h, int64_t round_start,
         int64_t round_wd, int64_t round_rseed, int64_t round_flags, int64_t n_rounds, double beta,
         double one_minus_beta, double h_min, int64_t stream) {
  if (groups_per_chunk != kGroupsPerChunk) throw std::invalid_argument("groups_per_chunk must be GROUPS_PER_CHUNK");
  if (rule < hiso::kRuleNone || rule > hiso::kRuleStein) throw std::invalid_argument("unknown curvature rule code");
  if (distribution < hiso::kGaussian || distribution > hiso::kRademacher)
    throw std::invalid_argument("unknown distribution code");
  const hiso::Program prog = hiso::program_at(seeds, dirs, coef_x, coef_h, round_start, round_wd, round_rseed,
                                              round_flags, n_rounds, beta, one_minus_beta, h_min);
  launch_program(as_ptr<const int64_t>(slots), as_ptr<const int64_t>(chunks), n_chunks, dtype, has_h, rule,
                 distribution, prog, as_ptr<void>(stream));
}

// The logged variant of run (no H update): log_* are device addresses (see LogArgs in zo_cuda.h).
void run_logged(int64_t slots, int64_t chunks, int64_t n_chunks, int64_t groups_per_chunk, int dtype, bool has_h,
                int distribution, int64_t seeds, int64_t dirs, int64_t coef_x, int64_t coef_h, int64_t round_start,
                int64_t round_wd, int64_t round_rseed, int64_t round_flags, int64_t n_rounds, int64_t n_apply,
                int64_t log_index, int64_t log_value, int64_t log_counts, int64_t log_skip, int64_t log_capacity,
                int64_t stream) {
  if (groups_per_chunk != kGroupsPerChunk) throw std::invalid_argument("groups_per_chunk must be GROUPS_PER_CHUNK");
  if (distribution < hiso::kGaussian || distribution > hiso::kRademacher)
    throw std::invalid_argument("unknown distribution code");
  // no H update in a logged run: beta, 1 - beta and h_min are unused
  const hiso::Program prog = hiso::program_at(seeds, dirs, coef_x, coef_h, round_start, round_wd, round_rseed,
                                              round_flags, n_rounds, 0.0, 1.0, 0.0);
  LogArgs log{as_ptr<int64_t>(log_index), as_ptr<void>(log_value), as_ptr<unsigned long long>(log_counts),
              as_ptr<int8_t>(log_skip), log_capacity, n_apply};
  launch_logged(as_ptr<const int64_t>(slots), as_ptr<const int64_t>(chunks), n_chunks, dtype, has_h, distribution,
                prog, log, as_ptr<void>(stream));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "hiso CUDA kernels; internal: use hiso_kernels' public functions.";
  m.attr("GROUPS_PER_CHUNK") = kGroupsPerChunk;
  m.attr("ARCHS") = HISO_CUDA_ARCHS;
  m.def("run", &run, "Apply a zeroth-order program to the tensors of one dtype (device addresses).", py::kw_only(),
        py::arg("slots"), py::arg("chunks"), py::arg("n_chunks"), py::arg("groups_per_chunk"), py::arg("dtype"),
        py::arg("has_h"), py::arg("rule"), py::arg("distribution"), py::arg("seeds"), py::arg("dirs"),
        py::arg("coef_x"), py::arg("coef_h"), py::arg("round_start"), py::arg("round_wd"), py::arg("round_rseed"),
        py::arg("round_flags"), py::arg("n_rounds"), py::arg("beta"), py::arg("one_minus_beta"), py::arg("h_min"),
        py::arg("stream"));
  m.attr("WARPS_PER_CHUNK") = kWarpsPerChunk;
  m.def("run_logged", &run_logged,
        "Apply rounds [0, n_apply) of a program, simulate the others and log the elements they do not bring back.",
        py::kw_only(), py::arg("slots"), py::arg("chunks"), py::arg("n_chunks"), py::arg("groups_per_chunk"),
        py::arg("dtype"), py::arg("has_h"), py::arg("distribution"), py::arg("seeds"), py::arg("dirs"),
        py::arg("coef_x"), py::arg("coef_h"), py::arg("round_start"), py::arg("round_wd"), py::arg("round_rseed"),
        py::arg("round_flags"), py::arg("n_rounds"), py::arg("n_apply"), py::arg("log_index"), py::arg("log_value"),
        py::arg("log_counts"), py::arg("log_skip"), py::arg("log_capacity"), py::arg("stream"));
  m.def(
      "probe",
      [](int device) {
        int binary_version = 0;
        const std::string why = probe_device(device, &binary_version);
        return std::make_tuple(why, binary_version);
      },
      py::arg("device"),
      "('', binary version) if this build can run on the device, else (the CUDA error, 0). Loads the kernels, "
      "launches nothing.");
  m.def(
      "fill_directions",
      [](uint64_t seed, uint32_t p, int64_t start, int64_t n, int distribution, int64_t out, int64_t stream) {
        launch_directions(seed, p, start, n, distribution, as_ptr<float>(out), as_ptr<void>(stream));
      },
      "Write directions of (seed, p) for global indices [start, start+n) to device memory.");
  m.def(
      "directions_sum",
      [](uint64_t seed, int n_dirs, int64_t start, int64_t n, int distribution, int64_t partial, int64_t stream) {
        launch_directions_sum(seed, n_dirs, start, n, distribution, as_ptr<float>(partial), as_ptr<void>(stream));
      },
      "Generator-only benchmark kernel: per-block sums of n_dirs directions.");
  m.def("device_count", &device_count, "CUDA devices visible to this module's runtime (0 without a driver).");
  m.def("runtime_version", &runtime_version, "Version of the statically linked CUDA runtime.");
}
