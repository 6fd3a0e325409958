// AVX-512 (F, BW, DQ, VL) build of the CPU kernel.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
#define HISO_CPU_ISA avx512
#define HISO_CPU_AVX2 1  // GCC does not define __AVX2__ for a target pragma in C++
#include "zo_cpu_kernel.h"
#endif
