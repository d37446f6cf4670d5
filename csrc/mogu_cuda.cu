// mogu_cuda.cu: the CUDA forward of mogu_C::mogu_linear (contract in mogu_ops.h), the
// fallback of the Triton backend on GPUs.
//
// Three launches (M rows, Er = E * r, C = Er + E stacked columns, acc = fp32 or fp64):
//   1. y = x W^T                  cuBLAS through at::mm_out, straight into y's buffer;
//   2. shrink_router_kernel       the C dot products of each row of x with the stacked
//                                 S = [A_0; ..; A_{E-1}; v] (K long, acc), one block per
//                                 (ROWS rows, kChunk stacked rows), reduced across the block:
//                                 the unscaled shrink z into saved, router logits into a
//                                 small (M, E) scratch;
//   3. gate_expand_kernel         per (ROWS rows, 256 columns) block: sigmoid gates, base-row
//                                 mask, gate sum and rank-space scaling t = s * mix_e * z in
//                                 shared memory, then one thread per column n applies
//                                 y = gs * (y + b) + t . [B_0 | ..][n, :], reading and writing y
//                                 once (in place).
// ROWS = 8 for M >= 32 amortises the A/v rows (step 2) and the B rows (step 3) over 8 rows;
// ROWS = 1 spreads decode over more blocks.
//
// Only headers that the CPU torch wheel and the CUDA toolkit both ship are used (no
// ATen/cuda/CUDAContext.h, which needs cuBLAS/cuSPARSE headers), so this file also compiles
// on a machine without a GPU: see csrc/check_cuda_compile.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "mogu_entry.h"

namespace mogu {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 8;                   // stacked columns reduced per sweep over K
constexpr size_t kMaxDynamicSmem = 40 * 1024;  // under the 48 KiB default (no opt-in needed)

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Step 2. Grid: (ceil(M / ROWS), ceil(C / kChunk)) blocks of kThreads; block (bx, by) computes
// the dot products of rows [bx * ROWS, +ROWS) of x with stacked rows [by * kChunk, +kChunk) of
// S = [A; v], each reduced across the block: z into saved[:, :Er], router logits into logits.
template <typename scalar_t, typename acc_t, int ROWS>
__global__ void __launch_bounds__(kThreads) shrink_router_kernel(
    const scalar_t* __restrict__ x, int64_t ldx, int64_t M, int64_t K,
    const scalar_t* __restrict__ A,   // (Er, K) contiguous
    const acc_t* __restrict__ v,      // (E, K) contiguous
    int E, int R,
    acc_t* __restrict__ saved,        // (M, Er + E): columns [0, Er) written here
    acc_t* __restrict__ logits) {     // (M, E)
  __shared__ acc_t partial[kWarps][ROWS * kChunk];
  const int ER = E * R;
  const int C = ER + E;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * ROWS;
  const int c0 = blockIdx.y * kChunk;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  acc_t acc[ROWS][kChunk];
#pragma unroll
  for (int i = 0; i < ROWS; ++i)
#pragma unroll
    for (int j = 0; j < kChunk; ++j) acc[i][j] = acc_t(0);

  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    acc_t xv[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i)
      xv[i] = (m0 + i < M) ? static_cast<acc_t>(x[(m0 + i) * ldx + k]) : acc_t(0);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      const int col = c0 + j;
      if (col < C) {  // uniform across the block
        const acc_t s = col < ER ? static_cast<acc_t>(A[static_cast<int64_t>(col) * K + k])
                                 : v[static_cast<int64_t>(col - ER) * K + k];
#pragma unroll
        for (int i = 0; i < ROWS; ++i) acc[i][j] += xv[i] * s;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < ROWS; ++i)
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      const acc_t r = warp_sum(acc[i][j]);
      if (lane == 0) partial[warp][i * kChunk + j] = r;
    }
  __syncthreads();
  if (threadIdx.x < ROWS * kChunk) {
    const int i = threadIdx.x / kChunk;
    const int col = c0 + threadIdx.x % kChunk;
    const int64_t m = m0 + i;
    if (m < M && col < C) {
      acc_t total = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += partial[w][threadIdx.x];
      if (col < ER) {
        saved[m * C + col] = total;
      } else {
        logits[m * E + (col - ER)] = total;
      }
    }
  }
}

