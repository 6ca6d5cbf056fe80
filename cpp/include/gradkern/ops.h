// The CPU operations. Every op makes exactly one pass over the memory of the table.
#pragma once

#include <cstdint>

#include "gradkern/constants.h"  // NormKind
#include "gradkern/tensor_table.h"

namespace gradkern {

// Per-tensor results of one read pass. Each array has table.size entries.
struct TensorStatsOut {
  double* power_sum;       // the NormKind accumulator (min |g| for min_abs); NaN if any NaN
  double* max_abs;         // max |g|; NaN if the tensor holds a NaN; 0 for empty tensors
  std::int64_t* nonfinite; // count of NaN and +-inf
  std::int64_t* zeros;     // count of exact zeros (+0 and -0)
};

void tensor_stats(const TensorTable& table, NormKind kind, double p, TensorStatsOut out);

// The rows of a table that is still being read. fill() and done() are called on the thread that
// called tensor_stats_streaming, never on another.
class TableSource {
 public:
  virtual ~TableSource() = default;
  // Writes rows [begin, end) into the arrays behind the table, in order; returns how many rows
  // it wrote before meeting one it cannot describe (the pass then stops). Must not throw.
  virtual std::int64_t fill(std::int64_t begin, std::int64_t end) = 0;
  // Every row has been asked for; the caller's thread now only reduces.
  virtual void done() {}
};

// tensor_stats while source writes the table's rows: the other threads reduce the rows already
// written, so the reading and the pass overlap. Same results, bit for bit, as tensor_stats on the
// finished table. Returns false when the source stopped early; out is then meaningless.
bool tensor_stats_streaming(TableSource& source, const TensorTable& table, NormKind kind,
                            double p, TensorStatsOut out);

// In place, per tensor t: if !(coef[t] >= 1) multiply by coef[t] (so a NaN coefficient poisons the
// tensor as torch does); then clamp to [-clip_value, clip_value], writing only elements that
// change. coef may be null (no scaling), or hold one entry (applies to all) or table.size entries.
// clip_value may be +inf (no clamping). clip_value is rounded to each tensor's dtype first.
void clip_in_place(const TensorTable& table, const double* coef, std::int64_t n_coef,
                   double clip_value);

}  // namespace gradkern
