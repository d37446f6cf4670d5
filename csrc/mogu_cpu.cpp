// mogu_cpu.cpp: the CPU forward of mogu_C::mogu_linear (contract in mogu_ops.h).
//
// Plan (M rows, Er = E * r stacked LoRA columns, acc = fp32, or fp64 for fp64 x):
//   a. shrink and router together: the Er + E dot products of each x row with the stacked
//      S = [A_0; ..; A_{E-1}; v], K long, accumulated in acc (the router rows stay in their
//      full-precision copy, so bf16/fp16 x still gets fp32 router logits). Writes the unscaled
//      shrink z into saved and the logits into a small scratch. (Measured against a BLAS GEMM
//      for the A part: no slower at M = 128..512, and no extra call at decode.)
//   b. y = x W^T: one BLAS GEMM (MKL / oneDNN) straight into y's buffer, the only pass over W.
//      It runs after (a) and after every other lookup: its pass over W evicts the caches, so
//      anything touched afterwards comes back as cache misses (measurable at decode).
//   c. gating and the epilogue, per (row block x column chunk) tile of y: sigmoid gates,
//      base-row mask, gate sum gs and the rank-space scaling t = s * mix_e * z (a few flops
//      per row), then the chunk of [B_0 | .. ] transposed into an (Er x kColumns) acc tile in
//      L1/L2 and, for each row, y = gs * (y + b) + t . tile: y is read once and written once.
// (a) and (c) are parallel (at::parallel_for) over units small enough that decode splits too:
// (8-row group, chunk of S rows) and (row block, column chunk); a call is split only where a
// task gets at least kMinWorkPerTask multiply-adds. No tensor is allocated besides the
// outputs; the (M, E) logits and the tasks' scratch are per thread and reused across calls.
// bf16 x with even K on a CPU with oneDNN's bf16 brgemm (AMX, AVX512-BF16) takes the plan of
// forward_bf16_brgemm below instead: the same three steps with the two small products on the
// matrix unit (or the AVX512-BF16 dot-product instruction), the router logits still fp32.
// bf16 and fp16 values are converted 16 at a time (to_bf16_bits, half_bits_to_float,
// float_to_half_bits: bit for bit c10's conversions).
// The hot loops use fixed-width GCC/Clang vector types; MOGU_CPU_CLONES compiles them for
// AVX-512, AVX2 and baseline x86-64 and picks one at load time (GCC function multiversioning),
// since the extension as a whole is built for baseline x86-64.
#include <cstdlib>
#include <string>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "mogu_entry.h"

#include <ATen/native/CPUBlas.h>
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
#define MOGU_HAVE_BRGEMM 1
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MOGU_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOGU_CPU_CLONES
#endif

#if !defined(__GNUC__) && !defined(__clang__)
#error "mogu_cpu.cpp needs GCC or Clang (vector extensions); the package then falls back to the reference"
#endif
#define MOGU_ALWAYS_INLINE inline __attribute__((always_inline))
#define MOGU_RESTRICT __restrict__
// The 64-byte vector helpers are always inlined, so the ABI note GCC emits for passing them
// by value in the baseline clone does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mogu {
namespace {

// Rows per dot-product group (kRowGroup accumulator chains, each S vector loaded once for all).
constexpr int64_t kRowGroup = 8;
// K elements per block of the grouped dot products (8 rows of fp32 x: 16 KiB, in L1).
constexpr int64_t kDotBlock = 512;
// Stacked rows of S per task when there are too few row groups to keep the threads busy.
constexpr int64_t kStackedRowsPerTask = 4;
// Epilogue tiles: kRowBlock rows x kColumns columns. The (Er x kColumns) transposed tile of
// [B_0 | ..] stays in L1/L2 while the block's rows are updated (the transpose costs
// 1/kRowBlock of the expand's multiply-adds).
constexpr int64_t kRowBlock = 128;
constexpr int64_t kColumns = 256;
// Minimum multiply-adds per parallel task: below it the fork/join costs more than it saves.
constexpr int64_t kMinWorkPerTask = 1 << 15;

// A per-thread scratch buffer of at least n elements, reused across calls (no allocation and
// no zero fill per call; nothing in it outlives the call that writes it).
template <typename T, int kSlot>
T* scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// scratch<T, kSlot> at a 64-byte boundary: for operands of the matrix unit, whose tile rows
// are 64 bytes (a row split across two cache lines loads at half speed: measured 1.1-1.8x
// slower calls with the plain vector's 16-byte alignment).
template <typename T, int kSlot>
T* aligned_scratch(size_t n) {
  constexpr size_t kPad = 64 / sizeof(T);
  T* p = scratch<T, kSlot>(n + kPad);
  const uintptr_t at = (reinterpret_cast<uintptr_t>(p) + 63) & ~static_cast<uintptr_t>(63);
  return reinterpret_cast<T*>(at);
}

// The (M, E) router logits of one call: written in step (a), read in step (c) by any thread.
// The calling thread's scratch (taken before the parallel regions, which never use this
// slot), so the call makes no allocation beyond its three outputs: at decode shapes an
// at::empty costs a tenth of the whole call.
template <typename acc_t>
acc_t* logits_scratch(int64_t M, int64_t E) {
  return scratch<acc_t, 9>(static_cast<size_t>(M * E));
}

// Fixed-width vectors (GCC/Clang vector extensions): one 512-bit register in the AVX-512
// clone, two 256-bit ones in the AVX2 clone, four SSE ones in the baseline clone; 16 fp32 or
// 8 fp64 lanes.
typedef float vfloat __attribute__((vector_size(64)));
typedef double vdouble __attribute__((vector_size(64)));
typedef uint16_t vu16x16 __attribute__((vector_size(32)));
typedef uint32_t vu32x16 __attribute__((vector_size(64)));

template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  using type = vfloat;
  static constexpr int64_t lanes = 16;
};
template <>
struct Vec<double> {
  using type = vdouble;
  static constexpr int64_t lanes = 8;
};

// fp16 <-> fp32 for 16 lanes with integer vector operations (no F16C needed, so every
// clone vectorizes it): bit for bit c10::Half's conversions (fp32 -> fp16 rounds to nearest
// even, NaN -> 0x7E00 with the sign kept, overflow -> inf).
MOGU_ALWAYS_INLINE vfloat half_bits_to_float(vu16x16 h) {
  typedef int32_t vi32x16 __attribute__((vector_size(64)));
  const vu32x16 w = __builtin_convertvector(h, vu32x16);
  const vu32x16 sign = (w & 0x8000u) << 16;
  vu32x16 o = (w & 0x7FFFu) << 13;                 // exponent and mantissa, fp32-aligned
  const vu32x16 exp = o & 0x0F800000u;
  o += 0x38000000u;                                // rebias (127 - 15) << 23
  const vi32x16 is_special = exp == 0x0F800000u;   // inf / NaN
  const vi32x16 is_small = exp == 0u;              // zero / subnormal
  o = is_special ? o + 0x38000000u : o;
  vfloat f;
  vu32x16 o_small = o + 0x00800000u;
  vfloat f_small;
  __builtin_memcpy(&f_small, &o_small, sizeof(f_small));
  f_small -= vfloat{} + 6.103515625e-05f;          // 2^-14: renormalize a subnormal
  __builtin_memcpy(&f, &o, sizeof(f));
  vu32x16 bits, bits_small;
  __builtin_memcpy(&bits, &f, sizeof(bits));
  __builtin_memcpy(&bits_small, &f_small, sizeof(bits_small));
  bits = (is_small ? bits_small : bits) | sign;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}

MOGU_ALWAYS_INLINE vu16x16 float_to_half_bits(vfloat v) {
  typedef int32_t vi32x16 __attribute__((vector_size(64)));
  vu32x16 f;
  __builtin_memcpy(&f, &v, sizeof(f));
  const vu32x16 sign = f & 0x80000000u;
  f ^= sign;
  // too large (>= 65520 rounds to inf) / inf / NaN
  const vi32x16 is_big = f >= ((127u + 16u) << 23);
  const vu32x16 big = f > 0x7F800000u ? vu32x16{} + 0x7E00u : vu32x16{} + 0x7C00u;
  // subnormal or zero result: let the FPU round by adding a magic number
  const vi32x16 is_small = f < (113u << 23);
  vfloat fs;
  __builtin_memcpy(&fs, &f, sizeof(fs));
  const uint32_t magic_bits = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  float magic;
  __builtin_memcpy(&magic, &magic_bits, sizeof(magic));
  fs += magic;
  vu32x16 small;
  __builtin_memcpy(&small, &fs, sizeof(small));
  small -= magic_bits;
  // normal: rebias and round to nearest even
  const vu32x16 normal = (f + ((15u - 127u) << 23) + 0xFFFu + ((f >> 13) & 1u)) >> 13;
  vu32x16 o = is_big ? big : (is_small ? small : normal);
  o |= sign >> 16;
  return __builtin_convertvector(o, vu16x16);
}

// Vec<acc_t>::lanes values of p, converted to acc_t (unaligned load).
template <typename acc_t, typename T>
MOGU_ALWAYS_INLINE typename Vec<acc_t>::type load_vec(const T* p) {
  using V = typename Vec<acc_t>::type;
  V v;
  if constexpr (std::is_same_v<T, acc_t>) {
    __builtin_memcpy(&v, p, sizeof(V));
  } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    vu16x16 bits;  // bf16 is the upper half of an fp32
    __builtin_memcpy(&bits, p, sizeof(bits));
    const vu32x16 wide = __builtin_convertvector(bits, vu32x16) << 16;
    __builtin_memcpy(&v, &wide, sizeof(V));
  } else if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<acc_t, float>) {
    vu16x16 bits;
    __builtin_memcpy(&bits, p, sizeof(bits));
    v = half_bits_to_float(bits);
  } else {
    acc_t tmp[Vec<acc_t>::lanes];
    for (int64_t l = 0; l < Vec<acc_t>::lanes; ++l) tmp[l] = static_cast<acc_t>(p[l]);
    __builtin_memcpy(&v, tmp, sizeof(V));
  }
  return v;
}

