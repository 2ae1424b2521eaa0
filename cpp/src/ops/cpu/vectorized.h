#pragma once
// Vectors of the accumulation type for the CPU kernels, as GCC and Clang vector extensions, one
// register wide for the instruction set the file is compiled for: 64 bytes with AVX-512, 32 with
// AVX2, 16 otherwise (SSE2, the x86-64 baseline; NEON). The kernels write each loop once for a
// vector body and a scalar tail (load_as / store_as with T = Vec<acc_t> or acc_t). Reductions keep
// four sums in flight and add a vector's lanes as a tree; bfloat16/float16 convert a whole vector
// at once. No `#pragma omp simd`: built with -fopenmp (which at::parallel_for needs), GCC 12
// compiles such reductions far slower than these loops.
//
// Every kernel file that includes this is compiled once per CPU capability (see cpu/dispatch.h),
// with MATTERHORN_CPU_CAPABILITY naming it: everything here lives in an inline namespace of that
// name, so that the linker never mixes up two builds of one function.
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#ifndef MATTERHORN_CPU_CAPABILITY
#error "compile the CPU kernels with MATTERHORN_CPU_CAPABILITY=DEFAULT|AVX2|AVX512 (see CMakeLists.txt)"
#endif

namespace matterhorn::ops::cpu {
inline namespace MATTERHORN_CPU_CAPABILITY {

#if defined(__AVX512F__)
constexpr std::size_t kVectorBytes = 64;
#elif defined(__AVX2__)
constexpr std::size_t kVectorBytes = 32;
#else
constexpr std::size_t kVectorBytes = 16;
#endif

template <typename T, std::size_t bytes = kVectorBytes>
struct Vector {
  using type [[gnu::vector_size(bytes)]] = T;
};
template <typename acc_t>
using Vec = typename Vector<acc_t>::type;
template <typename acc_t>
constexpr int64_t kLanes = kVectorBytes / sizeof(acc_t);

// Values in a T: 1 for a scalar, kLanes for a Vec.
template <typename T>
constexpr int64_t kWidth = [] {
  if constexpr (std::is_arithmetic_v<T>) {
    return int64_t{1};
  } else {
    return static_cast<int64_t>(sizeof(T) / sizeof(std::remove_cvref_t<decltype(T{}[0])>));
  }
}();

// kLanes values from p (any alignment), converted to the accumulation type; bfloat16 by a shift,
// float16 by one vcvtph2ps where the target has AVX-512.
template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load(const scalar_t* p) {
  Vec<acc_t> v;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    typename Vector<uint16_t, kVectorBytes / 2>::type half;  // a bfloat16 is the top half of a float32
    std::memcpy(&half, p, sizeof half);
    const auto bits = __builtin_convertvector(half, typename Vector<uint32_t>::type) << 16;
    std::memcpy(&v, &bits, sizeof v);
#if defined(__AVX512F__)  // one vcvtph2ps (GCC 12 converts a _Float16 vector lane by lane)
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    __m256i half;
    std::memcpy(&half, p, sizeof half);
    const __m512 wide = _mm512_cvtph_ps(half);
    std::memcpy(&v, &wide, sizeof v);
#elif defined(__AVX2__) && defined(__F16C__)
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    __m128i half;
    std::memcpy(&half, p, sizeof half);
    const __m256 wide = _mm256_cvtph_ps(half);
    std::memcpy(&v, &wide, sizeof v);
#elif defined(__FLT16_MAX__)  // the compiler has _Float16 (arm64: one instruction per register)
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    typename Vector<_Float16, kVectorBytes / 2>::type half;
    std::memcpy(&half, p, sizeof half);
    v = __builtin_convertvector(half, Vec<float>);
#endif
  } else {
    for (int64_t j = 0; j < kLanes<acc_t>; ++j) v[j] = static_cast<acc_t>(p[j]);
  }
  return v;
}

// kLanes values to p, rounded to scalar_t to nearest even as c10's conversions do (NaN stays NaN).
template <typename acc_t, typename scalar_t>
inline void store(scalar_t* p, const Vec<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(p, &v, sizeof v);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    using Bits = typename Vector<uint32_t>::type;
    Bits bits;
    std::memcpy(&bits, &v, sizeof bits);
    Bits rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const Bits nan = reinterpret_cast<Bits>(v != v);  // all ones where NaN
    rounded = (rounded & ~nan) | (0x7FC0u & nan);
    const auto half = __builtin_convertvector(rounded, typename Vector<uint16_t, kVectorBytes / 2>::type);
    std::memcpy(p, &half, sizeof half);
#if defined(__AVX512F__)
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    __m512 wide;
    std::memcpy(&wide, &v, sizeof wide);
    const __m256i half = _mm512_cvtps_ph(wide, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    std::memcpy(p, &half, sizeof half);
#elif defined(__AVX2__) && defined(__F16C__)
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    __m256 wide;
    std::memcpy(&wide, &v, sizeof wide);
    const __m128i half = _mm256_cvtps_ph(wide, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    std::memcpy(p, &half, sizeof half);
#elif defined(__FLT16_MAX__)
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    const auto half = __builtin_convertvector(v, typename Vector<_Float16, kVectorBytes / 2>::type);
    std::memcpy(p, &half, sizeof half);
#endif
  } else {
    for (int64_t j = 0; j < kLanes<acc_t>; ++j) p[j] = static_cast<scalar_t>(v[j]);
  }
}

// T = acc_t: the value at p; T = Vec<acc_t>: kLanes values from p. For code written once for a
// row's vector body and its scalar tail.
template <typename T, typename scalar_t>
inline T load_as(const scalar_t* p) {
  if constexpr (std::is_arithmetic_v<T>) {
    return static_cast<T>(*p);
  } else {
    return load<std::remove_cvref_t<decltype(T{}[0])>>(p);
  }
}

// Stores the one or kLanes values of v at p.
template <typename T, typename scalar_t>
inline void store_as(scalar_t* p, const T& v) {
  if constexpr (std::is_arithmetic_v<T>) {
    *p = static_cast<scalar_t>(v);
  } else {
    store<std::remove_cvref_t<decltype(T{}[0])>>(p, v);
  }
}

// Calls body(i, T{}) for i < n: T = Vec<acc_t> for each run of kLanes indices from i, then
// T = acc_t for each index of the tail.
template <typename acc_t, typename Body>
inline void for_each_lane(int64_t n, Body&& body) {
  int64_t i = 0;
  for (; i + kLanes<acc_t> <= n; i += kLanes<acc_t>) body(i, Vec<acc_t>{});
  for (; i < n; ++i) body(i, acc_t{});
}

// *p += v for the one or kLanes values at p.
template <typename T, typename acc_t>
inline void add_to(acc_t* p, const T& v) {
  if constexpr (std::is_arithmetic_v<T>) {
    *p += v;
  } else {
    store<acc_t>(p, load<acc_t>(p) + v);
  }
}

// The sum of a vector's lanes: halves added until one lane is left.
template <typename T, std::size_t bytes = kVectorBytes>
inline T sum_lanes(const typename Vector<T, bytes>::type& v) {
  if constexpr (bytes == sizeof(T)) {
    return v[0];
  } else {
    using Half = typename Vector<T, bytes / 2>::type;
    Half low, high;
    std::memcpy(&low, &v, sizeof(Half));
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    return sum_lanes<T, bytes / 2>(low + high);
  }
}

// The sums over i < n of `count` quantities at once: terms(i, T{}) returns them as an array of
// `count` T, for the kLanes indices from i when T is Vec<acc_t> and for the one index i when T is
// acc_t (the tail). Each i is visited once. Four partial sums of each quantity.
template <typename acc_t, std::size_t count, typename Terms>
inline std::array<acc_t, count> row_sums(int64_t n, Terms&& terms) {
  using V = Vec<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  std::array<std::array<V, 4>, count> partial{};
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    for (int64_t k = 0; k < 4; ++k) {
      const auto t = terms(i + k * W, V{});
      for (std::size_t q = 0; q < count; ++q) partial[q][k] += t[q];
    }
  }
  for (; i + W <= n; i += W) {
    const auto t = terms(i, V{});
    for (std::size_t q = 0; q < count; ++q) partial[q][0] += t[q];
  }
  std::array<acc_t, count> sums{};
  for (; i < n; ++i) {
    const auto t = terms(i, acc_t{});
    for (std::size_t q = 0; q < count; ++q) sums[q] += t[q];
  }
  for (std::size_t q = 0; q < count; ++q) {
    sums[q] += sum_lanes<acc_t>((partial[q][0] + partial[q][1]) + (partial[q][2] + partial[q][3]));
  }
  return sums;
}

// Mean and sum of squared deviations from it of n contiguous values: two passes, the second over
// values still in cache (n of a few thousand), no cancellation.
template <typename acc_t, typename scalar_t>
inline std::array<acc_t, 2> mean_and_m2(const scalar_t* x, int64_t n) {
  const auto [sum] = row_sums<acc_t, 1>(n, [&](int64_t i, auto lanes) {
    return std::array{load_as<decltype(lanes)>(x + i)};
  });
  const acc_t mean = sum / static_cast<acc_t>(n);
  const auto [m2] = row_sums<acc_t, 1>(n, [&](int64_t i, auto lanes) {
    const auto d = load_as<decltype(lanes)>(x + i) - mean;
    return std::array{d * d};
  });
  return {mean, m2};
}

}  // namespace MATTERHORN_CPU_CAPABILITY
}  // namespace matterhorn::ops::cpu
