// Integer codes shared with Python: storage dtypes (hiso_kernels/_codes.py), distributions and curvature rules
// (hiso_kernels/spec.py). tests/test_build_and_info.py parses this file and checks it against the Python enums.
#pragma once

namespace hiso {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum Distribution : int { kGaussian = 0, kRademacher = 1 };
enum CurvatureRule : int { kRuleNone = 0, kRuleGsq = 1, kRuleStein = 2 };
// Bits of a program's round_flags (hiso_kernels/_program.py: ROUND_UPDATES_H).
enum RoundFlag : int { kRoundUpdatesH = 1 };

}  // namespace hiso