// 16 fp32 values -> their bf16 bit patterns, rounded to nearest even, NaN -> 0x7FC0: bit for
// bit c10::BFloat16's conversion, without its one-value-at-a-time loop.
MOGU_ALWAYS_INLINE vu16x16 to_bf16_bits(vfloat v) {
  typedef int32_t vi32x16 __attribute__((vector_size(64)));
  vu32x16 bits;
  __builtin_memcpy(&bits, &v, sizeof(bits));
  const vu32x16 rounded = (bits + ((bits >> 16) & 1u) + 0x7FFFu) >> 16;
  const vi32x16 is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  const vu32x16 out = is_nan ? vu32x16{} + 0x7FC0u : rounded;
  return __builtin_convertvector(out, vu16x16);
}

template <typename acc_t, typename T>
MOGU_ALWAYS_INLINE void store_vec(T* p, typename Vec<acc_t>::type v) {
  if constexpr (std::is_same_v<T, acc_t>) {
    __builtin_memcpy(p, &v, sizeof(v));
  } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    const vu16x16 bits = to_bf16_bits(v);
    __builtin_memcpy(p, &bits, sizeof(bits));
  } else if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<acc_t, float>) {
    const vu16x16 bits = float_to_half_bits(v);
    __builtin_memcpy(p, &bits, sizeof(bits));
  } else {
    acc_t tmp[Vec<acc_t>::lanes];
    __builtin_memcpy(tmp, &v, sizeof(v));
    for (int64_t l = 0; l < Vec<acc_t>::lanes; ++l) p[l] = static_cast<T>(tmp[l]);
  }
}

template <typename acc_t>
MOGU_ALWAYS_INLINE acc_t reduce_add(typename Vec<acc_t>::type v) {
  acc_t tmp[Vec<acc_t>::lanes];
  __builtin_memcpy(tmp, &v, sizeof(v));
  acc_t s = 0;
  for (int64_t l = 0; l < Vec<acc_t>::lanes; ++l) s += tmp[l];
  return s;
}

// out[i * ldo + c] = sum_k x_i[k] * S[c * lds + k] for the RX rows x_i = x + i * ldx and c in
// [0, C), accumulated in acc_t. RX = kRowGroup: the rows are independent accumulator chains,
// each S vector is loaded once for all of them, and K runs in blocks of kDotBlock so that the
// rows' block of x stays in L1 while all C rows of S pass by. RX = 1 (a lone row): four chains
// over consecutive vectors of K instead.
template <int RX, typename acc_t, typename TX, typename TS>
MOGU_ALWAYS_INLINE void dot_rows(const TX* x, int64_t ldx, const TS* S, int64_t lds, int64_t C, int64_t K,
                                 acc_t* out, int64_t ldo) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = Vec<acc_t>::lanes;
  if constexpr (RX == 1) {
    for (int64_t c = 0; c < C; ++c) {
      const TS* sc = S + c * lds;
      V a0{}, a1{}, a2{}, a3{};
      int64_t k = 0;
      for (; k + 4 * L <= K; k += 4 * L) {
        a0 += load_vec<acc_t>(x + k) * load_vec<acc_t>(sc + k);
        a1 += load_vec<acc_t>(x + k + L) * load_vec<acc_t>(sc + k + L);
        a2 += load_vec<acc_t>(x + k + 2 * L) * load_vec<acc_t>(sc + k + 2 * L);
        a3 += load_vec<acc_t>(x + k + 3 * L) * load_vec<acc_t>(sc + k + 3 * L);
      }
      for (; k + L <= K; k += L) a0 += load_vec<acc_t>(x + k) * load_vec<acc_t>(sc + k);
      acc_t a = reduce_add<acc_t>((a0 + a1) + (a2 + a3));
      for (; k < K; ++k) a += static_cast<acc_t>(x[k]) * static_cast<acc_t>(sc[k]);
      out[c] = a;
    }
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < RX; ++i) out[i * ldo + c] = acc_t(0);
    // Half-precision x: the block of RX rows is converted to acc_t once, not once per S row.
    constexpr bool kConvertX = !std::is_same_v<TX, acc_t>;
    alignas(64) acc_t xbuf[kConvertX ? RX * kDotBlock : 1];
    for (int64_t kb = 0; kb < K; kb += kDotBlock) {
      const int64_t ke = std::min(K, kb + kDotBlock);
      if constexpr (kConvertX) {
        for (int i = 0; i < RX; ++i) {
          int64_t k = kb;
          for (; k + L <= ke; k += L)
            store_vec<acc_t>(xbuf + i * kDotBlock + (k - kb), load_vec<acc_t>(x + i * ldx + k));
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        const TS* sc = S + c * lds;
        V acc[RX];
        for (int i = 0; i < RX; ++i) acc[i] = V{};
        int64_t k = kb;
        for (; k + L <= ke; k += L) {
          const V sv = load_vec<acc_t>(sc + k);
          if constexpr (kConvertX) {
            for (int i = 0; i < RX; ++i) acc[i] += load_vec<acc_t>(xbuf + i * kDotBlock + (k - kb)) * sv;
          } else {
            for (int i = 0; i < RX; ++i) acc[i] += load_vec<acc_t>(x + i * ldx + k) * sv;
          }
        }
        for (int i = 0; i < RX; ++i) {
          acc_t a = reduce_add<acc_t>(acc[i]);
          for (int64_t kk = k; kk < ke; ++kk) a += static_cast<acc_t>(x[i * ldx + kk]) * static_cast<acc_t>(sc[kk]);
          out[i * ldo + c] += a;
        }
      }
    }
  }
}

// (a) for rows [m0, m1) (m0 a multiple of kRowGroup) and stacked rows [c0, c1) of
// S = [A; v]: z[m, c] = x_m . A_c into saved (M, Er+E) columns c < Er, and the router logits
// x_m . v_e into logits (M, E). x rows have stride ldx (unit stride in K); A (Er, K) is in
// x's dtype, v (E, K) in acc.
template <typename scalar_t, typename acc_t>
MOGU_ALWAYS_INLINE void shrink_router_impl(const scalar_t* x, int64_t ldx, const scalar_t* A, const acc_t* v,
                                           int64_t m0, int64_t m1, int64_t c0, int64_t c1, int64_t K, int64_t ER,
                                           int64_t E, acc_t* saved, acc_t* logits) {
  const int64_t C = ER + E;
  const int64_t a0 = std::min(c0, ER), a1 = std::min(c1, ER);                 // rows of A
  const int64_t v0 = std::max(c0, ER) - ER, v1 = std::max(c1, ER) - ER;       // rows of v
  int64_t m = m0;
  for (; m + kRowGroup <= m1; m += kRowGroup) {
    dot_rows<kRowGroup>(x + m * ldx, ldx, A + a0 * K, K, a1 - a0, K, saved + m * C + a0, C);
    dot_rows<kRowGroup>(x + m * ldx, ldx, v + v0 * K, K, v1 - v0, K, logits + m * E + v0, E);
  }
  for (; m < m1; ++m) {
    if constexpr (std::is_same_v<scalar_t, c10::Half>) {  // convert the row once, not once per S row
      acc_t* xr = scratch<acc_t, 8>(K);
      constexpr int64_t L = Vec<acc_t>::lanes;
      int64_t k = 0;
      for (; k + L <= K; k += L) store_vec<acc_t>(xr + k, load_vec<acc_t>(x + m * ldx + k));
      for (; k < K; ++k) xr[k] = static_cast<acc_t>(x[m * ldx + k]);
      dot_rows<1>(xr, K, A + a0 * K, K, a1 - a0, K, saved + m * C + a0, C);
      dot_rows<1>(xr, K, v + v0 * K, K, v1 - v0, K, logits + m * E + v0, E);
    } else {
      dot_rows<1>(x + m * ldx, ldx, A + a0 * K, K, a1 - a0, K, saved + m * C + a0, C);
      dot_rows<1>(x + m * ldx, ldx, v + v0 * K, K, v1 - v0, K, logits + m * E + v0, E);
    }
  }
}

// Gating for rows [m0, m1): g = sigmoid(logits + c), mix = g (0 on a base row), gs = sum mix
// (1 on a base row), and ts, (m1 - m0) rows of [s * mix_e * z_e | gs] (stride Er + 1).
// With write_gates (one task per row), also saved[:, Er:] = g and gates = g.
template <typename scalar_t, typename acc_t>
MOGU_ALWAYS_INLINE void gate_rows(const acc_t* logits, const acc_t* c, const bool* base_rows, int64_t m0,
                                  int64_t m1, int64_t E, int64_t R, acc_t scaling, bool write_gates, acc_t* saved,
                                  scalar_t* gates, acc_t* ts) {
  const int64_t ER = E * R;
  for (int64_t m = m0; m < m1; ++m) {
    acc_t* saved_row = saved + m * (ER + E);
    acc_t* t = ts + (m - m0) * (ER + 1);
    const bool is_base = base_rows != nullptr && base_rows[m];
    acc_t gate_sum = 0;
    for (int64_t e = 0; e < E; ++e) {
      const acc_t g = acc_t(1) / (acc_t(1) + std::exp(-(logits[m * E + e] + c[e])));
      if (write_gates) {
        saved_row[ER + e] = g;
        gates[m * E + e] = static_cast<scalar_t>(g);
      }
      const acc_t mix = is_base ? acc_t(0) : g;
      gate_sum += mix;
      const acc_t gain = scaling * mix;
      for (int64_t j = 0; j < R; ++j) t[e * R + j] = gain * saved_row[e * R + j];
    }
    t[ER] = is_base ? acc_t(1) : gate_sum;
  }
}

