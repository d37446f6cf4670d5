"""Triton kernels of the ``triton`` backend (launchers, autotuning and autograd live in
:mod:`mogu_kernels.triton_backend`).

Notation (see docs/design.md section 2): x (M, K) rows, W (N, K), E experts of rank R,
``S = [A_0; ...; A_{E-1}]`` the stacked shrink ((E*R) x K, stacked column c = e*R + j is row
j of expert e), ``[B_0 | ... | B_{E-1}]`` the stacked expand (N x E*R), router vectors
v (E, K) and biases c (E,)::

    g   = sigmoid(x v^T + c)                      fp32, (M, E)
    mix = g, or 0 on a base row                   (M, E)
    gs  = sum_e mix, or 1 on a base row           (M,)
    y   = gs * (x W^T + b) + [z * s * mix[c // R]] @ [B_0 | ... ]^T,   z = x S^T  (M, E*R)

Every kernel also writes ``saved`` (M, E*R + E) fp32: columns [0, E*R) hold the unscaled
shrink z, columns [E*R, E*R + E) the fp32 gates g. Backward needs exactly that per token
(besides x), and the split path's GEMM reads its epilogue operands from it.

Five kernels:

* ``mogu_fused_kernel``: decode and small batches; ONE launch. Each program owns one
  (BLOCK_M x BLOCK_N) output tile; in one K loop it reads an x tile once and feeds three
  products from it: the base tile x W^T, the stacked shrink x S^T and the router logits
  x v^T (fp32). Gates, rank-space scaling, the one expand and the gate-sum row scale are
  the epilogue. The shrink is recomputed by every N tile (extra work R/BLOCK_N of the
  base FLOPs, on tensor cores that idle at decode); the pid_n == 0 programs write gates
  and ``saved``.
* ``mogu_shrink_router_kernel`` + ``mogu_gemm_expand_kernel``: the split path for large
  M, where the recomputed shrink would cost real tensor-core time: a small launch
  computes z and g once per row, then a grouped GEMM applies gates/expand in its
  epilogue, reading z and g from ``saved``.
* ``mogu_splitk_partial_kernel`` + ``mogu_splitk_reduce_kernel``: the split-K decode path
  (M <= 16 when N alone gives too few programs to stream W at full bandwidth). Grid
  (N tiles, SPLIT_K, M tiles): program (n, s, m) runs the shared K loop over K slice s only
  and writes its fp32 partial x W^T tile to the workspace ``ws`` (M, SPLIT_K, N); the
  pid_n == 0 programs also run the shrink/router products over that slice and write
  ``ws_small`` (M, SPLIT_K, E*R + E) = [partial z | partial logits]. The reduce kernel
  (grid (N tiles, M tiles)) sums the partials in the fixed order s = 0, 1, ..., SPLIT_K-1
  (sequential fp32 adds from 0: no atomics, so the result is the same on every run with
  the same config) and then runs the fused kernel's epilogue unchanged. K slice s is
  [s * KS, min((s + 1) * KS, K)) with KS = cdiv(cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K, a
  multiple of BLOCK_K, so EVEN_K still means "no ragged K block" in every slice; a slice
  past K is empty and its partials are exact zeros. The workspace puts M first so that
  its strides do not depend on M (no re-specialization per row count).

Shared conventions: accumulation in fp32; the router logits are an fp32 broadcast-reduce
(exact fp32 whatever x's dtype, no padding of E to a 16-wide dot); ``INPUT_PRECISION``
is "ieee" for exact fp32 GEMMs ("tf32" when torch allows TF32, and for 16-bit inputs where
it is Triton's no-op default); ``UPCAST_DOT`` converts dot operands to fp32 and exists
only because the Triton interpreter's bf16 ``tl.dot`` multiplies raw bits (the launcher
sets it only when interpreting bf16). Any K, N, R, E: every load is masked on its row and
column bounds.

Shared pieces (the pattern of vLLM's LoRA ``kernel_utils``): the K loop is one
``@triton.jit`` helper, ``_k_loop``, that every kernel calls with the products it needs
(``DO_BASE``: x W^T; ``DO_SHRINK``: x S^T and the router logits), walking pointer tiles
forward by BLOCK_K. ``EVEN_K`` (K % BLOCK_K == 0, set per launch by ``EVEN_K_HEURISTIC``)
is its fast path: no ragged last K block, so the K loads carry only their loop-invariant
row/column masks. The epilogue pieces (gates from logits, gate-sum row scale plus bias,
one expand of rank-space-scaled shrink columns, the stores) are helpers too, and the
whole epilogue of a program that holds a finished x W^T tile, shrink and logits is one
helper, ``_fused_epilogue``, shared by the fused kernel and the split-K reduce.
"""
from __future__ import annotations

