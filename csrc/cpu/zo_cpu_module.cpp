// Python module hiso_kernels._cpu: the CPU backend's entry points.
//
// The module takes raw addresses rather than torch tensors so that it builds with pybind11 alone and does not depend
// on torch's C++ ABI: one wheel works with every torch release. hiso_kernels/backends/cpu.py validates everything
// and keeps the tensors alive for the duration of a call.
#include <pybind11/pybind11.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "hiso/native_args.h"
#include "zo_cpu_job.h"

namespace py = pybind11;

namespace hiso {
namespace cpu {
namespace {

using RunFn = void (*)(const Job&);
using AdvanceFn = void (*)(const Job&, std::vector<ChunkLog>&);
using FillFn = void (*)(uint64_t, uint32_t, int64_t, int64_t, int, float*, int);
using RoundFn = void (*)(const float*, void*, int64_t, int64_t, int, int64_t);
using SumFn = double (*)(uint64_t, int, int64_t, int64_t, int, int);

struct Isa {
  const char* name;
  RunFn run;
  FillFn fill;
  RoundFn round;
  SumFn sum;
  AdvanceFn advance;
  bool supported;
};

Isa make_isa(const std::string& name) {
  if (name == "generic") return {"generic", &generic::run_job, &generic::fill_directions, &generic::round_storage,
                               &generic::directions_sum, &generic::advance_log, true};
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (name == "avx2") {
    return {"avx2", &avx2::run_job, &avx2::fill_directions, &avx2::round_storage, &avx2::directions_sum,
            &avx2::advance_log, __builtin_cpu_supports("avx2") != 0};
  }
  if (name == "avx512") {
    const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    return {"avx512", &avx512::run_job, &avx512::fill_directions, &avx512::round_storage, &avx512::directions_sum,
            &avx512::advance_log, ok};
  }
#endif
  return {"", nullptr, nullptr, nullptr, nullptr, nullptr, false};
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

Job make_job(int64_t slots, int64_t chunks, int64_t n_chunks, int64_t groups_per_chunk, int dtype, bool has_h,
             int rule, int distribution, int num_threads, int64_t seeds, int64_t dirs, int64_t coef_x, int64_t coef_h,
             int64_t round_start, int64_t round_wd, int64_t round_rseed, int64_t round_flags, int64_t n_rounds,
             double beta, double one_minus_beta, double h_min) {
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
  job.prog = program_at(seeds, dirs, coef_x, coef_h, round_start, round_wd, round_rseed, round_flags, n_rounds, beta,
                        one_minus_beta, h_min);
  return job;
}

// Called from Python with keyword arguments only (the names below; see backends/base.py: native_program_args).
void run(int64_t slots, int64_t chunks, int64_t n_chunks, int64_t groups_per_chunk, int dtype, bool has_h, int rule,
         int distribution, int num_threads, int64_t seeds, int64_t dirs, int64_t coef_x, int64_t coef_h,
         int64_t round_start, int64_t round_wd, int64_t round_rseed, int64_t round_flags, int64_t n_rounds,
         double beta, double one_minus_beta, double h_min) {
  const Job job = make_job(slots, chunks, n_chunks, groups_per_chunk, dtype, has_h, rule, distribution, num_threads,
                           seeds, dirs, coef_x, coef_h, round_start, round_wd, round_rseed, round_flags, n_rounds,
                           beta, one_minus_beta, h_min);
  py::gil_scoped_release release;
  current_isa().run(job);
}

// The undo log of a logged run: per chunk, the elements the simulated rounds do not bring back, with their stored
// bits from before the run. It keeps a copy of the launch's slot table (tensor addresses and global offsets): the
// Python side keeps the tensors alive and in place until the log is restored.
class LogBuffer {
 public:
  LogBuffer(const int64_t* slots, int64_t n_slots, int64_t n_chunks, int dtype)
      : slots_(slots, slots + 4 * n_slots), logs_(static_cast<size_t>(n_chunks)), dtype_(dtype) {}

  std::vector<ChunkLog>& logs() { return logs_; }
  const int64_t* slots() const { return slots_.data(); }
  int dtype() const { return dtype_; }

  // Drop the chunks with nothing to restore.
  void compact() {
    std::vector<ChunkLog> kept;
    for (ChunkLog& cl : logs_) {
      if (!cl.pos.empty()) kept.push_back(std::move(cl));
    }
    logs_.swap(kept);
  }

  int64_t size() const {
    int64_t n = 0;
    for (const ChunkLog& cl : logs_) n += static_cast<int64_t>(cl.pos.size());
    return n;
  }

  int64_t nbytes() const {
    int64_t n = 0;
    for (const ChunkLog& cl : logs_) {
      n += static_cast<int64_t>(cl.pos.size() * 2 + cl.v32.size() * 4 + cl.v16.size() * 2) + sizeof(ChunkLog);
    }
    return n;
  }

  // Drop the entries (after a patched run consumed them).
  void clear() { std::vector<ChunkLog>().swap(logs_); }

  // Write the saved values into the tensors.
  void restore(int num_threads) {
    py::gil_scoped_release release;
    const int64_t n = static_cast<int64_t>(logs_.size());
#pragma omp parallel for schedule(static) num_threads(num_threads < 1 ? 1 : num_threads) if (n > 8 && num_threads > 1)
    for (int64_t c = 0; c < n; ++c) {
      const ChunkLog& cl = logs_[c];
      const int64_t* s = slots_.data() + 4 * cl.slot;
      const int64_t base = static_cast<int64_t>(4 * cl.g_begin) - s[3];  // tensor position of pos 0
      if (dtype_ == kFloat32) {
        uint32_t* x = as_ptr<uint32_t>(s[0]);
        for (size_t e = 0; e < cl.pos.size(); ++e) x[base + cl.pos[e]] = cl.v32[e];
      } else {
        uint16_t* x = as_ptr<uint16_t>(s[0]);
        for (size_t e = 0; e < cl.pos.size(); ++e) x[base + cl.pos[e]] = cl.v16[e];
      }
    }
  }

 private:
  std::vector<int64_t> slots_;
  std::vector<ChunkLog> logs_;
  int dtype_;
};

std::unique_ptr<LogBuffer> run_logged(int64_t slots, int64_t n_slots, int64_t chunks, int64_t n_chunks,
                                      int64_t groups_per_chunk, int dtype, bool has_h, int distribution,
                                      int num_threads, int64_t seeds, int64_t dirs, int64_t coef_x, int64_t coef_h,
                                      int64_t round_start, int64_t round_wd, int64_t round_rseed,
                                      int64_t round_flags, int64_t n_rounds, int64_t n_apply) {
  if (n_apply < 1 || n_apply >= n_rounds)
    throw std::invalid_argument("a logged run needs 1 <= n_apply < n_rounds (applied, then simulated rounds)");
  if (groups_per_chunk > 16384) throw std::invalid_argument("a logged run needs groups_per_chunk <= 16384");
  Job job = make_job(slots, chunks, n_chunks, groups_per_chunk, dtype, has_h, kRuleNone, distribution, num_threads,
                     seeds, dirs, coef_x, coef_h, round_start, round_wd, round_rseed, round_flags, n_rounds, 0.0,
                     1.0, 0.0);
  auto buffer = std::make_unique<LogBuffer>(job.slots, n_slots, n_chunks, dtype);
  job.n_apply = n_apply;
  job.log = buffer->logs().data();
  {
    py::gil_scoped_release release;
    current_isa().run(job);
    buffer->compact();
  }
  return buffer;
}

// A run that finishes a logged chain and restores in the same pass (Job::patch): before round n_patch every logged
// element takes its saved value. The launch must cover the logged run's tensors with the same chunk table (the
// Python side passes the same launch plan); the log is consumed (emptied) by the run.
void run_patched(LogBuffer& log, int64_t n_patch, int64_t slots, int64_t chunks, int64_t n_chunks,
                 int64_t groups_per_chunk, int dtype, bool has_h, int rule, int distribution, int num_threads,
                 int64_t seeds, int64_t dirs, int64_t coef_x, int64_t coef_h, int64_t round_start, int64_t round_wd,
                 int64_t round_rseed, int64_t round_flags, int64_t n_rounds, double beta, double one_minus_beta,
                 double h_min) {
  Job job = make_job(slots, chunks, n_chunks, groups_per_chunk, dtype, has_h, rule, distribution, num_threads, seeds,
                     dirs, coef_x, coef_h, round_start, round_wd, round_rseed, round_flags, n_rounds, beta,
                     one_minus_beta, h_min);
  if (n_patch < 0 || n_patch > n_rounds) throw std::invalid_argument("n_patch must be in [0, n_rounds]");
  if (dtype != log.dtype()) throw std::invalid_argument("the log was made on tensors of another dtype");
  std::vector<const ChunkLog*> by_chunk(static_cast<size_t>(n_chunks), nullptr);
  for (const ChunkLog& cl : log.logs()) {
    const bool same_chunk = cl.chunk >= 0 && cl.chunk < n_chunks && job.chunks[2 * cl.chunk] == cl.slot &&
                            static_cast<uint64_t>(job.chunks[2 * cl.chunk + 1]) == cl.g_begin;
    const int64_t* a = job.slots + 4 * cl.slot;
    const int64_t* b = log.slots() + 4 * cl.slot;
    if (!same_chunk || a[0] != b[0] || a[2] != b[2] || a[3] != b[3])
      throw std::invalid_argument("the log was made on other tensors or with another chunk table");
    by_chunk[static_cast<size_t>(cl.chunk)] = &cl;
  }
  job.patch = by_chunk.data();
  job.n_patch = n_patch;
  {
    py::gil_scoped_release release;
    current_isa().run(job);
  }
  log.clear();
}

// The logged elements' saved values become what the program (one of the rules, H read from the logged tensors)
// makes of them.
void advance_log(LogBuffer& log, int rule, int distribution, int num_threads, int64_t seeds, int64_t dirs,
                 int64_t coef_x, int64_t coef_h, int64_t round_start, int64_t round_wd, int64_t round_rseed,
                 int64_t round_flags, int64_t n_rounds, double beta, double one_minus_beta, double h_min,
                 bool has_h) {
  Job job = make_job(0, 0, 0, 16, log.dtype(), has_h, rule, distribution, num_threads, seeds, dirs, coef_x, coef_h,
                     round_start, round_wd, round_rseed, round_flags, n_rounds, beta, one_minus_beta, h_min);
  job.slots = log.slots();
  py::gil_scoped_release release;
  current_isa().advance(job, log.logs());
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
        py::arg("round_rseed"), py::arg("round_flags"), py::arg("n_rounds"), py::arg("beta"),
        py::arg("one_minus_beta"), py::arg("h_min"));
  py::class_<LogBuffer>(m, "LogBuffer", "Undo log of a logged run (see run_logged).")
      .def("size", &LogBuffer::size, "Number of logged elements.")
      .def("nbytes", &LogBuffer::nbytes, "Bytes held by the log.")
      .def("restore", &LogBuffer::restore, py::arg("num_threads"), "Write the saved values into the tensors.");
  m.def("run_logged", &run_logged,
        "Apply rounds [0, n_apply) of a program (no H update), simulate the others, and return the undo log of the "
        "elements they do not bring back.",
        py::kw_only(), py::arg("slots"), py::arg("n_slots"), py::arg("chunks"), py::arg("n_chunks"),
        py::arg("groups_per_chunk"), py::arg("dtype"), py::arg("has_h"), py::arg("distribution"),
        py::arg("num_threads"), py::arg("seeds"), py::arg("dirs"), py::arg("coef_x"), py::arg("coef_h"),
        py::arg("round_start"), py::arg("round_wd"), py::arg("round_rseed"), py::arg("round_flags"),
        py::arg("n_rounds"), py::arg("n_apply"));
  m.def("run_patched", &run_patched,
        "Run a program whose first n_patch rounds finish a logged chain; the logged elements take their saved "
        "values before round n_patch (restore and update in one pass). Consumes the log.",
        py::arg("log"), py::arg("n_patch"), py::kw_only(), py::arg("slots"), py::arg("chunks"), py::arg("n_chunks"),
        py::arg("groups_per_chunk"), py::arg("dtype"), py::arg("has_h"), py::arg("rule"), py::arg("distribution"),
        py::arg("num_threads"), py::arg("seeds"), py::arg("dirs"), py::arg("coef_x"), py::arg("coef_h"),
        py::arg("round_start"), py::arg("round_wd"), py::arg("round_rseed"), py::arg("round_flags"),
        py::arg("n_rounds"), py::arg("beta"), py::arg("one_minus_beta"), py::arg("h_min"));
  m.def("advance_log", &advance_log, "Apply a program to the logged elements' saved values (H read, not written).",
        py::arg("log"), py::kw_only(), py::arg("rule"), py::arg("distribution"), py::arg("num_threads"),
        py::arg("seeds"), py::arg("dirs"), py::arg("coef_x"), py::arg("coef_h"), py::arg("round_start"),
        py::arg("round_wd"), py::arg("round_rseed"), py::arg("round_flags"), py::arg("n_rounds"), py::arg("beta"),
        py::arg("one_minus_beta"), py::arg("h_min"), py::arg("has_h"));
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