// Step 3. Grid: (ceil(M / ROWS), ceil(N / kThreads)) blocks of kThreads. Each block first does
// the gating of its ROWS rows (a few flops per row, repeated by every column block; the blocks
// with blockIdx.y == 0 also write gates and saved[:, Er:]), then one thread per column n
// applies y = gs * (y + b) + t . [B_0 | ..][n, :], t = s * mix_e * z, in place.
// Dynamic shared memory: ROWS * (Er + 1 + E) acc values.
template <typename scalar_t, typename acc_t, int ROWS>
__global__ void __launch_bounds__(kThreads) gate_expand_kernel(
    scalar_t* __restrict__ y,               // (M, N): x W^T in, layer output out
    const scalar_t* __restrict__ bias,      // (N,) or nullptr
    const scalar_t* __restrict__ B,         // lora_B (E, N, R) contiguous
    const acc_t* __restrict__ logits,       // (M, E)
    const acc_t* __restrict__ c,            // (E,)
    const bool* __restrict__ base_rows,     // (M,) or nullptr
    acc_t* __restrict__ saved,              // (M, Er + E): z read, gates written
    scalar_t* __restrict__ gates,           // (M, E)
    int64_t M, int64_t N, int E, int R, acc_t scaling) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ER = E * R;
  const int W = ER + 1;
  acc_t* t_s = reinterpret_cast<acc_t*>(smem_raw);  // [ROWS][Er + 1]: s * mix * z | gs
  acc_t* mix_s = t_s + ROWS * W;                    // [ROWS][E]
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * ROWS;

  if (threadIdx.x < ROWS) {
    const int i = threadIdx.x;
    const int64_t m = m0 + i;
    acc_t gate_sum = 0;
    const bool is_base = m < M && base_rows != nullptr && base_rows[m];
    for (int e = 0; e < E; ++e) {
      acc_t mix = 0;
      if (m < M) {
        const acc_t g = acc_t(1) / (acc_t(1) + exp_acc(-(logits[m * E + e] + c[e])));
        if (blockIdx.y == 0) {
          saved[m * (ER + E) + ER + e] = g;
          gates[m * E + e] = static_cast<scalar_t>(g);
        }
        mix = is_base ? acc_t(0) : g;
      }
      mix_s[i * E + e] = mix;
      gate_sum += mix;
    }
    t_s[i * W + ER] = is_base ? acc_t(1) : gate_sum;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < ROWS * ER; idx += kThreads) {
    const int i = idx / ER;
    const int col = idx % ER;
    const int64_t m = m0 + i;
    t_s[i * W + col] = m < M ? scaling * mix_s[i * E + col / R] * saved[m * (ER + E) + col] : acc_t(0);
  }
  __syncthreads();

  const int64_t n = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (n >= N) return;
  acc_t acc[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) acc[i] = acc_t(0);
  for (int e = 0; e < E; ++e) {
    const scalar_t* Bn = B + (static_cast<int64_t>(e) * N + n) * R;
    for (int j = 0; j < R; ++j) {
      const acc_t b = static_cast<acc_t>(Bn[j]);
      const int col = e * R + j;
#pragma unroll
      for (int i = 0; i < ROWS; ++i) acc[i] += t_s[i * W + col] * b;
    }
  }
  const acc_t bn = bias != nullptr ? static_cast<acc_t>(bias[n]) : acc_t(0);
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int64_t m = m0 + i;
    if (m < M) {
      scalar_t* p = y + m * N + n;
      *p = static_cast<scalar_t>(t_s[i * W + ER] * (static_cast<acc_t>(*p) + bn) + acc[i]);
    }
  }
}