// y rows [r0, r0 + RY) x columns [i0, i0 + NV * lanes) of a chunk of the epilogue:
// y = gs * (y + b) + t . tile, with RY x NV accumulator vectors held in registers across the
// Er-long loop (each tile vector is loaded once for RY rows, each t value once for NV vectors).
template <int RY, int NV, typename scalar_t, typename acc_t>
MOGU_ALWAYS_INLINE void expand_step(scalar_t* y, int64_t ldy, const acc_t* t, int64_t ldt, const acc_t* gs,
                                    const acc_t* bias_chunk, const acc_t* tile, int64_t nb, int64_t ER, int64_t i0) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = Vec<acc_t>::lanes;
  V acc[RY][NV];
  for (int v = 0; v < NV; ++v) {
    const V bv = load_vec<acc_t>(bias_chunk + i0 + v * L);
    for (int r = 0; r < RY; ++r) acc[r][v] = gs[r] * (load_vec<acc_t>(y + r * ldy + i0 + v * L) + bv);
  }
  for (int64_t c = 0; c < ER; ++c) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load_vec<acc_t>(tile + c * nb + i0 + v * L);
    for (int r = 0; r < RY; ++r) {
      const acc_t tr = t[r * ldt + c];
      for (int v = 0; v < NV; ++v) acc[r][v] += tr * b[v];
    }
  }
  for (int r = 0; r < RY; ++r)
    for (int v = 0; v < NV; ++v) store_vec<acc_t>(y + r * ldy + i0 + v * L, acc[r][v]);
}

// Rows [r0, r0 + RY) x all nb columns of a chunk: two-vector steps, a one-vector step, then
// the last nb % lanes columns one by one. bias_chunk holds nb acc values (zeros without a bias).
template <int RY, typename scalar_t, typename acc_t>
MOGU_ALWAYS_INLINE void expand_block(scalar_t* y, int64_t ldy, const acc_t* t, int64_t ldt,
                                     const acc_t* bias_chunk, const acc_t* tile, int64_t nb, int64_t ER) {
  constexpr int64_t L = Vec<acc_t>::lanes;
  acc_t gs[RY];
  for (int r = 0; r < RY; ++r) gs[r] = t[r * ldt + ER];
  int64_t i0 = 0;
  for (; i0 + 2 * L <= nb; i0 += 2 * L) expand_step<RY, 2>(y, ldy, t, ldt, gs, bias_chunk, tile, nb, ER, i0);
  for (; i0 + L <= nb; i0 += L) expand_step<RY, 1>(y, ldy, t, ldt, gs, bias_chunk, tile, nb, ER, i0);
  for (int r = 0; r < RY; ++r) {
    for (int64_t i = i0; i < nb; ++i) {
      acc_t a = gs[r] * (static_cast<acc_t>(y[r * ldy + i]) + bias_chunk[i]);
      for (int64_t c = 0; c < ER; ++c) a += t[r * ldt + c] * tile[c * nb + i];
      y[r * ldy + i] = static_cast<scalar_t>(a);
    }
  }
}

// (c) for rows [m0, m1) x columns [n0, n1): gating (gate_rows), then the epilogue. y
// (M, N) holds x W^T and is overwritten with the layer output; bias may be null; B is lora_B
// (E, N, R). Scratch: ts (m1 - m0) * (Er + 1), tile Er * (n1 - n0), bias_chunk n1 - n0 values.
template <typename scalar_t, typename acc_t>
MOGU_ALWAYS_INLINE void gate_expand_impl(scalar_t* y, const scalar_t* bias, const scalar_t* B, const acc_t* logits,
                                         const acc_t* c, const bool* base_rows, int64_t m0, int64_t m1, int64_t n0,
                                         int64_t n1, int64_t N, int64_t E, int64_t R, acc_t scaling,
                                         acc_t* saved, scalar_t* gates, acc_t* MOGU_RESTRICT ts,
                                         acc_t* MOGU_RESTRICT tile, acc_t* MOGU_RESTRICT bias_chunk) {
  const int64_t ER = E * R;
  const int64_t nb = n1 - n0;
  gate_rows(logits, c, base_rows, m0, m1, E, R, scaling, /*write_gates=*/n0 == 0, saved, gates, ts);
  // tile[c * nb + i] = B[e, n0 + i, j] for c = e * R + j: [B_0 | ..]^T restricted to the chunk.
  for (int64_t e = 0; e < E; ++e) {
    const scalar_t* Be = B + (e * N + n0) * R;  // nb * R contiguous values, (i, j) at i * R + j
    acc_t* te = tile + e * R * nb;
    constexpr int64_t L = Vec<acc_t>::lanes;
    int64_t q = 0, i = 0, j = 0;
    for (; q + L <= nb * R; q += L) {  // converted L at a time, then scattered
      acc_t vals[L];
      store_vec<acc_t>(vals, load_vec<acc_t>(Be + q));
      for (int64_t l = 0; l < L; ++l) {
        te[j * nb + i] = vals[l];
        if (++j == R) j = 0, ++i;
      }
    }
    for (; q < nb * R; ++q) {
      te[j * nb + i] = static_cast<acc_t>(Be[q]);
      if (++j == R) j = 0, ++i;
    }
  }
  for (int64_t i = 0; i < nb; ++i) bias_chunk[i] = bias != nullptr ? static_cast<acc_t>(bias[n0 + i]) : acc_t(0);
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4)
    expand_block<4>(y + m * N + n0, N, ts + (m - m0) * (ER + 1), ER + 1, bias_chunk, tile, nb, ER);
  for (; m < m1; ++m)
    expand_block<1>(y + m * N + n0, N, ts + (m - m0) * (ER + 1), ER + 1, bias_chunk, tile, nb, ER);
}

// Non-template, multiversioned entry points (target_clones does not apply to templates); the
// always-inline bodies above are compiled once per instruction set inside each clone.
#define MOGU_CPU_KERNELS(scalar_t, acc_t)                                                                      \
  MOGU_CPU_CLONES void shrink_router(const scalar_t* x, int64_t ldx, const scalar_t* A, const acc_t* v,       \
                                     int64_t m0, int64_t m1, int64_t c0, int64_t c1, int64_t K, int64_t ER,    \
                                     int64_t E, acc_t* saved, acc_t* logits) {                                 \
    shrink_router_impl<scalar_t, acc_t>(x, ldx, A, v, m0, m1, c0, c1, K, ER, E, saved, logits);                \
  }                                                                                                            \
  MOGU_CPU_CLONES void gate_expand(scalar_t* y, const scalar_t* bias, const scalar_t* B, const acc_t* logits,  \
                                   const acc_t* c, const bool* base_rows, int64_t m0, int64_t m1, int64_t n0,  \
                                   int64_t n1, int64_t N, int64_t E, int64_t R, acc_t scaling, acc_t* saved,   \
                                   scalar_t* gates, acc_t* ts, acc_t* tile, acc_t* bias_chunk) {               \
    gate_expand_impl<scalar_t, acc_t>(y, bias, B, logits, c, base_rows, m0, m1, n0, n1, N, E, R, scaling,      \
                                      saved, gates, ts, tile, bias_chunk);                                     \
  }

MOGU_CPU_KERNELS(float, float)
MOGU_CPU_KERNELS(double, double)
MOGU_CPU_KERNELS(c10::Half, float)
MOGU_CPU_KERNELS(c10::BFloat16, float)
#undef MOGU_CPU_KERNELS

// ---------------------------------------------------------------------------------------------
// bf16 with oneDNN's brgemm micro-kernel (AMX, or AVX512-BF16): at::native::cpublas::brgemm,
// bf16 x bf16 -> fp32, B in VNNI layout (pairs along the reduction dimension). Used when
// x is bf16, K is even and the CPU has a bf16 brgemm (cpublas::could_pack); otherwise the
// generic kernels above run. Both small products then go through the matrix unit too, so
// they stay small next to the base GEMM, which oneDNN also runs on it:
//   a'. [z | logits] = x [A; hi(v); mid(v); lo(v)]^T in ONE brgemm with fp32 accumulation,
//       v split into three bf16 parts whose sum is v (to fp32 precision: 3 x 8 significant
//       bits), so the router logits are the fp32 x . v (x is exact in bf16), as the
//       accumulation-dtype rule asks. Below kBrgemmShrinkRows rows the same products run on
//       the AVX512-BF16 dot-product instruction (dot_bf16: no packing of S) where the CPU has
//       it; below kBrgemmShrinkMinRows without it, on the generic dot kernel.
//   c'. per unit of kBrgemmRows rows x all columns (kColumns-wide groups when there are too
//       few rows for the threads): gates as in (c), t = s * mix * z rounded to bf16 (the
//       reference rounds the rank-space activations to x's dtype too), then
//       y = gs * (y + b) + t [B]^T, one read and one write of y. Where the CPU has
//       AVX512-BF16, delta = t [B]^T is made 16 columns at a time in registers by fp32 FMAs
//       inside that pass (expand_combine_bf16); without it, by brgemm into an fp32 buffer in
//       L2 that the pass reads back (combine_bf16).
//   b+c'', from kTransposedMinRows to kTransposedMaxRows rows where the CPU has AVX512-BF16:
//       the base product computed transposed by brgemm tiles, each tile's epilogue (gates,
//       bias, expand, rounding) while it is in L1 (base_and_epilogue_transposed), replacing
//       oneDNN's product and the pass over y, with the same rounding points (the base
//       product rounded to bf16, then one rounding of y).
// The packings (S: (Er + 3E) x K, v split: 3E x K, [B_0 | ..]: N x Er), O((N + K) Er), are
// kept between calls while their source tensors stay unchanged (packed_operand).
#if defined(MOGU_HAVE_BRGEMM)

