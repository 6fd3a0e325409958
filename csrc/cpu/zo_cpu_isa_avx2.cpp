// AVX2 build of the CPU kernel. FMA stays off: the spec forbids contraction (and -ffp-contract=off is set too).
#if defined(__x86_64__)
#pragma GCC target("avx2")
#define HISO_CPU_ISA avx2
#define HISO_CPU_AVX2 1  // GCC does not define __AVX2__ for a target pragma in C++
#include "zo_cpu_kernel.h"
#endif
