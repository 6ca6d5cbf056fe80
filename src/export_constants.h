// The shared constants (gradkern/constants.h) as attributes of a compiled module, so that a test
// can compare what was compiled with gradkern/_constants.py.
#pragma once

#include <pybind11/pybind11.h>

#include "gradkern/constants.h"

namespace gradkern_py {

inline void export_constants(pybind11::module_& m) {
  namespace py = pybind11;
  using gradkern::DType;
  using gradkern::NormKind;
  py::dict dtypes;
  dtypes["float32"] = static_cast<int>(DType::f32);
  dtypes["float64"] = static_cast<int>(DType::f64);
  dtypes["float16"] = static_cast<int>(DType::f16);
  dtypes["bfloat16"] = static_cast<int>(DType::bf16);
  m.attr("DTYPE_CODES") = dtypes;
  py::dict kinds;
  kinds["NONE"] = static_cast<int>(NormKind::none);
  kinds["L1"] = static_cast<int>(NormKind::l1);
  kinds["L2"] = static_cast<int>(NormKind::l2);
  kinds["MIN_ABS"] = static_cast<int>(NormKind::min_abs);
  kinds["POWER"] = static_cast<int>(NormKind::power);
  m.attr("NORM_KINDS") = kinds;
  m.attr("CHUNK_ELEMS") = gradkern::kChunkElems;
  m.attr("MIN_PARALLEL_RANGES") = gradkern::kMinParallelRanges;
  m.attr("MIN_PARALLEL_RANGES_SHARED") = gradkern::kMinParallelRangesShared;
  m.attr("SHARE_WINDOW_NS") = gradkern::kShareWindowNs;
  m.attr("SHARED_RUN_PER_WAIT") = gradkern::kSharedRunPerWait;
}

}  // namespace gradkern_py