// Shrink: the brgemm (after packing S, O(Er K)) from this many rows on; below it, the
// AVX512-BF16 dot kernel (no packing) where the CPU has one, else from kBrgemmShrinkMinRows.
constexpr int64_t kBrgemmShrinkRows = 96;
constexpr int64_t kBrgemmShrinkMinRows = 4;
constexpr int64_t kBrgemmRows = 32;          // rows per epilogue unit (brgemm delta: 32 x N fp32)

using bf16 = c10::BFloat16;

// v = hi + mid + lo to fp32 precision (3 x 8 significant bits), each part the bf16 rounding
// of what the parts before it leave: the one statement of the router-weight split that both
// layouts below (plain rows, VNNI-packed columns) write out. 16 lanes, or one value.
struct Bf16Split16 {
  vu16x16 hi, mid, lo;
};
MOGU_ALWAYS_INLINE Bf16Split16 split3_bf16(vfloat x0) {
  Bf16Split16 p;
  p.hi = to_bf16_bits(x0);
  const vfloat r1 = x0 - load_vec<float>(reinterpret_cast<const bf16*>(&p.hi));
  p.mid = to_bf16_bits(r1);
  p.lo = to_bf16_bits(r1 - load_vec<float>(reinterpret_cast<const bf16*>(&p.mid)));
  return p;
}
MOGU_ALWAYS_INLINE void split3_bf16(float v, uint16_t& hi, uint16_t& mid, uint16_t& lo) {
  const bf16 h(v);
  const float r1 = v - static_cast<float>(h);
  const bf16 m(r1);
  hi = h.x;
  mid = m.x;
  lo = bf16(r1 - static_cast<float>(m)).x;
}


// Splits fp32 v (E, K) into three bf16 rows per expert, Vs (3E, K): row p * E + e holds part
// p (hi, mid, lo) of v_e; hi + mid + lo = v_e to fp32 precision (3 x 8 significant bits).
MOGU_CPU_CLONES void split_router_bf16(const float* v, int64_t E, int64_t K, uint16_t* MOGU_RESTRICT Vs) {
  constexpr int64_t L = 16;
  for (int64_t e = 0; e < E; ++e) {
    const float* ve = v + e * K;
    uint16_t* hi = Vs + e * K;
    uint16_t* mid = Vs + (E + e) * K;
    uint16_t* lo = Vs + (2 * E + e) * K;
    int64_t k = 0;
    for (; k + L <= K; k += L) {
      const Bf16Split16 p = split3_bf16(load_vec<float>(ve + k));
      __builtin_memcpy(hi + k, &p.hi, sizeof(p.hi));
      __builtin_memcpy(mid + k, &p.mid, sizeof(p.mid));
      __builtin_memcpy(lo + k, &p.lo, sizeof(p.lo));
    }
    for (; k < K; ++k) split3_bf16(ve[k], hi[k], mid[k], lo[k]);
  }
}

// MOGU_CPU_BF16_PATH (read once per process) caps which bf16 path this CPU may take, so
// that tests cover on one machine the paths other CPUs take: "generic" (level 0: no
// brgemm, the generic kernels), "brgemm" (1: brgemm but not the AVX512-BF16 dot kernel, as
// on CPUs without avx512_bf16), unset or "auto" (2: whatever the CPU has). Anything else
// is treated as "auto".
bool bf16_path_allows(int level) {
  static const int cap = [] {
    const char* v = std::getenv("MOGU_CPU_BF16_PATH");
    if (v == nullptr) return 2;
    const std::string s(v);
    return s == "generic" ? 0 : s == "brgemm" ? 1 : 2;
  }();
  return level <= cap;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MOGU_HAVE_DPBF16 1
#define MOGU_DPBF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// out[i * ldo + c] = x_i . S_c for RX rows of x (stride ldx) and the C rows of S (stride lds),
// with AVX512-BF16 dot products of bf16 pairs accumulated in fp32 (any K: the last partial
// vector is a masked load, zeros beyond K).
template <int RX>
MOGU_DPBF16_TARGET void dot_bf16_rows(const bf16* x, int64_t ldx, const bf16* S, int64_t lds, int64_t C, int64_t K,
                                      float* out, int64_t ldo) {
  const int64_t tail = K % 32, Kv = K - tail;
  const __mmask32 tail_mask = static_cast<__mmask32>((uint64_t{1} << tail) - 1);
  for (int64_t c = 0; c < C; ++c) {
    const bf16* sc = S + c * lds;
    __m512 acc[RX];
    for (int i = 0; i < RX; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < Kv; k += 32) {
      const __m512bh sv = (__m512bh)_mm512_loadu_si512(sc + k);
      for (int i = 0; i < RX; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(x + i * ldx + k), sv);
    }
    if (tail != 0) {
      const __m512bh sv = (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, sc + Kv);
      for (int i = 0; i < RX; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, x + i * ldx + Kv), sv);
    }
    for (int i = 0; i < RX; ++i) out[i * ldo + c] = _mm512_reduce_add_ps(acc[i]);
  }
}

// Rows [m0, m1) of x against the C rows of S (see dot_bf16_rows), four rows at a time.
MOGU_DPBF16_TARGET void dot_bf16(const bf16* x, int64_t ldx, int64_t m0, int64_t m1, const bf16* S, int64_t lds,
                                 int64_t C, int64_t K, float* out, int64_t ldo) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) dot_bf16_rows<4>(x + m * ldx, ldx, S, lds, C, K, out + m * ldo, ldo);
  for (; m < m1; ++m) dot_bf16_rows<1>(x + m * ldx, ldx, S, lds, C, K, out + m * ldo, ldo);
}

// The expand and the combine of (c') in one pass over RX rows of y, columns [n0, n1):
//   y[i, n] = gs[i] * (y[i, n] + bias_chunk[n - n0]) + sum_c t_i[c] B[c][n],
// t_i: row i of t (stride ldt), already rounded to bf16 and held in fp32; B read from Bp (P
// rows of N bf16 column pairs, the layout pack_expand_bf16 writes), each pair vector widened
// to two fp32 vectors (a shift, a mask) that serve RX rows. Every product of two bf16 values
// is exact in fp32, so the sum is plain fp32 FMAs in the order c = 0, 1, ..: twice the
// instructions of AVX512-BF16 dot products on pairs, but this CPU retires FMAs ~3.5x as fast
// (6.3 vs 1.8 G/s, one core), which measured 2-3% of a bf16 call faster at M = 256. 16 columns
// at a time (the last partial vector masked); the delta never leaves the registers (the
// brgemm expand for CPUs without AVX512-BF16 writes it as an fp32 tile for combine_bf16 to
// read back). The result is rounded to bf16 bit for bit as c10 rounds.
template <int RX>
MOGU_DPBF16_TARGET void expand_combine_rows(bf16* y, int64_t ldy, const float* t, int64_t ldt, const uint16_t* Bp,
                                            int64_t N, int64_t P, const float* bias_chunk, const float* gs,
                                            int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 16) {
    const __mmask16 mask = n + 16 <= n1 ? static_cast<__mmask16>(0xFFFF)
                                        : static_cast<__mmask16>((1u << (n1 - n)) - 1);
    __m512 acc[RX];
    for (int i = 0; i < RX; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; ++p) {
      const __m512i pairs = _mm512_maskz_loadu_epi32(mask, Bp + (p * N + n) * 2);
      const __m512 b_even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 b_odd =
          _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
      for (int i = 0; i < RX; ++i) {
        acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(t[i * ldt + 2 * p]), b_even, acc[i]);
        acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(t[i * ldt + 2 * p + 1]), b_odd, acc[i]);
      }
    }
    const __m512 bias = _mm512_maskz_loadu_ps(mask, bias_chunk + (n - n0));
    for (int i = 0; i < RX; ++i) {
      bf16* yi = y + i * ldy + n;
      const __m512 yv = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, yi)), 16));
      const __m512 out = _mm512_fmadd_ps(_mm512_set1_ps(gs[i]), _mm512_add_ps(yv, bias), acc[i]);
      // vcvtneps2bf16 rounds normal values to nearest even as c10::BFloat16 does, but treats
      // denormal inputs as zero and keeps NaN payloads; lanes holding either (rare: one
      // vfpclassps tells) take to_bf16_bits, so the result is c10's bit for bit.
      __m256i bits = (__m256i)_mm512_cvtneps_pbh(out);
      if (_mm512_fpclass_ps_mask(out, 0x81 | 0x20) != 0) {  // QNaN | SNaN, denormal
        const vu16x16 exact = to_bf16_bits((vfloat)out);
        bits = (__m256i)exact;
      }
      _mm256_mask_storeu_epi16(yi, mask, bits);
    }
  }
}

// Rows [0, rows) of y (see expand_combine_rows), eight rows at a time.
MOGU_DPBF16_TARGET void expand_combine_bf16(bf16* y, int64_t ldy, const float* t, int64_t ERp, const uint16_t* Bp,
                                            int64_t N, const float* bias_chunk, const float* gs, int64_t rows,
                                            int64_t n0, int64_t n1) {
  const int64_t P = ERp / 2;
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8)
    expand_combine_rows<8>(y + r * ldy, ldy, t + r * ERp, ERp, Bp, N, P, bias_chunk, gs + r, n0, n1);
  for (; r + 4 <= rows; r += 4)
    expand_combine_rows<4>(y + r * ldy, ldy, t + r * ERp, ERp, Bp, N, P, bias_chunk, gs + r, n0, n1);
  for (; r < rows; ++r)
    expand_combine_rows<1>(y + r * ldy, ldy, t + r * ERp, ERp, Bp, N, P, bias_chunk, gs + r, n0, n1);
}

