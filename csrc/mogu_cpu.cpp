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
// outputs and the (M, E) logits.
// The hot loops use fixed-width GCC/Clang vector types; MOGU_CPU_CLONES compiles them for
// AVX-512, AVX2 and baseline x86-64 and picks one at load time (GCC function multiversioning),
// since the extension as a whole is built for baseline x86-64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "mogu_entry.h"

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
  } else {
    acc_t tmp[Vec<acc_t>::lanes];
    for (int64_t l = 0; l < Vec<acc_t>::lanes; ++l) tmp[l] = static_cast<acc_t>(p[l]);
    __builtin_memcpy(&v, tmp, sizeof(V));
  }
  return v;
}

template <typename acc_t, typename T>
MOGU_ALWAYS_INLINE void store_vec(T* p, typename Vec<acc_t>::type v) {
  if constexpr (std::is_same_v<T, acc_t>) {
    __builtin_memcpy(p, &v, sizeof(v));
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
    for (int64_t kb = 0; kb < K; kb += kDotBlock) {
      const int64_t ke = std::min(K, kb + kDotBlock);
      for (int64_t c = 0; c < C; ++c) {
        const TS* sc = S + c * lds;
        V acc[RX];
        for (int i = 0; i < RX; ++i) acc[i] = V{};
        int64_t k = kb;
        for (; k + L <= ke; k += L) {
          const V sv = load_vec<acc_t>(sc + k);
          for (int i = 0; i < RX; ++i) acc[i] += load_vec<acc_t>(x + i * ldx + k) * sv;
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
    dot_rows<1>(x + m * ldx, ldx, A + a0 * K, K, a1 - a0, K, saved + m * C + a0, C);
    dot_rows<1>(x + m * ldx, ldx, v + v0 * K, K, v1 - v0, K, logits + m * E + v0, E);
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
    const scalar_t* Be = B + (e * N + n0) * R;
    acc_t* te = tile + e * R * nb;
    for (int64_t j = 0; j < R; ++j)
      for (int64_t i = 0; i < nb; ++i) te[j * nb + i] = static_cast<acc_t>(Be[i * R + j]);
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

}  // namespace

std::tuple<Tensor, Tensor, Tensor> mogu_linear_cpu(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
    const Tensor& lora_B, const Tensor& router_weight, const Tensor& router_bias, double scaling,
    const std::optional<Tensor>& base_rows) {
  ForwardCall f = prepare_forward(x, weight, bias, lora_A, lora_B, router_weight, router_bias, base_rows,
                                  c10::DeviceType::CPU, "mogu_linear[cpu]");
  const int64_t M = f.d.M, K = f.d.K, N = f.d.N, E = f.d.E, R = f.d.R, ER = f.d.ER;
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
      acc_t* logits_ptr = f.logits.mutable_data_ptr<acc_t>();
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
        std::vector<acc_t> ts(std::min(M, kRowBlock) * (ER + 1));
        std::vector<acc_t> tile(ER * std::min(N, kColumns));
        std::vector<acc_t> bias_chunk(std::min(N, kColumns));
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t m0 = (u / col_chunks) * kRowBlock, n0 = (u % col_chunks) * kColumns;
          gate_expand(y_ptr, b_ptr, B_ptr, logits_ptr, c_ptr, br_ptr, m0, std::min(M, m0 + kRowBlock), n0,
                      std::min(N, n0 + kColumns), N, E, R, s, saved_ptr, gates_ptr, ts.data(), tile.data(),
                      bias_chunk.data());
        }
      });
    });
  }
  return f.outputs();
}

}  // namespace mogu
