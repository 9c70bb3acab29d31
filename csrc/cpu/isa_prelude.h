// Every standard-library and ATen header a per-instruction-set kernel uses, except ATen's vec
// headers. isa_target.h includes this BEFORE its `#pragma GCC target`: a template defined
// before the pragma is compiled for the baseline ISA wherever it is instantiated, so the
// instantiations an AVX2/AVX-512 translation unit shares with the rest of the library
// (std::vector<float>, at::Tensor's inline methods, c10::BFloat16 conversions ...) hold only
// baseline code, whichever copy the linker keeps. Headers included after the pragma define
// code for the target ISA; those must live in an ISA namespace (at::vec::CPU_CAPABILITY,
// headops::cpu::CPU_CAPABILITY, HEADOPS_ISA_NAMESPACE). tests/test_isa_isolation.py checks the
// built library for AVX code outside those namespaces.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "finite_half.h"  // its inline loop is shared with the portable code (attention_bwd.cpp)