// ---- bf16 from kTransposedMinRows rows: y^T = W x^T, so that y's epilogue runs on hot tiles.
// oneDNN's x W^T repacks W (N x K) into the matrix unit's pair layout on every call and writes
// y before the epilogue reads it back. Computed transposed, W's rows are brgemm's A operand
// as they lie in memory (A needs no packing) and x^T is the packed operand (M x K, per call:
// 1 MiB at M = 256, K = 2048, against 8 MiB of W). Each thread takes 64-row blocks of W; per
// 64-row block of x it gets the fp32 tile C = W_blk x_blk^T (64 x 64, in L1) and writes
//   y[m][n] = bf16(gs[m] * (bf16(C[n][m]) + b[n]) + sum_c B[n][c] t[m][c])
// transposed, 32 columns of y (one 64-byte line) per store. Rows of x go in superblocks of
// kTransposedSuper so that the packed x^T stays in L2 while every block of W passes over it.
constexpr int64_t kTransposedMinRows = 32;   // below it oneDNN's product + expand_combine_bf16 is faster
constexpr int64_t kTransposedMaxRows = 512;  // above it W passes over L2 too often (x^T per superblock)
constexpr int64_t kTransposedBlock = 64;   // rows of W and of x per brgemm tile
constexpr int64_t kTransposedSuper = 256;  // rows of x per pass over W

// 16 x 16 32-bit lanes transposed in registers: r[i] lane j <-> r[j] lane i.
MOGU_DPBF16_TARGET MOGU_ALWAYS_INLINE void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
  }
}

// x rows [0, rows) (stride ldx, K even) -> xP (K/2, mbp) bf16 pairs as 32-bit lanes,
// xP[kp][j] = (x[j][2kp], x[j][2kp + 1]): brgemm's packed B for the columns of x^T. Rows
// rows .. mbp - 1 (mbp: rows rounded up to 16) are zero.
MOGU_DPBF16_TARGET void pack_x_transposed(const bf16* x, int64_t ldx, int64_t rows, int64_t K, int64_t mbp,
                                          uint32_t* MOGU_RESTRICT xP) {
  const int64_t K2 = K / 2;
  for (int64_t kp = 0; kp < K2; kp += 16) {
    const int64_t kv = std::min<int64_t>(16, K2 - kp);
    const __mmask16 kmask = static_cast<__mmask16>((1u << kv) - 1);
    for (int64_t j = 0; j < mbp; j += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = j + i < rows ? _mm512_maskz_loadu_epi32(kmask, x + (j + i) * ldx + 2 * kp) : _mm512_setzero_si512();
      transpose16x16(r);
      for (int i = 0; i < kv; ++i) _mm512_storeu_si512(xP + (kp + i) * mbp + j, r[i]);
    }
  }
}

// 32 fp32 values (lo: columns 0-15, hi: 16-31) -> 32 bf16 bit patterns, bit for bit c10's
// rounding (see expand_combine_rows).
MOGU_DPBF16_TARGET MOGU_ALWAYS_INLINE __m512i to_bf16_x32(__m512 lo, __m512 hi) {
  if ((_mm512_fpclass_ps_mask(lo, 0x81 | 0x20) | _mm512_fpclass_ps_mask(hi, 0x81 | 0x20)) == 0)
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  const vu16x16 l = to_bf16_bits((vfloat)lo), h = to_bf16_bits((vfloat)hi);
  __m256i l256, h256;
  __builtin_memcpy(&l256, &l, sizeof(l256));
  __builtin_memcpy(&h256, &h, sizeof(h256));
  return _mm512_inserti64x4(_mm512_castsi256_si512(l256), h256, 1);
}

// The epilogue of one (nb x mbp) tile C (C[n][m], row stride mbp) of y^T:
//   y[m][n] = gs[m] * (bf16(C[n][m]) + bias[n]) + sum_c Bf[n][c] tT[c][m]
// for n < nb, m < rows; tT (ERp, mbp): t rounded to bf16, held in fp32, zero past rows;
// Bf (ERp, kTransposedBlock): B's columns in fp32, zero from column nb on (column-major, so
// that the 16 broadcasts of one c are offsets from one pointer). 16 x 16 blocks in registers
// (n across the vectors, m along them), transposed, two blocks per 64-byte store of a row of y.
MOGU_DPBF16_TARGET void transposed_epilogue(const float* C, int64_t mbp, int64_t nb, int64_t rows, const float* tT,
                                            int64_t ERp, const float* Bf, const float* bias, const float* gs,
                                            bf16* y, int64_t ldy) {
  for (int64_t j = 0; j < rows; j += 16) {
    const __m512 g = _mm512_loadu_ps(gs + j);
    for (int64_t i = 0; i < nb; i += 32) {
      __m512i r[2][16];
      for (int h = 0; h < 2; ++h) {
        __m512 acc[16];
        for (int a = 0; a < 16; ++a) {
          const int64_t n = i + 16 * h + a;
          if (n >= nb) {
            acc[a] = _mm512_setzero_ps();
            continue;
          }
          // The base product rounded to bf16 first, as oneDNN rounds it on the other paths: a
          // row's result does not depend on which path its batch size takes (up to the
          // products' accumulation order).
          const __m256i base_bits = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(C + n * mbp + j));
          const __m512 base = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(base_bits), 16));
          acc[a] = _mm512_mul_ps(g, _mm512_add_ps(base, _mm512_set1_ps(bias[n])));
        }
        for (int64_t c = 0; c < ERp; ++c) {  // constant trip counts: acc stays in registers
          const __m512 tv = _mm512_loadu_ps(tT + c * mbp + j);
          for (int a = 0; a < 16; ++a)
            acc[a] = _mm512_fmadd_ps(_mm512_set1_ps(Bf[c * kTransposedBlock + i + 16 * h + a]), tv, acc[a]);
        }
        for (int a = 0; a < 16; ++a) r[h][a] = _mm512_castps_si512(acc[a]);
        transpose16x16(r[h]);
      }
      const int64_t cols = std::min<int64_t>(32, nb - i);
      const __mmask32 mask = cols == 32 ? ~static_cast<__mmask32>(0) : (static_cast<__mmask32>(1) << cols) - 1;
      const int64_t m_end = std::min<int64_t>(16, rows - j);
      for (int a = 0; a < m_end; ++a)
        _mm512_mask_storeu_epi16(y + (j + a) * ldy + i, mask,
                                 to_bf16_x32(_mm512_castsi512_ps(r[0][a]), _mm512_castsi512_ps(r[1][a])));
    }
  }
}

bool cpu_has_avx512_bf16() {
  static const bool has = bf16_path_allows(2) && __builtin_cpu_supports("avx512bf16") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq");
  return has;
}
#endif


// Sp (K/2, C2, 2) uint16, C2 = Er + 3E: column c < Er is A row c, columns Er + p * E + e
// (p = 0, 1, 2) the hi / mid / lo bf16 parts of v_e. K even.
MOGU_CPU_CLONES void pack_shrink_bf16(const bf16* A, const float* v, int64_t ER, int64_t E, int64_t K,
                                      uint16_t* MOGU_RESTRICT Sp) {
  const int64_t C2 = ER + 3 * E, K2 = K / 2;
  for (int64_t c = 0; c < ER; ++c) {
    const bf16* a = A + c * K;
    for (int64_t kp = 0; kp < K2; ++kp) {
      uint32_t pair;
      __builtin_memcpy(&pair, a + 2 * kp, sizeof(pair));
      __builtin_memcpy(Sp + (kp * C2 + c) * 2, &pair, sizeof(pair));
    }
  }
  constexpr int64_t L = 16;
  for (int64_t e = 0; e < E; ++e) {
    const float* ve = v + e * K;
    uint16_t* hi = Sp + (ER + e) * 2;
    uint16_t* mid = Sp + (ER + E + e) * 2;
    uint16_t* lo = Sp + (ER + 2 * E + e) * 2;
    int64_t k = 0;
    for (; k + L <= K; k += L) {
      const Bf16Split16 p = split3_bf16(load_vec<float>(ve + k));
      for (int64_t i = 0; i < L; ++i) {
        const int64_t at = ((k + i) / 2) * C2 * 2 + ((k + i) & 1);
        hi[at] = p.hi[i];
        mid[at] = p.mid[i];
        lo[at] = p.lo[i];
      }
    }
    for (; k < K; ++k) {
      const int64_t at = (k / 2) * C2 * 2 + (k & 1);
      split3_bf16(ve[k], hi[at], mid[at], lo[at]);
    }
  }
}

