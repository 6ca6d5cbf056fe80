// Hot loops are compiled twice, for AVX2 and for the baseline, and the loader picks one at run
// time (GCC function multi-versioning). The build stays portable (no -march=native) and still
// uses wide vectors where the CPU has them. With GRADKERN_NATIVE the baseline already is native.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__AVX2__) && \
    defined(__linux__)
#define GRADKERN_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define GRADKERN_SIMD_CLONES
#endif
