// Baseline build of the CPU kernel (SSE2 on x86-64, NEON on aarch64).
#define HISO_CPU_ISA generic
#include "zo_cpu_kernel.h"