// Bp (ERp/2, N, 2) uint16, ERp = Er rounded up to even: Bp[c/2][n][c%2] = B_e[n][j] for
// c = e * R + j, and 0 for the padding column c = Er when Er is odd.
MOGU_CPU_CLONES void pack_expand_bf16(const bf16* B, int64_t E, int64_t N, int64_t R, uint16_t* MOGU_RESTRICT Bp) {
  const int64_t ER = E * R;
  if (R == 8) {  // the common rank: 16 rows of B_e (4 pairs each) -> 4 packed rows of 16, by shuffles
    for (int64_t e = 0; e < E; ++e) {
      const bf16* Be = B + e * N * R;
      uint16_t* out = Bp + e * 4 * N * 2;  // packed rows e*4 .. e*4+3, N pairs each
      int64_t n = 0;
      for (; n + 16 <= N; n += 16) {
        vu32x16 v0, v1, v2, v3;  // pairs (n + i, jp) at lane 4 i + jp, four rows of B_e per vector
        __builtin_memcpy(&v0, Be + n * R, sizeof(v0));
        __builtin_memcpy(&v1, Be + (n + 4) * R, sizeof(v1));
        __builtin_memcpy(&v2, Be + (n + 8) * R, sizeof(v2));
        __builtin_memcpy(&v3, Be + (n + 12) * R, sizeof(v3));
        const vu32x16 even = {0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29};
        const vu32x16 odd = {2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31};
        const vu32x16 lo = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
        const vu32x16 hi = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
        const vu32x16 a01 = __builtin_shuffle(v0, v1, even), a23 = __builtin_shuffle(v0, v1, odd);
        const vu32x16 b01 = __builtin_shuffle(v2, v3, even), b23 = __builtin_shuffle(v2, v3, odd);
        const vu32x16 rows[4] = {__builtin_shuffle(a01, b01, lo), __builtin_shuffle(a01, b01, hi),
                                 __builtin_shuffle(a23, b23, lo), __builtin_shuffle(a23, b23, hi)};
        for (int jp = 0; jp < 4; ++jp) __builtin_memcpy(out + (jp * N + n) * 2, &rows[jp], sizeof(rows[jp]));
      }
      for (; n < N; ++n)
        for (int64_t jp = 0; jp < 4; ++jp) __builtin_memcpy(out + (jp * N + n) * 2, Be + n * R + 2 * jp, 4);
    }
    return;
  }
  if (R % 2 == 0) {  // pairs (j, j+1) of one expert: 32-bit moves
    for (int64_t e = 0; e < E; ++e)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t j = 0; j < R; j += 2) {
          uint32_t pair;
          __builtin_memcpy(&pair, B + (e * N + n) * R + j, sizeof(pair));
          __builtin_memcpy(Bp + (((e * R + j) / 2) * N + n) * 2, &pair, sizeof(pair));
        }
    return;
  }
  for (int64_t e = 0; e < E; ++e)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < R; ++j) {
        const int64_t c = e * R + j;
        Bp[((c / 2) * N + n) * 2 + (c & 1)] = B[(e * N + n) * R + j].x;
      }
  if (ER % 2 == 1)
    for (int64_t n = 0; n < N; ++n) Bp[((ER / 2) * N + n) * 2 + 1] = 0;
}

// y rows [0, rows) x [0, nb): y = gs[r] * (y + bias_chunk) + delta (fp32 tile, stride ldd).
MOGU_CPU_CLONES void combine_bf16(bf16* y, int64_t ldy, const float* delta, int64_t ldd, const float* bias_chunk,
                                  const float* gs, int64_t rows, int64_t nb) {
  constexpr int64_t L = 16;
  for (int64_t r = 0; r < rows; ++r) {
    bf16* yr = y + r * ldy;
    const float* dr = delta + r * ldd;
    const float g = gs[r];
    int64_t i = 0;
    for (; i + L <= nb; i += L) {
      const vfloat out = g * (load_vec<float>(yr + i) + load_vec<float>(bias_chunk + i)) + load_vec<float>(dr + i);
      store_vec<float>(yr + i, out);
    }
    for (; i < nb; ++i) yr[i] = static_cast<bf16>(g * (static_cast<float>(yr[i]) + bias_chunk[i]) + dr[i]);
  }
}

// logits[m, e] = hi + mid + lo parts; saved[m, :Er] = z, from the (M, C2) brgemm output.
MOGU_CPU_CLONES void unpack_shrink(const float* out, int64_t m0, int64_t m1, int64_t ER, int64_t E, float* saved,
                                   float* logits) {
  const int64_t C2 = ER + 3 * E;
  for (int64_t m = m0; m < m1; ++m) {
    const float* o = out + m * C2;
    float* s = saved + m * (ER + E);
    for (int64_t c = 0; c < ER; ++c) s[c] = o[c];
    for (int64_t e = 0; e < E; ++e) logits[m * E + e] = o[ER + e] + (o[ER + E + e] + o[ER + 2 * E + e]);
  }
}

// ------------------------------------------------------------- packed operands, cached
// The bf16 plan repacks three small operands: Sp ([A; v] in brgemm's pair layout, for the
// brgemm shrink), Vs (v split into three bf16 parts, for the dot-product shrink) and Bp (B in
// brgemm's pair layout). They depend only on the experts and the router, which stay the same
// call after call in inference, and the packing ran on one thread per call while the others
// waited (1-3% of a bf16 call at one thread, measured with perf; twice that share at two).
// packed_operand keeps each packed buffer keyed by (kind, source tensors). An entry is valid
// while each source is the same live TensorImpl (held by a weak reference, so no other tensor
// can take its address while the entry exists) with the same data pointer, sizes and version
// counter (in-place updates such as an optimizer step bump it). Inference tensors have no
// version counter and are never cached: they are packed into the calling thread's scratch
// each call, as before. Entries with a freed source (never valid again) are dropped whenever a
// new entry is added, so the cache holds the packed operands of live layers only (at r = 8,
// two experts, K = N = 4096: ~350 KiB per layer).
struct PackSource {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
  const void* data;
  std::vector<int64_t> sizes;
  int64_t version;

  explicit PackSource(const Tensor& t)
      : impl(t.getIntrusivePtr()), data(t.const_data_ptr()), sizes(t.sizes().vec()), version(t._version()) {}
  bool matches(const Tensor& t) const {
    return !impl.expired() && data == t.const_data_ptr() && t.sizes().equals(sizes) && version == t._version();
  }
};

struct PackKey {
  int kind;
  const void* impl0;
  const void* impl1;
  bool operator==(const PackKey& o) const { return kind == o.kind && impl0 == o.impl0 && impl1 == o.impl1; }
};

struct PackKeyHash {
  size_t operator()(const PackKey& k) const {
    const size_t h0 = std::hash<const void*>()(k.impl0), h1 = std::hash<const void*>()(k.impl1);
    return (h0 * 31 + h1) * 8 + static_cast<size_t>(k.kind);
  }
};

struct PackEntry {
  std::vector<PackSource> sources;
  std::shared_ptr<std::vector<uint16_t>> packed;
};

// The packed operand as a pointer, and what keeps it alive for the call (null when it lives in
// the calling thread's scratch slot kSlot).
struct Packed {
  const uint16_t* data;
  std::shared_ptr<std::vector<uint16_t>> holder;
};

// n packed elements made by fill(uint16_t* out) from ``sources`` (one or two tensors),
// cached as described above; kind names the packing (0 Bp, 1 Sp, 2 Vs).
template <int kSlot, typename Fill>
Packed packed_operand(int kind, std::initializer_list<const Tensor*> sources, size_t n, Fill&& fill) {
  bool cacheable = true;
  for (const Tensor* t : sources) cacheable = cacheable && !t->is_inference();
  if (!cacheable) {
    uint16_t* out = scratch<uint16_t, kSlot>(n);
    fill(out);
    return {out, nullptr};
  }
  static std::mutex mutex;
  // Never destroyed: at exit, weak references must not be released after c10 is gone.
  static auto& entries = *new std::unordered_map<PackKey, PackEntry, PackKeyHash>();
  const Tensor* first = *sources.begin();
  const Tensor* second = sources.size() > 1 ? *(sources.begin() + 1) : nullptr;
  const PackKey key{kind, first->unsafeGetTensorImpl(), second != nullptr ? second->unsafeGetTensorImpl() : nullptr};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = entries.find(key);
  if (it != entries.end()) {
    bool valid = it->second.packed->size() == n;
    size_t i = 0;
    for (const Tensor* t : sources) valid = valid && it->second.sources[i++].matches(*t);
    if (valid) return {it->second.packed->data(), it->second.packed};
  } else {
    for (auto e = entries.begin(); e != entries.end();) {  // drop the entries of freed tensors
      bool dead = false;
      for (const PackSource& src : e->second.sources) dead = dead || src.impl.expired();
      e = dead ? entries.erase(e) : std::next(e);
    }
  }
  PackEntry entry;
  for (const Tensor* t : sources) entry.sources.emplace_back(*t);
  entry.packed = std::make_shared<std::vector<uint16_t>>(n);
  fill(entry.packed->data());
  Packed out{entry.packed->data(), entry.packed};
  entries[key] = std::move(entry);
  return out;
}

// Whether this CPU has a bf16 brgemm (checked once).
bool bf16_brgemm_usable() {
  static const bool usable = bf16_path_allows(1) && at::native::cpublas::could_pack(at::kBFloat16);
  return usable;
}

