// Chooses the CPU decode-attention variant for the running processor.
#include "decode_cpu.h"

#include <string>

#include "../../attention/cpu/attention_fwd_cpu.h"

namespace headops::cpu {

namespace DEFAULT {
void decode_attention_isa(const DecodeParams& p, at::ScalarType dtype);
}
#if defined(__x86_64__)
namespace AVX2 {
void decode_attention_isa(const DecodeParams& p, at::ScalarType dtype);
}
namespace AVX512 {
void decode_attention_isa(const DecodeParams& p, at::ScalarType dtype);
}
#endif

void decode_attention(const DecodeParams& p, at::ScalarType dtype) {
#if defined(__x86_64__)
  const std::string& cap = cpu_capability();
  if (cap == "AVX512") return AVX512::decode_attention_isa(p, dtype);
  if (cap == "AVX2") return AVX2::decode_attention_isa(p, dtype);
#endif
  DEFAULT::decode_attention_isa(p, dtype);
}

}  // namespace headops::cpu