import triton
import triton.language as tl

# The row count changes from call to call (tokens in flight); specializing on it (M == 1,
# M % 16 == 0) would only multiply compiles and autotuning runs. N, K and the strides are
# fixed per layer and stay specialized (alignment enables vectorized, pipelined loads).
_ROW_COUNT_ARGS = ["M", "M_KEY"]


def _even_k(meta) -> bool:
    return meta["K"] % meta["BLOCK_K"] == 0


# ``triton.heuristics`` values for every kernel here: EVEN_K follows from K and the chosen
# BLOCK_K (autotuned), so it is derived per launch rather than passed by the caller. K is
# fixed per layer and already in every autotuning key, so this adds no compiles.
EVEN_K_HEURISTIC = {"EVEN_K": _even_k}


# --------------------------------------------------------------------------- shared helpers
@triton.jit
def _mma(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _load_k_tile(ptrs, bounds_mask, k_mask, EVEN_K: tl.constexpr):
    """One K-slice tile, zero outside the tensor. ``bounds_mask`` covers the rows/columns
    (loop invariant); ``k_mask`` the ragged last K block, which EVEN_K rules out."""
    if EVEN_K:
        tile = tl.load(ptrs, mask=bounds_mask, other=0.0)
    else:
        tile = tl.load(ptrs, mask=bounds_mask & k_mask, other=0.0)
    return tile


@triton.jit
def _k_loop(x_ptrs, x_mask, w_ptrs, w_mask, a_ptrs, a_mask, v_ptrs, v_mask, base, shrink, logits, K,
            stride_xk, stride_wk, stride_ak, stride_rwk,
            BLOCK_K: tl.constexpr, DO_BASE: tl.constexpr, DO_SHRINK: tl.constexpr, EVEN_K: tl.constexpr,
            INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """The K loop of every kernel: each x tile is loaded once and feeds

    * DO_BASE:   base   (BLOCK_M, BLOCK_N) += x_tile @ W^T tile         (tensor cores)
    * DO_SHRINK: shrink (BLOCK_M, BLOCK_R) += x_tile @ S^T tile         (tensor cores)
                 logits (BLOCK_M, BLOCK_E) += x_tile . v tile, exactly in fp32 (broadcast-reduce)

    Pointer tiles are at k = 0: x (BLOCK_M, BLOCK_K), W^T (BLOCK_K, BLOCK_N), S^T
    (BLOCK_K, BLOCK_R), v (BLOCK_E, BLOCK_K), with their row/column bounds masks. Operands
    of a product that is off may be None. Returns (base, shrink, logits), fp32."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        x_tile = _load_k_tile(x_ptrs, x_mask, offs_k[None, :] < k_left, EVEN_K)
        if DO_BASE:
            w_tile = _load_k_tile(w_ptrs, w_mask, offs_k[:, None] < k_left, EVEN_K)
            base = _mma(x_tile, w_tile, base, INPUT_PRECISION, UPCAST_DOT)
            w_ptrs += BLOCK_K * stride_wk
        if DO_SHRINK:
            a_tile = _load_k_tile(a_ptrs, a_mask, offs_k[:, None] < k_left, EVEN_K)
            shrink = _mma(x_tile, a_tile, shrink, INPUT_PRECISION, UPCAST_DOT)
            v_tile = _load_k_tile(v_ptrs, v_mask, offs_k[None, :] < k_left, EVEN_K).to(tl.float32)
            logits += tl.sum(x_tile.to(tl.float32)[:, None, :] * v_tile[None, :, :], axis=2)
            a_ptrs += BLOCK_K * stride_ak
            v_ptrs += BLOCK_K * stride_rwk
        x_ptrs += BLOCK_K * stride_xk
    return base, shrink, logits


@triton.jit
def _x_tile_ptrs(x_ptr, offs_m, stride_xm, stride_xk, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_K) pointers of x at k = 0."""
    return x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :] * stride_xk


@triton.jit
def _w_tile_ptrs(w_ptr, offs_n, stride_wn, stride_wk, BLOCK_K: tl.constexpr):
    """(BLOCK_K, BLOCK_N) pointers of W^T at k = 0."""
    return w_ptr + offs_n[None, :] * stride_wn + tl.arange(0, BLOCK_K)[:, None] * stride_wk


@triton.jit
def _shrink_tile_ptrs(a_ptr, offs_c, stride_ae, stride_ar, stride_ak, R: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_K, BLOCK_R) pointers of S^T at k = 0: stacked column c = e*R + j is A[e, j, :]."""
    return (a_ptr + ((offs_c // R) * stride_ae + (offs_c % R) * stride_ar)[None, :]
            + tl.arange(0, BLOCK_K)[:, None] * stride_ak)


@triton.jit
def _router_tile_ptrs(rw_ptr, offs_e, stride_rwe, stride_rwk, BLOCK_K: tl.constexpr):
    """(BLOCK_E, BLOCK_K) pointers of the router vectors v at k = 0."""
    return rw_ptr + offs_e[:, None] * stride_rwe + tl.arange(0, BLOCK_K)[None, :] * stride_rwk


@triton.jit
def _expand_tile_ptrs(b_ptr, offs_c, offs_n, stride_be, stride_bn, stride_br, R: tl.constexpr):
    """Pointers of the (BLOCK_C, BLOCK_N) tile of [B_0 | ...]^T: row c = e*R + j is B[e, :, j]."""
    return b_ptr + ((offs_c // R) * stride_be + (offs_c % R) * stride_br)[:, None] + offs_n[None, :] * stride_bn


@triton.jit
def _base_row_flags(base_ptr, offs_m, m_mask, HAS_BASE_ROWS: tl.constexpr):
    """(BLOCK_M,) bool: True where the row must run as the plain base layer."""
    if HAS_BASE_ROWS:
        flags = tl.load(base_ptr + offs_m, mask=m_mask, other=0) != 0
    else:
        flags = offs_m < 0
    return flags


@triton.jit
def _gates_from_logits(logits, rb_ptr, offs_e, e_valid, stride_rb):
    """g = sigmoid(x v^T + c), fp32 (BLOCK_M, BLOCK_E)."""
    rb = tl.load(rb_ptr + offs_e * stride_rb, mask=e_valid, other=0.0).to(tl.float32)
    return tl.sigmoid(logits + rb[None, :])


@triton.jit
def _mix_and_gate_sum(gates, is_base, e_valid):
    """mix (BLOCK_M, BLOCK_E): gates, zeroed on base rows and padding columns;
    gate_sum (BLOCK_M,): sum of mix, or exactly 1 on base rows."""
    mix = tl.where(e_valid[None, :], gates, 0.0)
    mix = tl.where(is_base[:, None], 0.0, mix)
    gate_sum = tl.where(is_base, 1.0, tl.sum(mix, axis=1))
    return mix, gate_sum


@triton.jit
def _scale_base(acc, gate_sum, bias_ptr, offs_n, n_mask, HAS_BIAS: tl.constexpr):
    """Epilogue, base part: gs * (x W^T + b) from acc = x W^T."""
    acc = acc * gate_sum[:, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += gate_sum[:, None] * bias[None, :]
    return acc


@triton.jit
def _add_expand(acc, z, col_gate, scaling, b_ptr, offs_c, c_valid, offs_n, n_mask,
                stride_be, stride_bn, stride_br, R: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Epilogue, expert part: acc + [s * col_gate * z] @ [B_0 | ...]^T over the stacked
    columns offs_c (col_gate: the mix of column c's expert c // R, 0 on base rows)."""
    scaled = (z * col_gate * scaling).to(b_ptr.dtype.element_ty)
    b_tile = tl.load(_expand_tile_ptrs(b_ptr, offs_c, offs_n, stride_be, stride_bn, stride_br, R),
                     mask=c_valid[:, None] & n_mask[None, :], other=0.0)
    return _mma(scaled, b_tile, acc, INPUT_PRECISION, UPCAST_DOT)


@triton.jit
def _store_y(acc, y_ptr, offs_m, m_mask, offs_n, n_mask, stride_ym, stride_yn):
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _store_gates_and_saved(gates, shrink, gates_ptr, saved_ptr, offs_m, m_mask, offs_e, e_valid, offs_c,
                           stride_gm, stride_ge, stride_sm, ER: tl.constexpr):
    """gates out (x dtype) and saved = [z (fp32) | gates (fp32)] for the rows of this tile."""
    ge_mask = m_mask[:, None] & e_valid[None, :]
    tl.store(gates_ptr + offs_m[:, None] * stride_gm + offs_e[None, :] * stride_ge,
             gates.to(gates_ptr.dtype.element_ty), mask=ge_mask)
    tl.store(saved_ptr + offs_m[:, None] * stride_sm + ER + offs_e[None, :], gates, mask=ge_mask)
    tl.store(saved_ptr + offs_m[:, None] * stride_sm + offs_c[None, :], shrink,
             mask=m_mask[:, None] & (offs_c < ER)[None, :])


@triton.jit
def _fused_epilogue(acc, shrink, logits, pid_n, offs_m, m_mask, offs_n, n_mask, offs_c, c_valid, offs_e, e_valid,
                    bias_ptr, b_ptr, rb_ptr, base_ptr, y_ptr, gates_ptr, saved_ptr, scaling,
                    stride_be, stride_bn, stride_br, stride_rb, stride_ym, stride_yn, stride_gm, stride_ge, stride_sm,
                    E: tl.constexpr, R: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BASE_ROWS: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Everything after the K loop, given the complete fp32 x W^T tile ``acc`` (BLOCK_M,
    BLOCK_N), stacked shrink (BLOCK_M, BLOCK_R) and router logits (BLOCK_M, BLOCK_E):
    gates, gate-sum row scale plus bias, rank-space gating, ONE expand, the y store; the
    pid_n == 0 programs also store gates and ``saved``. Used by ``mogu_fused_kernel`` and
    ``mogu_splitk_reduce_kernel``."""
    ER: tl.constexpr = E * R
    gates = _gates_from_logits(logits, rb_ptr, offs_e, e_valid, stride_rb)
    is_base = _base_row_flags(base_ptr, offs_m, m_mask, HAS_BASE_ROWS)
    mix, gate_sum = _mix_and_gate_sum(gates, is_base, e_valid)
    acc = _scale_base(acc, gate_sum, bias_ptr, offs_n, n_mask, HAS_BIAS)

    # Rank-space gating: column c of the shrink belongs to expert c // R.
    col_gate = tl.zeros(shrink.shape, dtype=tl.float32)
    for e in tl.static_range(E):
        mix_e = tl.sum(tl.where(offs_e[None, :] == e, mix, 0.0), axis=1)
        col_gate += tl.where((offs_c // R == e)[None, :], mix_e[:, None], 0.0)
    # ONE expand with [B_0 | ... | B_{E-1}] adds every expert's delta.
    acc = _add_expand(acc, shrink, col_gate, scaling, b_ptr, offs_c, c_valid, offs_n, n_mask,
                      stride_be, stride_bn, stride_br, R, INPUT_PRECISION, UPCAST_DOT)

    _store_y(acc, y_ptr, offs_m, m_mask, offs_n, n_mask, stride_ym, stride_yn)
    if pid_n == 0:  # gates and saved are per row: written once, by the first column of tiles
        _store_gates_and_saved(gates, shrink, gates_ptr, saved_ptr, offs_m, m_mask, offs_e, e_valid, offs_c,
                               stride_gm, stride_ge, stride_sm, ER)


# --------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=_ROW_COUNT_ARGS)
def mogu_fused_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, rw_ptr, rb_ptr, base_ptr,
    y_ptr, gates_ptr, saved_ptr,
    M, N, K, M_KEY, scaling,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_ae, stride_ar, stride_ak, stride_be, stride_bn, stride_br,
    stride_rwe, stride_rwk, stride_rb,
    stride_ym, stride_yn, stride_gm, stride_ge, stride_sm,
    E: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BASE_ROWS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """One launch: grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)). M_KEY only keys the autotuner.

    BLOCK_R = next_pow2(max(E*R, 16)), BLOCK_E = next_pow2(max(E, 2)).
    """
    ER: tl.constexpr = E * R
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_R)
    offs_e = tl.arange(0, BLOCK_E)
    m_mask = offs_m < M
    n_mask = offs_n < N
    c_valid = offs_c < ER
    e_valid = offs_e < E

    acc, shrink, logits = _k_loop(
        _x_tile_ptrs(x_ptr, offs_m, stride_xm, stride_xk, BLOCK_K), m_mask[:, None],
        _w_tile_ptrs(w_ptr, offs_n, stride_wn, stride_wk, BLOCK_K), n_mask[None, :],
        _shrink_tile_ptrs(a_ptr, offs_c, stride_ae, stride_ar, stride_ak, R, BLOCK_K), c_valid[None, :],
        _router_tile_ptrs(rw_ptr, offs_e, stride_rwe, stride_rwk, BLOCK_K), e_valid[:, None],
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),       # x W^T
        tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),       # x S^T
        tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32),       # x v^T
        K, stride_xk, stride_wk, stride_ak, stride_rwk,
        BLOCK_K, True, True, EVEN_K, INPUT_PRECISION, UPCAST_DOT)

    _fused_epilogue(acc, shrink, logits, pid_n, offs_m, m_mask, offs_n, n_mask, offs_c, c_valid, offs_e, e_valid,
                    bias_ptr, b_ptr, rb_ptr, base_ptr, y_ptr, gates_ptr, saved_ptr, scaling,
                    stride_be, stride_bn, stride_br, stride_rb, stride_ym, stride_yn, stride_gm, stride_ge, stride_sm,
                    E, R, HAS_BIAS, HAS_BASE_ROWS, INPUT_PRECISION, UPCAST_DOT)


@triton.jit(do_not_specialize=_ROW_COUNT_ARGS)
def mogu_shrink_router_kernel(
    x_ptr, a_ptr, rw_ptr, rb_ptr, gates_ptr, saved_ptr,
    M, K, M_KEY,
    stride_xm, stride_xk, stride_ae, stride_ar, stride_ak,
    stride_rwe, stride_rwk, stride_rb, stride_gm, stride_ge, stride_sm,
    E: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Split path, step 1: grid (cdiv(M, BLOCK_M),). Writes gates (x dtype) and saved."""
    ER: tl.constexpr = E * R
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_R)
    offs_e = tl.arange(0, BLOCK_E)
    m_mask = offs_m < M
    c_valid = offs_c < ER
    e_valid = offs_e < E

    _, shrink, logits = _k_loop(
        _x_tile_ptrs(x_ptr, offs_m, stride_xm, stride_xk, BLOCK_K), m_mask[:, None],
        None, None,
        _shrink_tile_ptrs(a_ptr, offs_c, stride_ae, stride_ar, stride_ak, R, BLOCK_K), c_valid[None, :],
        _router_tile_ptrs(rw_ptr, offs_e, stride_rwe, stride_rwk, BLOCK_K), e_valid[:, None],
        None,
        tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),
        tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32),
        K, stride_xk, 0, stride_ak, stride_rwk,
        BLOCK_K, False, True, EVEN_K, INPUT_PRECISION, UPCAST_DOT)

    gates = _gates_from_logits(logits, rb_ptr, offs_e, e_valid, stride_rb)
    _store_gates_and_saved(gates, shrink, gates_ptr, saved_ptr, offs_m, m_mask, offs_e, e_valid, offs_c,
                           stride_gm, stride_ge, stride_sm, ER)