#if defined(MOGU_HAVE_DPBF16)
// Steps (b) and (c') from kTransposedMinRows rows on a CPU with AVX512-BF16: y^T = W x^T
// tile by tile, each tile's epilogue (gates, bias, expand, rounding) while it is in L1 (see
// transposed_epilogue). Per superblock of x rows: one parallel pass that gates the rows,
// writes t^T and packs x^T (per 64-row block), then one over the 64-row blocks of W.
void base_and_epilogue_transposed(ForwardCall& f, const Tensor& weight, const float* logits_ptr, float s) {
  namespace cpublas = at::native::cpublas;
  const int64_t M = f.d.M, K = f.d.K, N = f.d.N, E = f.d.E, R = f.d.R, ER = f.d.ER;
  const int64_t ERp = ER + (ER & 1), K2 = K / 2, lda = weight.stride(0);
  const bf16* x_ptr = f.x2.const_data_ptr<bf16>();
  const int64_t ldx = f.x2.stride(0);
  const bf16* w_ptr = weight.const_data_ptr<bf16>();
  const bf16* b_ptr = f.bias.defined() ? f.bias.const_data_ptr<bf16>() : nullptr;
  const bf16* B_ptr = f.B.const_data_ptr<bf16>();
  const float* c_ptr = f.c.const_data_ptr<float>();
  const bool* br_ptr = f.base_rows.defined() ? f.base_rows.const_data_ptr<bool>() : nullptr;
  bf16* y_ptr = f.y.mutable_data_ptr<bf16>();
  bf16* gates_ptr = f.gates.mutable_data_ptr<bf16>();
  float* saved_ptr = f.saved.mutable_data_ptr<float>();
  const Packed Bp = packed_operand<2>(0, {&f.B}, static_cast<size_t>(ERp * N),
                                      [&](uint16_t* out) { pack_expand_bf16(B_ptr, E, N, R, out); });
  const uint16_t* Bp_data = Bp.data;
  constexpr int64_t kB = kTransposedBlock, kS = kTransposedSuper;
  // The calling thread's scratch, shared by the threads of a pass (taken before the parallel
  // regions, which never use these slots): x^T packed, t^T and gs for one superblock, each
  // 64-row block at a fixed offset (its columns rounded up to 16, the padding zero).
  uint32_t* xP = aligned_scratch<uint32_t, 9>(static_cast<size_t>(kS * K2));
  float* tT = aligned_scratch<float, 10>(static_cast<size_t>(kS * ERp));
  float* gsv = scratch<float, 11>(static_cast<size_t>(kS));
  const int64_t n_blocks = (N + kB - 1) / kB;
  for (int64_t s0 = 0; s0 < M; s0 += kS) {
    const int64_t m_blocks = (std::min(kS, M - s0) + kB - 1) / kB;
    at::parallel_for(0, m_blocks, 1, [&](int64_t b0, int64_t b1) {
      float* ts = scratch<float, 3>(static_cast<size_t>(kB * (ER + 1)));
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m0 = s0 + b * kB, rows = std::min(kB, M - m0), mbp = (rows + 15) / 16 * 16;
        gate_rows(logits_ptr, c_ptr, br_ptr, m0, m0 + rows, E, R, s, /*write_gates=*/true, saved_ptr, gates_ptr, ts);
        float* tT_b = tT + b * kB * ERp;
        float* gs_b = gsv + b * kB;
        for (int64_t j = 0; j < mbp; ++j) {
          const float* t = ts + j * (ER + 1);
          gs_b[j] = j < rows ? t[ER] : 0.0f;
          for (int64_t c = 0; c < ERp; ++c)  // t rounded to bf16 as the reference rounds it
            tT_b[c * mbp + j] = j < rows && c < ER ? static_cast<float>(static_cast<bf16>(t[c])) : 0.0f;
        }
        pack_x_transposed(x_ptr + m0 * ldx, ldx, rows, K, mbp, xP + b * kB * K2);
      }
    });
    at::parallel_for(0, n_blocks, 1, [&](int64_t u0, int64_t u1) {
      float* C = aligned_scratch<float, 13>(static_cast<size_t>(kB * kB));
      float* Bf = scratch<float, 12>(static_cast<size_t>(kB * ERp));
      float* bias_chunk = scratch<float, 7>(static_cast<size_t>(kB));
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t n0 = u * kB, nb = std::min(kB, N - n0);
        // bias and B in fp32 for these columns, from the cached pairs (Bp), zero past nb
        for (int64_t i = 0; i < kB; ++i)
          bias_chunk[i] = i < nb && b_ptr != nullptr ? static_cast<float>(b_ptr[n0 + i]) : 0.0f;
        for (int64_t c = 0; c < ERp; ++c)
          for (int64_t i = 0; i < kB; ++i) {
            const uint32_t bits =
                i < nb ? static_cast<uint32_t>(Bp_data[((c / 2) * N + n0 + i) * 2 + (c & 1)]) << 16 : 0u;
            __builtin_memcpy(Bf + c * kB + i, &bits, sizeof(bits));
          }
        for (int64_t b = 0; b < m_blocks; ++b) {
          const int64_t m0 = s0 + b * kB, rows = std::min(kB, M - m0), mbp = (rows + 15) / 16 * 16;
          cpublas::brgemm(nb, mbp, K, lda, mbp, mbp, /*add_C=*/false, w_ptr + n0 * lda,
                          reinterpret_cast<const bf16*>(xP + b * kB * K2), C);
          transposed_epilogue(C, mbp, nb, rows, tT + b * kB * ERp, ERp, Bf, bias_chunk, gsv + b * kB,
                              y_ptr + m0 * N + n0, N);
        }
      }
      cpublas::brgemm_release();
    });
  }
}
#endif

// The whole forward for bf16 x with even K on a CPU with a bf16 brgemm (plan a', b, c').
void forward_bf16_brgemm(ForwardCall& f, const Tensor& weight, double scaling) {
  namespace cpublas = at::native::cpublas;
  const int64_t M = f.d.M, K = f.d.K, N = f.d.N, E = f.d.E, R = f.d.R, ER = f.d.ER;
  const int64_t C = ER + E, C2 = ER + 3 * E, ERp = ER + (ER & 1);
  const bf16* x_ptr = f.x2.const_data_ptr<bf16>();
  const int64_t ldx = f.x2.stride(0);
  const bf16* A_ptr = f.A.const_data_ptr<bf16>();
  const bf16* B_ptr = f.B.const_data_ptr<bf16>();
  const bf16* b_ptr = f.bias.defined() ? f.bias.const_data_ptr<bf16>() : nullptr;
  const float* v_ptr = f.v.const_data_ptr<float>();
  const float* c_ptr = f.c.const_data_ptr<float>();
  const bool* br_ptr = f.base_rows.defined() ? f.base_rows.const_data_ptr<bool>() : nullptr;
  bf16* y_ptr = f.y.mutable_data_ptr<bf16>();
  bf16* gates_ptr = f.gates.mutable_data_ptr<bf16>();
  float* saved_ptr = f.saved.mutable_data_ptr<float>();
  float* logits_ptr = logits_scratch<float>(M, E);
  const float s = static_cast<float>(scaling);

  // (a') shrink and router logits.
  bool done = false;
#if defined(MOGU_HAVE_DPBF16)
  if (M < kBrgemmShrinkRows && cpu_has_avx512_bf16()) {
    // z into saved directly; the logits' three parts into vout, summed below.
    const Packed Vs = packed_operand<0>(2, {&f.v}, static_cast<size_t>(3 * E * K),
                                        [&](uint16_t* out) { split_router_bf16(v_ptr, E, K, out); });
    float* vout = scratch<float, 1>(static_cast<size_t>(M * 3 * E));
    const bf16* V_bf = reinterpret_cast<const bf16*>(Vs.data);
    // (row group of 4, block of S rows) units, as in (a): decode rows split the S rows too.
    const int64_t row_groups = (M + 3) / 4;
    const int64_t c_chunks =
        row_groups >= 2 * at::get_num_threads() ? 1 : (C2 + kStackedRowsPerTask - 1) / kStackedRowsPerTask;
    const int64_t c_step = (C2 + c_chunks - 1) / c_chunks;
    const int64_t unit_work = std::min<int64_t>(M, 4) * c_step * K / 4;  // dpbf16: ~4x the fp32 rate
    const int64_t grain = std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(1, unit_work));
    at::parallel_for(0, row_groups * c_chunks, grain, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t m0 = (u / c_chunks) * 4, m1 = std::min(M, m0 + 4);
        const int64_t c0 = (u % c_chunks) * c_step, c1 = std::min(C2, c0 + c_step);
        const int64_t a1 = std::min(c1, ER);
        if (c0 < a1) dot_bf16(x_ptr, ldx, m0, m1, A_ptr + c0 * K, K, a1 - c0, K, saved_ptr + c0, ER + E);
        const int64_t p0 = std::max(c0, ER) - ER, p1 = c1 - ER;
        if (p0 < p1) dot_bf16(x_ptr, ldx, m0, m1, V_bf + p0 * K, K, p1 - p0, K, vout + p0, 3 * E);
      }
    });
    for (int64_t m = 0; m < M; ++m)
      for (int64_t e = 0; e < E; ++e) {
        const float* o = vout + m * 3 * E;
        logits_ptr[m * E + e] = o[e] + (o[E + e] + o[2 * E + e]);
      }
    done = true;
  }
#endif
  if (!done && M >= kBrgemmShrinkMinRows) {
    const Packed Sp = packed_operand<0>(1, {&f.A, &f.v}, static_cast<size_t>(K * C2),
                                        [&](uint16_t* out) { pack_shrink_bf16(A_ptr, v_ptr, ER, E, K, out); });
    float* out = scratch<float, 1>(static_cast<size_t>(M * C2));
    const int64_t grain = std::max<int64_t>(kRowGroup, kMinWorkPerTask / std::max<int64_t>(1, C2 * K) * 16);
    at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
      cpublas::brgemm(m1 - m0, C2, K, ldx, C2, C2, /*add_C=*/false, x_ptr + m0 * ldx,
                      reinterpret_cast<const bf16*>(Sp.data), out + m0 * C2);
      cpublas::brgemm_release();
      unpack_shrink(out, m0, m1, ER, E, saved_ptr, logits_ptr);
    });
  } else if (!done) {
    at::parallel_for(0, (C + kStackedRowsPerTask - 1) / kStackedRowsPerTask, 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t c0 = u * kStackedRowsPerTask;
        shrink_router(x_ptr, ldx, A_ptr, v_ptr, 0, M, c0, std::min(C, c0 + kStackedRowsPerTask), K, ER, E,
                      saved_ptr, logits_ptr);
      }
    });
  }