template <typename scalar_t, typename acc_t, int ROWS>
void launch_kernels(const ForwardCall& f, double scaling, cudaStream_t stream) {
  const MoguDims& d = f.d;
  const int E = static_cast<int>(d.E), R = static_cast<int>(d.R);
  const unsigned row_blocks = static_cast<unsigned>((d.M + ROWS - 1) / ROWS);
  const dim3 shrink_grid(row_blocks, static_cast<unsigned>((d.ER + d.E + kChunk - 1) / kChunk));
  // (M, E) router logits, from the shrink kernel to the expand kernel (the caching allocator
  // makes this allocation cheap on CUDA; the CPU kernel uses a per-thread scratch instead).
  Tensor logits = at::empty({d.M, d.E}, f.saved.options());
  shrink_router_kernel<scalar_t, acc_t, ROWS><<<shrink_grid, kThreads, 0, stream>>>(
      f.x2.const_data_ptr<scalar_t>(), f.x2.stride(0), d.M, d.K, f.A.const_data_ptr<scalar_t>(),
      f.v.const_data_ptr<acc_t>(), E, R, f.saved.mutable_data_ptr<acc_t>(), logits.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 expand_grid(row_blocks, static_cast<unsigned>((d.N + kThreads - 1) / kThreads));
  const size_t expand_smem = static_cast<size_t>(ROWS) * (d.ER + 1 + d.E) * sizeof(acc_t);
  gate_expand_kernel<scalar_t, acc_t, ROWS><<<expand_grid, kThreads, expand_smem, stream>>>(
      f.y.mutable_data_ptr<scalar_t>(), f.bias.defined() ? f.bias.const_data_ptr<scalar_t>() : nullptr,
      f.B.const_data_ptr<scalar_t>(), logits.const_data_ptr<acc_t>(), f.c.const_data_ptr<acc_t>(),
      f.base_rows.defined() ? f.base_rows.const_data_ptr<bool>() : nullptr, f.saved.mutable_data_ptr<acc_t>(),
      f.gates.mutable_data_ptr<scalar_t>(), d.M, d.N, E, R, static_cast<acc_t>(scaling));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> mogu_linear_cuda(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
    const Tensor& lora_B, const Tensor& router_weight, const Tensor& router_bias, double scaling,
    const std::optional<Tensor>& base_rows) {
  ForwardCall f = prepare_forward(x, weight, bias, lora_A, lora_B, router_weight, router_bias, base_rows,
                                  c10::DeviceType::CUDA, "mogu_linear[cuda]");
  const MoguDims& d = f.d;
  TORCH_CHECK(d.ER + 1 + d.E <= static_cast<int64_t>(kMaxDynamicSmem / sizeof(double)),
              "mogu_linear[cuda]: E * (r + 1) + 1 = ", d.ER + 1 + d.E, " exceeds what this kernel supports (",
              kMaxDynamicSmem / sizeof(double), ")");
  TORCH_CHECK((d.N + kThreads - 1) / kThreads <= 65535, "mogu_linear[cuda]: N = ", d.N, " is too large");
  if (d.M > 0) {
    const c10::cuda::CUDAGuard device_guard(x.device());
    at::mm_out(f.y, f.x2, weight.t());  // step 1: the base product, cuBLAS
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    MOGU_DISPATCH_FLOATING(x.scalar_type(), "mogu_linear_cuda", [&] {
      const bool many_rows = d.M >= 32 && 8 * (d.ER + 1 + d.E) * sizeof(acc_t) <= kMaxDynamicSmem;
      if (many_rows) {
        launch_kernels<scalar_t, acc_t, 8>(f, scaling, stream);
      } else {
        launch_kernels<scalar_t, acc_t, 1>(f, scaling, stream);
      }
    });
  }
  return f.outputs();
}

}  // namespace mogu

TORCH_LIBRARY_IMPL(mogu_C, CUDA, m) {
  m.impl("mogu_linear", &mogu::mogu_linear_cuda);
}
