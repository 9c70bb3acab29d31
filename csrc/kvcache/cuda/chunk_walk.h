// The 16-byte chunks of a staged tile that one lane copies (the CUDA decode's cp.async staging),
// walked without a division. Plain C++: the CPU build binds it (headops._C.semantics.staging_chunks)
// and tests/test_cuda_emulation.py checks it against the division it replaced.
#pragma once

#include "../../attention/head_semantics.h"  // HEADOPS_HD

namespace headops {
namespace cuda {

// A tile of `rows` rows of `chunks` 16-byte chunks each, copied by a warp: lane l copies the chunks
// l, l + 32, l + 64, ... of their row-major order, here as (row, chunk). The staging loop used to
// divide each index by `chunks` (an integer division and 64-bit indexing per 16-byte copy, most
// of its instructions); 32 = row_step * chunks + chunk_step with chunk_step < chunks, so a step
// carries into the row once at most.
struct ChunkWalk {
  static constexpr int kLanes = 32;
  int row, chunk, rows, row_step, chunk_step, chunks;
  HEADOPS_HD ChunkWalk(int lane, int chunks_, int rows_)
      : row(lane / chunks_), chunk(lane % chunks_), rows(rows_), row_step(kLanes / chunks_),
        chunk_step(kLanes % chunks_), chunks(chunks_) {}
  HEADOPS_HD bool more() const { return row < rows; }
  HEADOPS_HD void next() {
    row += row_step;
    chunk += chunk_step;
    if (chunk >= chunks) {
      chunk -= chunks;
      ++row;
    }
  }
};

}  // namespace cuda
}  // namespace headops