#if defined(MOGU_HAVE_DPBF16)
  if (M >= kTransposedMinRows && M <= kTransposedMaxRows && cpu_has_avx512_bf16() && weight.stride(1) == 1 &&
      weight.stride(0) >= K) {
    base_and_epilogue_transposed(f, weight, logits_ptr, s);
    return;
  }
#endif

  // (b) the base product.
  at::mm_out(f.y, f.x2, weight.t());

  // (c') gating and epilogue per unit of kBrgemmRows rows x a group of columns: all N columns
  // when there are enough row units for the threads (then y is read in whole rows, which the
  // hardware prefetchers follow; 256-column pieces of rows 4 KiB apart they do not), else
  // kColumns-wide groups so that decode rows split across threads too.
  const Packed Bp = packed_operand<2>(0, {&f.B}, static_cast<size_t>(ERp * N),
                                      [&](uint16_t* out) { pack_expand_bf16(B_ptr, E, N, R, out); });
  const int64_t row_units = (M + kBrgemmRows - 1) / kBrgemmRows;
  const int64_t col_groups = row_units >= 2 * at::get_num_threads() ? 1 : (N + kColumns - 1) / kColumns;
  const int64_t group_cols = col_groups == 1 ? N : kColumns;
  const int64_t unit_work = std::min(M, kBrgemmRows) * group_cols * (ER + 2);
  // The expand by fp32 FMAs inside the combine where the CPU has AVX512-BF16 (for the
  // rounding of y: expand_combine_bf16), else by brgemm into an fp32 tile, combined after.
#if defined(MOGU_HAVE_DPBF16)
  const bool dot_expand = cpu_has_avx512_bf16();
#else
  const bool dot_expand = false;
#endif
  at::parallel_for(0, row_units * col_groups, std::max<int64_t>(1, kMinWorkPerTask / unit_work),
                   [&](int64_t u0, int64_t u1) {
    const int64_t mb_max = std::min(M, kBrgemmRows);
    float* ts = scratch<float, 3>(mb_max * (ER + 1));
    // t rounded to bf16 as the reference rounds it: bf16 pairs for the brgemm, the same
    // values in fp32 for the FMA expand.
    bf16* tb = dot_expand ? nullptr : scratch<bf16, 4>(mb_max * ERp);
    float* tr = dot_expand ? scratch<float, 8>(mb_max * ERp) : nullptr;
    float* gs = scratch<float, 5>(mb_max);
    float* delta = dot_expand ? nullptr : scratch<float, 6>(mb_max * group_cols);
    float* bias_chunk = scratch<float, 7>(group_cols);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t m0 = (u / col_groups) * kBrgemmRows, n0 = (u % col_groups) * group_cols;
      const int64_t m1 = std::min(M, m0 + kBrgemmRows), n1 = std::min(N, n0 + group_cols), nb = n1 - n0;
      gate_rows(logits_ptr, c_ptr, br_ptr, m0, m1, E, R, s, /*write_gates=*/n0 == 0, saved_ptr, gates_ptr, ts);
      for (int64_t r = 0; r < m1 - m0; ++r) {
        const float* t = ts + r * (ER + 1);
        for (int64_t c = 0; c < ERp; ++c) {
          const bf16 rounded = static_cast<bf16>(c < ER ? t[c] : 0.0f);  // c = Er: the even padding
          if (dot_expand) tr[r * ERp + c] = static_cast<float>(rounded);
          else tb[r * ERp + c] = rounded;
        }
        gs[r] = t[ER];
      }
      for (int64_t i = 0; i < nb; ++i) bias_chunk[i] = b_ptr != nullptr ? static_cast<float>(b_ptr[n0 + i]) : 0.0f;
#if defined(MOGU_HAVE_DPBF16)
      if (dot_expand) {
        expand_combine_bf16(y_ptr + m0 * N, N, tr, ERp, Bp.data, N, bias_chunk, gs, m1 - m0, n0, n1);
        continue;
      }
#endif
      // delta (rows x nb) in one brgemm: each call looks its kernel up in a hash table (0.7% of
      // a bf16 call at M = 256 when this was eight kColumns-wide calls per unit).
      cpublas::brgemm(m1 - m0, nb, ERp, ERp, N, nb, /*add_C=*/false, tb,
                      reinterpret_cast<const bf16*>(Bp.data) + n0 * 2, delta);
      combine_bf16(y_ptr + m0 * N + n0, N, delta, nb, bias_chunk, gs, m1 - m0, nb);
    }
    if (!dot_expand) cpublas::brgemm_release();
  });
}

#endif  // MOGU_HAVE_BRGEMM

}  // namespace

std::tuple<Tensor, Tensor, Tensor> mogu_linear_cpu(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
    const Tensor& lora_B, const Tensor& router_weight, const Tensor& router_bias, double scaling,
    const std::optional<Tensor>& base_rows) {
  ForwardCall f = prepare_forward(x, weight, bias, lora_A, lora_B, router_weight, router_bias, base_rows,
                                  c10::DeviceType::CPU, "mogu_linear[cpu]");
  const int64_t M = f.d.M, K = f.d.K, N = f.d.N, E = f.d.E, R = f.d.R, ER = f.d.ER;
#if defined(MOGU_HAVE_BRGEMM)
  if (M > 0 && x.scalar_type() == at::kBFloat16 && K % 2 == 0 && bf16_brgemm_usable()) {
    forward_bf16_brgemm(f, weight, scaling);
    return f.outputs();
  }
#endif
  if (M > 0) {
    const bool* br_ptr = f.base_rows.defined() ? f.base_rows.const_data_ptr<bool>() : nullptr;
    const int64_t ldx = f.x2.stride(0);

    MOGU_DISPATCH_FLOATING(x.scalar_type(), "mogu_linear_cpu", [&] {
      const scalar_t* x_ptr = f.x2.const_data_ptr<scalar_t>();
      const scalar_t* A_ptr = f.A.const_data_ptr<scalar_t>();
      const scalar_t* B_ptr = f.B.const_data_ptr<scalar_t>();
      const scalar_t* b_ptr = f.bias.defined() ? f.bias.const_data_ptr<scalar_t>() : nullptr;
      const acc_t* v_ptr = f.v.const_data_ptr<acc_t>();
      const acc_t* c_ptr = f.c.const_data_ptr<acc_t>();
      scalar_t* y_ptr = f.y.mutable_data_ptr<scalar_t>();
      scalar_t* gates_ptr = f.gates.mutable_data_ptr<scalar_t>();
      acc_t* saved_ptr = f.saved.mutable_data_ptr<acc_t>();
      acc_t* logits_ptr = logits_scratch<acc_t>(M, E);
      const acc_t s = static_cast<acc_t>(scaling);

      // (a), parallel over (row group, stacked-row chunk) units. Tasks hold whole
      // kRowGroup-row groups, so the row grouping inside the dot products (and with it every
      // rounding) is the same for any number of threads. Few rows: split the stacked rows too.
      const int64_t C = ER + E;
      const int64_t row_groups = (M + kRowGroup - 1) / kRowGroup;
      const int64_t c_step = row_groups >= 2 * at::get_num_threads() ? C : kStackedRowsPerTask;
      const int64_t c_chunks = (C + c_step - 1) / c_step;
      const int64_t dot_work = std::min(M, kRowGroup) * std::min(C, c_step) * K;
      at::parallel_for(0, row_groups * c_chunks, std::max<int64_t>(1, kMinWorkPerTask / dot_work),
                       [&](int64_t u0, int64_t u1) {
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t m0 = (u / c_chunks) * kRowGroup, c0 = (u % c_chunks) * c_step;
          shrink_router(x_ptr, ldx, A_ptr, v_ptr, m0, std::min(M, m0 + kRowGroup), c0, std::min(C, c0 + c_step),
                        K, ER, E, saved_ptr, logits_ptr);
        }
      });

      // (b), the base product.
      at::mm_out(f.y, f.x2, weight.t());

      // (c), parallel over (row block, column chunk) tiles of y.
      const int64_t row_blocks = (M + kRowBlock - 1) / kRowBlock;
      const int64_t col_chunks = (N + kColumns - 1) / kColumns;
      const int64_t tile_work = std::min(M, kRowBlock) * std::min(N, kColumns) * (ER + 2);
      at::parallel_for(0, row_blocks * col_chunks, std::max<int64_t>(1, kMinWorkPerTask / tile_work),
                       [&](int64_t u0, int64_t u1) {
        acc_t* ts = scratch<acc_t, 3>(std::min(M, kRowBlock) * (ER + 1));
        acc_t* tile = scratch<acc_t, 4>(ER * std::min(N, kColumns));
        acc_t* bias_chunk = scratch<acc_t, 5>(std::min(N, kColumns));
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t m0 = (u / col_chunks) * kRowBlock, n0 = (u % col_chunks) * kColumns;
          gate_expand(y_ptr, b_ptr, B_ptr, logits_ptr, c_ptr, br_ptr, m0, std::min(M, m0 + kRowBlock), n0,
                      std::min(N, n0 + kColumns), N, E, R, s, saved_ptr, gates_ptr, ts, tile, bias_chunk);
        }
      });
    });
  }
  return f.outputs();
}

const char* cpu_bf16_path() {
#if defined(MOGU_HAVE_BRGEMM)
  if (bf16_brgemm_usable()) {
#if defined(MOGU_HAVE_DPBF16)
    if (cpu_has_avx512_bf16()) return "brgemm+avx512bf16";
#endif
    return "brgemm";
  }
#endif
  return "generic";
}

}  // namespace mogu
