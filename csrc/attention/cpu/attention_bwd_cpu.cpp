// Chooses the CPU backward variant for the running processor.
#include "attention_bwd_cpu.h"

#include <string>

namespace headops::cpu {

namespace DEFAULT {
void attention_backward_isa(const BackwardParams& p, at::ScalarType acc_dtype);
}
#if defined(__x86_64__)
namespace AVX2 {
void attention_backward_isa(const BackwardParams& p, at::ScalarType acc_dtype);
}
namespace AVX512 {
void attention_backward_isa(const BackwardParams& p, at::ScalarType acc_dtype);
}
#endif

// measured on the 2-core Sapphire Rapids (B=1, H=16, S=2048, D=128, fp32, forward+backward):
// 64x256 ... 256x512 all within 3 % of each other (the five sgemm calls dominate)
TileShape backward_tile_shape(int64_t /*head_dim*/) { return {128, 256}; }

void attention_backward(const BackwardParams& p, at::ScalarType acc_dtype) {
#if defined(__x86_64__)
  const std::string& cap = cpu_capability();
  if (cap == "AVX512") return AVX512::attention_backward_isa(p, acc_dtype);
  if (cap == "AVX2") return AVX2::attention_backward_isa(p, acc_dtype);
#endif
  DEFAULT::attention_backward_isa(p, acc_dtype);
}

}  // namespace headops::cpu