@triton.jit(do_not_specialize=_ROW_COUNT_ARGS)
def mogu_gemm_expand_kernel(
    x_ptr, w_ptr, bias_ptr, b_ptr, base_ptr, saved_ptr, y_ptr,
    M, N, K, M_KEY, scaling,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_be, stride_bn, stride_br, stride_sm, stride_ym, stride_yn,
    E: tl.constexpr, R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BASE_ROWS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Split path, step 2: grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), grouped by GROUP_M
    rows of tiles for L2 reuse of W. The epilogue reads z and the gates from ``saved`` and
    expands in chunks of BLOCK_C stacked columns (bounded registers for any E*R)."""
    ER: tl.constexpr = E * R
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    m_mask = offs_m < M
    n_mask = offs_n < N
    e_valid = offs_e < E

    acc, _, _ = _k_loop(
        _x_tile_ptrs(x_ptr, offs_m, stride_xm, stride_xk, BLOCK_K), m_mask[:, None],
        _w_tile_ptrs(w_ptr, offs_n, stride_wn, stride_wk, BLOCK_K), n_mask[None, :],
        None, None, None, None,
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), None, None,
        K, stride_xk, stride_wk, 0, 0,
        BLOCK_K, True, False, EVEN_K, INPUT_PRECISION, UPCAST_DOT)

    saved_rows = saved_ptr + offs_m[:, None] * stride_sm
    gates = tl.load(saved_rows + ER + offs_e[None, :], mask=m_mask[:, None] & e_valid[None, :], other=0.0)
    is_base = _base_row_flags(base_ptr, offs_m, m_mask, HAS_BASE_ROWS)
    _, gate_sum = _mix_and_gate_sum(gates, is_base, e_valid)
    acc = _scale_base(acc, gate_sum, bias_ptr, offs_n, n_mask, HAS_BIAS)

    for c0 in range(0, ER, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_valid = offs_c < ER
        zc_mask = m_mask[:, None] & c_valid[None, :]
        z = tl.load(saved_rows + offs_c[None, :], mask=zc_mask, other=0.0)
        g = tl.load(saved_rows + ER + (offs_c // R)[None, :], mask=zc_mask, other=0.0)   # gate of column c
        if HAS_BASE_ROWS:
            g = tl.where(is_base[:, None], 0.0, g)
        acc = _add_expand(acc, z, g, scaling, b_ptr, offs_c, c_valid, offs_n, n_mask,
                          stride_be, stride_bn, stride_br, R, INPUT_PRECISION, UPCAST_DOT)

    _store_y(acc, y_ptr, offs_m, m_mask, offs_n, n_mask, stride_ym, stride_yn)


@triton.jit
def _k_slice(K, pid_k, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """(start, length) of split-K slice ``pid_k``: slices of KS = cdiv(cdiv(K, SPLIT_K),
    BLOCK_K) * BLOCK_K columns (a multiple of BLOCK_K, so EVEN_K carries over to every
    slice), the last one ragged; length <= 0 for a slice past K (no K loop iterations)."""
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    return k_start, tl.minimum(k_per_split, K - k_start)


@triton.jit(do_not_specialize=_ROW_COUNT_ARGS)
def mogu_splitk_partial_kernel(
    x_ptr, w_ptr, a_ptr, rw_ptr, ws_ptr, ws_small_ptr,
    M, N, K, M_KEY,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_ae, stride_ar, stride_ak, stride_rwe, stride_rwk,
    stride_wsm, stride_wss, stride_wssm, stride_wsss,
    E: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, SPLIT_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Split-K, step 1: grid (cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M)). Program
    (n, s, m) writes ws[rows, s, cols] = x[:, slice s] W[cols, slice s]^T (fp32); the
    pid_n == 0 programs also write ws_small[rows, s, :] = [x S^T | x v^T] over slice s
    (the shrink is computed once per slice, not per N tile). Every workspace element of
    the launch is written (zeros for an empty slice), so the workspace needs no clearing."""
    ER: tl.constexpr = E * R
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start, k_len = _k_slice(K, pid_k, SPLIT_K, BLOCK_K)
    x_ptrs = _x_tile_ptrs(x_ptr + k_start * stride_xk, offs_m, stride_xm, stride_xk, BLOCK_K)
    w_ptrs = _w_tile_ptrs(w_ptr + k_start * stride_wk, offs_n, stride_wn, stride_wk, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if pid_n == 0:
        offs_c = tl.arange(0, BLOCK_R)
        offs_e = tl.arange(0, BLOCK_E)
        c_valid = offs_c < ER
        e_valid = offs_e < E
        acc, shrink, logits = _k_loop(
            x_ptrs, m_mask[:, None], w_ptrs, n_mask[None, :],
            _shrink_tile_ptrs(a_ptr + k_start * stride_ak, offs_c, stride_ae, stride_ar, stride_ak, R, BLOCK_K),
            c_valid[None, :],
            _router_tile_ptrs(rw_ptr + k_start * stride_rwk, offs_e, stride_rwe, stride_rwk, BLOCK_K), e_valid[:, None],
            acc, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32),
            k_len, stride_xk, stride_wk, stride_ak, stride_rwk,
            BLOCK_K, True, True, EVEN_K, INPUT_PRECISION, UPCAST_DOT)
        small_rows = ws_small_ptr + offs_m[:, None] * stride_wssm + pid_k * stride_wsss
        tl.store(small_rows + offs_c[None, :], shrink, mask=m_mask[:, None] & c_valid[None, :])
        tl.store(small_rows + ER + offs_e[None, :], logits, mask=m_mask[:, None] & e_valid[None, :])
    else:
        acc, _, _ = _k_loop(
            x_ptrs, m_mask[:, None], w_ptrs, n_mask[None, :],
            None, None, None, None,
            acc, None, None,
            k_len, stride_xk, stride_wk, 0, 0,
            BLOCK_K, True, False, EVEN_K, INPUT_PRECISION, UPCAST_DOT)
    tl.store(ws_ptr + offs_m[:, None] * stride_wsm + pid_k * stride_wss + offs_n[None, :], acc,
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=_ROW_COUNT_ARGS)
def mogu_splitk_reduce_kernel(
    ws_ptr, ws_small_ptr, bias_ptr, b_ptr, rb_ptr, base_ptr,
    y_ptr, gates_ptr, saved_ptr,
    M, N, M_KEY, scaling,
    stride_wsm, stride_wss, stride_wssm, stride_wsss,
    stride_be, stride_bn, stride_br, stride_rb,
    stride_ym, stride_yn, stride_gm, stride_ge, stride_sm,
    E: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BASE_ROWS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split-K, step 2: grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)). Sums the SPLIT_K
    partials of x W^T (this tile), x S^T and x v^T (these rows) in the fixed order
    s = 0, 1, ..., SPLIT_K - 1, then the fused kernel's epilogue. Every N tile sums the
    same small partials in the same order, so gates and shrink agree bitwise across
    tiles and with ``saved``."""
    ER: tl.constexpr = E * R
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_R)
    offs_e = tl.arange(0, BLOCK_E)
    m_mask = offs_m < M
    n_mask = offs_n < N
    c_valid = offs_c < ER
    e_valid = offs_e < E

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    shrink = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    logits = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    ws_tile = ws_ptr + offs_m[:, None] * stride_wsm + offs_n[None, :]
    small_rows = ws_small_ptr + offs_m[:, None] * stride_wssm
    for s in range(SPLIT_K):      # the documented reduction order: s = 0, 1, ..., SPLIT_K - 1
        acc += tl.load(ws_tile + s * stride_wss, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        shrink += tl.load(small_rows + s * stride_wsss + offs_c[None, :],
                          mask=m_mask[:, None] & c_valid[None, :], other=0.0)
        logits += tl.load(small_rows + s * stride_wsss + ER + offs_e[None, :],
                          mask=m_mask[:, None] & e_valid[None, :], other=0.0)

    _fused_epilogue(acc, shrink, logits, pid_n, offs_m, m_mask, offs_n, n_mask, offs_c, c_valid, offs_e, e_valid,
                    bias_ptr, b_ptr, rb_ptr, base_ptr, y_ptr, gates_ptr, saved_ptr, scaling,
                    stride_be, stride_bn, stride_br, stride_rb, stride_ym, stride_yn, stride_gm, stride_ge, stride_sm,
                    E, R, HAS_BIAS, HAS_BASE_ROWS, INPUT_PRECISION, UPCAST_DOT)
