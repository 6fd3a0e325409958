"""Shared machinery of the hiso_kernels benchmarks: shapes, the byte model, providers, timing, memory, tables, plots.

Used by the pytest-benchmark suite (``test_bench_*.py``), the standalone runners (``run_cpu.py``, ``run_gpu.py``) and
``report.py``. Everything a number in a results table means is defined here, once.

Vocabulary
----------
case      one (kernel, shape, dtype, terms) point: *what* is computed.
provider  one way of computing it: a hiso backend (``cpu``, ``cuda``, ``triton``, ``torch`` = the reference), the
          eager MeZO loop (``eager``), the same loop under ``torch.compile`` (``compile``), a copy of the same bytes
          (``copy``), the generator alone (``generator:<backend>``), ``torch.randn`` of the same count (``randn``), and
          for multi-term kernels one fused call per direction / per round (``per-direction:<b>``, ``per-round:<b>``).
terms     directions of a multi-direction update, rounds of a replay (one direction each), 1 otherwise.

Byte model (benchmarks/README.md): a pass reads and writes every parameter element once, and H where the kernel uses it.
With s = bytes per parameter element (bf16 2, fp32 4) and H in fp32:

    perturb            2 s          (bf16: 4 B/element, fp32: 8)
    perturb with H     2 s + 4      (read H;  bf16: 8, fp32: 12)
    update (any D)     2 s          (one pass whatever the number of directions)
    HiSo round         2 s + 8      (read and write H;  bf16: 12, fp32: 16)
    replay (any R)     2 s + 8      (HiSo rounds: one pass whatever the number of rounds)

Metrics
-------
effective GB/s   minimal bytes / median time
% of copy        t_copy / t  (the copy moves the same number of bytes, read half, write half)
elements/s       numel x terms / t   (element x directions per second for multi-term kernels)
roofline         max(t_mem, t_gen): t_mem = minimal bytes / copy bandwidth (= t_copy), t_gen = time of the
                 generator-only kernel ``directions_sum`` drawing numel x terms Gaussian values on the same backend
                 (it regenerates and reduces the directions and touches no parameter memory)
% of roofline    roofline / t;  "bound" names the larger term (memory or generator)
peak-memory      CPU: growth of the peak resident set (VmHWM, the value behind ru_maxrss) during one call, in a fresh
delta            subprocess after a warm-up and a reset of the peak;
                 GPU: torch.cuda.max_memory_allocated() - memory_allocated() before the call
"""

from __future__ import annotations

# The package is split by job (cases -> providers -> measure -> reporting -> runner); ``import benchlib as bl`` gives
# every name of all five, as the scripts and the pytest suite use them.
from .cases import *
from .cases import _EXPECTED  # noqa: F401
from .measure import *
from .measure import _reset_peak_rss  # noqa: F401
from .providers import *
from .reporting import *
from .reporting import _fmt, _fmt_bytes, _fmt_time  # noqa: F401
from .runner import *
