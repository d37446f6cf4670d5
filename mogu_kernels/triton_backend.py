"""The ``triton`` backend of ``mogu_linear``: fused forward kernels, torch.library op, autograd.

Importing this module registers the backend "triton" (:mod:`mogu_kernels.dispatch`). It
raises ImportError when triton is missing, so ``_optional_backends`` simply skips it.

Devices: CUDA always; CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1``
set before this module is imported, which is how CI tests the kernels without a GPU).

Forward path, chosen by the number of rows M = x.numel() / K (and, for split-K, N and K):

* M <= ``SPLITK_MAX_M`` (16) with a small N-grid: split-K decode, two launches (below).
* otherwise M <= ``FUSED_MAX_M`` (64): ``mogu_fused_kernel``, ONE launch. At these sizes the layer is
  bound by streaming W (and launch latency); recomputing the tiny stacked shrink per
  output tile costs (E*r padded)/BLOCK_N extra tensor-core FLOPs that are idle anyway,
  while a second launch would add a dependent kernel (~2-5 us) to a ~10 us layer.
* M > 64: split. ``mogu_shrink_router_kernel`` computes shrink and gates once per row,
  then ``mogu_gemm_expand_kernel`` (a grouped GEMM) applies gate sum, bias and the one
  expand in its epilogue. Here the layer is compute bound and the recomputed shrink of
  the fused kernel would cost real time (e.g. 32/128 = 25% extra FLOPs at r=8, E=2).
The threshold is a first guess from that arithmetic; it is one constant to re-measure on
a GPU (``benchmarks/cuda_layer_bench.py`` times both through ``path=``).

Split-K decode (``path="splitk"``; ``mogu_splitk_partial_kernel`` + ``mogu_splitk_reduce_kernel``,
see the kernels module): at M <= 16 the layer streams W, and the fused kernel's grid is
only cdiv(N, BLOCK_N) programs (64 at N = 4096, BLOCK_N = 64), too few to keep the memory
system of a 108-132 SM GPU busy. ``split_k_count(N, K)`` is the documented heuristic: with
``SPLITK_BLOCK_N`` = 64 (the partial kernel's default tile) the smallest power of two
SPLIT_K such that cdiv(N, 64) * SPLIT_K >= 2 * ``NOMINAL_SMS`` (128: between A100's 108
and H100/H200's 132; a fixed nominal value, so the choice does not depend on the device),
at most ``SPLITK_MAX`` (16) and with K slices of at least ``SPLITK_MIN_K`` (256) columns.
``path="auto"`` takes split-K when M <= ``SPLITK_MAX_M`` (16) and that count is >= 2
(N = K = 4096: SPLIT_K = 4, 256 programs; N-grids already >= 256 programs or K < 512 stay
fused). ``MOGU_TRITON_SPLIT_K`` (read per call) overrides the count for benchmarks: an
integer n in 1..64 is used by every split-K launch, and "auto" then takes split-K for every
M <= 16 iff n >= 2 (so "1", or "0", turns split-K off for "auto"). The cost is a second,
small launch and an fp32 workspace of M * SPLIT_K * (N + E*r + E) values, written once and
read once (at M = 16, N = 4096, SPLIT_K = 4: 1 MiB, vs 32 MiB of bf16 W). Unmeasured: the
constants above are first guesses to re-measure on a GPU (``benchmarks/cuda_layer_bench.py``
times "fused" vs "splitk" at M = 1, 4, 16 and sweeps the count).

Autotuning (not under the interpreter, which gets one fixed small config): separate
config sets for decode (M <= 16) and mid-size (16 < M <= 64) fused launches, for the
split-K decode kernels and for the prefill split kernels, keyed on a bucketed M
(``M_KEY``), N, K, the rank width (and the split count) and the dtypes. The first call
at a new key benchmarks its configs, so warm up before capturing a CUDA graph.
``MOGU_TRITON_AUTOTUNE=0`` (read per call) skips autotuning and uses each list's first
config that fits: one compile per shape class, for correctness tests on a GPU.

Backward (``_backward``) saves per token only x (the op's input, kept anyway by
autograd's graph) and ``saved`` = [x S^T (E*r values) | gates (E values)] in fp32,
i.e. 4*(E*r + E) bytes per token (72 bytes for MoGU with r=8), never the M x N base
output: ``dy . (x W^T + b) = (dy W) . x + dy . b`` and ``dy W`` is needed for dx anyway.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import os
from typing import Dict, Optional, Tuple

import torch

try:
    import triton
    import triton.language  # noqa: F401  (the kernels module needs it; fail here, not there)
    from triton.runtime.errors import OutOfResources
except ImportError as exc:  # the backend simply is not registered
    raise ImportError(f"mogu_kernels.triton_backend needs triton: {exc}") from exc

from .dispatch import Backend, register_backend
from .reference import reference_mogu_linear
from .triton_kernels import (EVEN_K_HEURISTIC, mogu_fused_kernel, mogu_gemm_expand_kernel,
                             mogu_shrink_router_kernel, mogu_splitk_partial_kernel, mogu_splitk_reduce_kernel)
from .validation import accumulation_dtype

# Whether the kernels above were created by the interpreter (@triton.jit decides at
# decoration time, i.e. when this module was first imported).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

FUSED_MAX_M = 64          # rows up to which the single-launch fused kernel runs (see module doc)
PATHS = ("auto", "fused", "split", "splitk")

# Split-K decode heuristic (module doc; ``split_k_count``).
SPLITK_MAX_M = 16         # "auto" considers split-K only up to this many rows
NOMINAL_SMS = 128         # nominal SM count: aim for >= 2 * NOMINAL_SMS programs
SPLITK_BLOCK_N = 64       # the N tile the heuristic assumes (first SPLITK_PARTIAL_CONFIGS entry)
SPLITK_MIN_K = 256        # smallest K slice worth a program
SPLITK_MAX = 16           # largest heuristic split count
SPLIT_K_ENV = "MOGU_TRITON_SPLIT_K"   # override of the count ("auto" or 0..64), read per call
_SPLIT_K_ENV_MAX = 64

# Kernel launches by kernel name, counted by the launchers: lets tests prove the Triton
# kernels ran (a silent fallback to another backend would leave it unchanged).
LAUNCHES: collections.Counter = collections.Counter()

AUTOTUNE_ENV = "MOGU_TRITON_AUTOTUNE"   # "0": skip autotuning, use each config list's first fit


# --------------------------------------------------------------------------- configs
def _cfg(num_warps: int, num_stages: int, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# Each list is ordered with the untuned default first (used when autotuning is off).
# Decode (M <= 16): memory bound on W; many narrow N tiles keep every SM streaming.
FUSED_DECODE_CONFIGS = [
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128),
    _cfg(4, 3, BLOCK_M=16, BLOCK_N=16, BLOCK_K=256),
    _cfg(4, 3, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128),
    _cfg(4, 5, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64),
]
# Mid (16 < M <= 64), still fused.
FUSED_MID_CONFIGS = [
    _cfg(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128),
    _cfg(4, 4, BLOCK_M=32, BLOCK_N=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
]
# Split path, step 1: x read once, S tile resident; small M tiles for parallelism.
SHRINK_CONFIGS = [
    _cfg(4, 3, BLOCK_M=32, BLOCK_K=128),
    _cfg(4, 3, BLOCK_M=16, BLOCK_K=256),
    _cfg(4, 3, BLOCK_M=64, BLOCK_K=64),
]
# Split path, step 2 (mid and prefill, M > 64): standard Hopper/Ampere GEMM tiles.
GEMM_CONFIGS = [
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
]

# Split-K decode, step 1: W streamed in (BLOCK_N x K/SPLIT_K) slabs. BLOCK_N stays 64 in
# the regular configs because the split count was chosen for cdiv(N, 64) tiles; only the
# K blocking and pipelining are tuned.
SPLITK_PARTIAL_CONFIGS = [
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128),
    _cfg(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256),
    _cfg(4, 5, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64),
    _cfg(8, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128),
]
# Split-K decode, step 2: reads M * SPLIT_K * N fp32 partials, one expand per tile.
SPLITK_REDUCE_CONFIGS = [
    _cfg(4, 2, BLOCK_M=16, BLOCK_N=64),
    _cfg(4, 2, BLOCK_M=16, BLOCK_N=128),
    _cfg(4, 2, BLOCK_M=16, BLOCK_N=32),
]

# One fixed config per kernel under the interpreter: autotune is fragile there, num_warps
# and num_stages are ignored, and bigger tiles only cost numpy time per program.
_INTERPRET_CONFIGS = {
    "fused": _cfg(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
    "shrink": _cfg(4, 1, BLOCK_M=32, BLOCK_K=32),
    "gemm": _cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4),
    "splitk_partial": _cfg(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
    "splitk_reduce": _cfg(4, 1, BLOCK_M=16, BLOCK_N=32),
}

_MAX_SMEM: Optional[int] = None


def _max_shared_memory() -> int:
    """Bytes of shared memory a block may use on the current device (conservative fallback)."""
    global _MAX_SMEM
    if _MAX_SMEM is None:
        try:
            props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
            _MAX_SMEM = int(props["max_shared_mem"])
        except Exception:  # unknown driver API: assume an A100-class budget
            _MAX_SMEM = 160 * 1024
    return _MAX_SMEM


def _make_pruner(tile_rows, holds_shrink: bool, fallbacks):
    """An early_config_prune: drop configs whose pipelined tiles overflow shared memory or,
    for kernels holding the fp32 shrink accumulator (BLOCK_M x BLOCK_R) across the K loop,
    whose accumulator would spill registers. Order is preserved; when nothing fits (large
    E*r, fp32) the first fitting small ``fallbacks`` config (else the smallest) is used.

    tile_rows(meta, block_r) -> rows of the K-slices staged per pipeline stage. The
    estimate stages * BLOCK_K * rows * itemsize is ~1.3x the shared memory that Triton 3.9
    allocates for these kernels on sm_90 (checked by compiling them offline). A kernel
    without a K loop (the split-K reduce) has no BLOCK_K: tile_rows then gives the elements
    of its staged operands directly. The itemsize is that of the first tensor argument
    (x, or the fp32 workspace for the reduce: an over-estimate for 16-bit B tiles)."""
    def prune(configs, named_args, **kwargs):
        elsize = next(iter(named_args.values())).element_size()     # the first argument (x_ptr / ws_ptr)
        block_r = kwargs.get("BLOCK_R", 16)
        limit = _max_shared_memory()

        def smem(c):
            return c.num_stages * c.kwargs.get("BLOCK_K", 1) * tile_rows(c.kwargs, block_r) * elsize

        def fits(c):
            regs_ok = not holds_shrink or c.kwargs["BLOCK_M"] * block_r <= 16384
            return regs_ok and smem(c) <= limit
        kept = [c for c in configs if fits(c)] or [c for c in fallbacks if fits(c)][:1]
        return kept or [min(fallbacks, key=smem)]
    return prune


class _Kernel:
    """One kernel with its launch policy: the fixed interpreter config; autotuning over
    ``configs`` keyed on ``key`` (plus the tensor dtypes, which Triton adds); or, with
    MOGU_TRITON_AUTOTUNE=0, the first config that survives pruning. If the chosen config
    still runs out of shared memory, the smallest fallback config is used from then on
    for that specialization.

    The kernels' derived meta-parameters (``heuristics``, by default ``EVEN_K_HEURISTIC``:
    EVEN_K from K and the config's BLOCK_K; none for the split-K reduce, which has no K
    loop) are added by a ``triton.heuristics`` wrapper under the autotuner, and by
    ``_meta`` wherever this class picks the config itself; ``_run`` gets the full meta."""

    def __init__(self, name, fn, configs, fallbacks, key, tile_rows, holds_shrink, heuristics=EVEN_K_HEURISTIC):
        self.name = name
        self.fn = fn
        self.configs = configs
        self.fallbacks = fallbacks
        self.heuristics = heuristics
        self.prune = _make_pruner(tile_rows, holds_shrink, fallbacks)
        self._too_big: set = set()      # specializations where the pruned choice ran out of resources
        self._positions = {n: i for i, n in enumerate(fn.arg_names)}
        # The kernels only write fresh outputs (the split-K partials included: every
        # workspace element is written before it is read), so benchmarking needs no
        # reset/restore.
        tuned = triton.heuristics(heuristics)(fn) if heuristics else fn
        self.tuned = triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": self.prune})(tuned)

    def _meta(self, cfg, args, meta):
        """meta plus the heuristic meta-parameters for config ``cfg``."""
        named = {**{n: args[i] for n, i in self._positions.items() if i < len(args)}, **meta, **cfg.kwargs}
        return {**meta, **{name: rule(named) for name, rule in self.heuristics.items()}}

    def _run(self, cfg, grid, args, meta):
        self.fn[grid(cfg.kwargs)](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def _run_config(self, cfg, grid, args, meta):
        self._run(cfg, grid, args, self._meta(cfg, args, meta))

    def launch(self, grid, args, meta):
        """grid: meta-dict -> grid tuple; args: positional kernel args (x_ptr first)."""
        LAUNCHES[self.fn.__name__] += 1
        if INTERPRET:
            return self._run_config(_INTERPRET_CONFIGS[self.name], grid, args, meta)
        spec = (tuple(a.dtype for a in args if isinstance(a, torch.Tensor)), tuple(sorted(meta.items())))
        if spec in self._too_big:
            return self._run_config(self.fallbacks[-1], grid, args, meta)
        try:
            if os.environ.get(AUTOTUNE_ENV, "1") != "0":
                self.tuned[grid](*args, **meta)
            else:
                self._run_config(self.prune(self.configs, {"x_ptr": args[0]}, **meta)[0], grid, args, meta)
        except OutOfResources:
            self._too_big.add(spec)
            self._run_config(self.fallbacks[-1], grid, args, meta)


# Small-tile fallbacks (largest first) for specializations whose tiles overflow shared
# memory in every regular config, e.g. fp32 with E*r = 384.
_FUSED_FALLBACKS = [_cfg(4, 2, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32), _cfg(4, 1, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)]
_fused_decode = _Kernel("fused", mogu_fused_kernel, FUSED_DECODE_CONFIGS, _FUSED_FALLBACKS,
                        ["M_KEY", "N", "K", "BLOCK_R"], lambda m, r: m["BLOCK_M"] + m["BLOCK_N"] + r, True)
_fused_mid = _Kernel("fused", mogu_fused_kernel, FUSED_MID_CONFIGS, _FUSED_FALLBACKS,
                     ["M_KEY", "N", "K", "BLOCK_R"], lambda m, r: m["BLOCK_M"] + m["BLOCK_N"] + r, True)
_shrink = _Kernel("shrink", mogu_shrink_router_kernel, SHRINK_CONFIGS,
                  [_cfg(4, 2, BLOCK_M=16, BLOCK_K=64), _cfg(4, 1, BLOCK_M=16, BLOCK_K=16)],
                  ["M_KEY", "K", "BLOCK_R"], lambda m, r: m["BLOCK_M"] + r, True)
_gemm = _Kernel("gemm", mogu_gemm_expand_kernel, GEMM_CONFIGS,
                [_cfg(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
                 _cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=8)],
                ["M_KEY", "N", "K", "E", "R"], lambda m, r: m["BLOCK_M"] + m["BLOCK_N"], False)
# Split-K: the pid_n == 0 partial programs hold the shrink accumulator like the fused kernel.
_splitk_partial = _Kernel("splitk_partial", mogu_splitk_partial_kernel, SPLITK_PARTIAL_CONFIGS, _FUSED_FALLBACKS,
                          ["M_KEY", "N", "K", "BLOCK_R", "SPLIT_K"], lambda m, r: m["BLOCK_M"] + m["BLOCK_N"] + r,
                          True)
_splitk_reduce = _Kernel("splitk_reduce", mogu_splitk_reduce_kernel, SPLITK_REDUCE_CONFIGS,
                         [_cfg(4, 1, BLOCK_M=16, BLOCK_N=32), _cfg(4, 1, BLOCK_M=16, BLOCK_N=16)],
                         ["M_KEY", "N", "BLOCK_R", "SPLIT_K"], lambda m, r: (m["BLOCK_M"] + m["BLOCK_N"]) * r, True,
                         heuristics={})


# --------------------------------------------------------------------------- launchers
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: exact fp32 ("ieee") unless torch allows TF32 for fp32 matmuls;
    for 16-bit operands "tf32" is Triton's default and has no effect."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _common_meta(x: torch.Tensor, E: int, r: int) -> Dict:
    return dict(
        E=E, R=r, BLOCK_E=max(2, _next_pow2(E)),
        INPUT_PRECISION=_input_precision(x.dtype),
        # The interpreter's bf16 tl.dot multiplies raw bits: upcast the operands there only.
        UPCAST_DOT=INTERPRET and x.dtype == torch.bfloat16,
    )


def _launch_fused(x2, weight, bias, lora_A, lora_B, rw, rb, base_u8, y, gates, saved, scaling):
    M, K = x2.shape
    N = weight.shape[0]
    E, r, _ = lora_A.shape
    args = (
        x2, weight, bias if bias is not None else x2, lora_A, lora_B, rw, rb,
        base_u8 if base_u8 is not None else x2, y, gates, saved,
        M, N, K, max(16, _next_pow2(M)), scaling,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
        lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
        rw.stride(0), rw.stride(1), rb.stride(0),
        y.stride(0), y.stride(1), gates.stride(0), gates.stride(1), saved.stride(0),
    )
    meta = dict(_common_meta(x2, E, r), BLOCK_R=max(16, _next_pow2(E * r)), HAS_BIAS=bias is not None,
                HAS_BASE_ROWS=base_u8 is not None)
    kernel = _fused_decode if M <= 16 else _fused_mid
    kernel.launch(lambda META: (triton.cdiv(N, META["BLOCK_N"]), triton.cdiv(M, META["BLOCK_M"])), args, meta)


def _launch_split(x2, weight, bias, lora_A, lora_B, rw, rb, base_u8, y, gates, saved, scaling):
    M, K = x2.shape
    N = weight.shape[0]
    E, r, _ = lora_A.shape
    m_key = _next_pow2(M)
    common = _common_meta(x2, E, r)
    shrink_args = (
        x2, lora_A, rw, rb, gates, saved, M, K, m_key,
        x2.stride(0), x2.stride(1), lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
        rw.stride(0), rw.stride(1), rb.stride(0), gates.stride(0), gates.stride(1), saved.stride(0),
    )
    _shrink.launch(lambda META: (triton.cdiv(M, META["BLOCK_M"]),), shrink_args,
                   dict(common, BLOCK_R=max(16, _next_pow2(E * r))))
    gemm_args = (
        x2, weight, bias if bias is not None else x2, lora_B, base_u8 if base_u8 is not None else x2, saved, y,
        M, N, K, m_key, scaling,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        lora_B.stride(0), lora_B.stride(1), lora_B.stride(2), saved.stride(0), y.stride(0), y.stride(1),
    )
    # Expand in chunks of at most 32 stacked columns: bounded registers next to a big acc tile.
    gemm_meta = dict(common, BLOCK_C=min(32, max(16, _next_pow2(E * r))), HAS_BIAS=bias is not None,
                     HAS_BASE_ROWS=base_u8 is not None)
    _gemm.launch(lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),),
                 gemm_args, gemm_meta)


def _launch_splitk(x2, weight, bias, lora_A, lora_B, rw, rb, base_u8, y, gates, saved, scaling, split_k):
    M, K = x2.shape
    N = weight.shape[0]
    E, r, _ = lora_A.shape
    ER = E * r
    # fp32 partials, M first (strides independent of M). torch.empty: every element is
    # written by the partial kernel before the reduce reads it.
    ws = torch.empty((M, split_k, N), dtype=torch.float32, device=x2.device)
    ws_small = torch.empty((M, split_k, ER + E), dtype=torch.float32, device=x2.device)
    m_key = max(16, _next_pow2(M))
    common = dict(_common_meta(x2, E, r), BLOCK_R=max(16, _next_pow2(ER)), SPLIT_K=split_k)
    partial_args = (
        x2, weight, lora_A, rw, ws, ws_small,
        M, N, K, m_key,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        lora_A.stride(0), lora_A.stride(1), lora_A.stride(2), rw.stride(0), rw.stride(1),
        ws.stride(0), ws.stride(1), ws_small.stride(0), ws_small.stride(1),
    )
    _splitk_partial.launch(lambda META: (triton.cdiv(N, META["BLOCK_N"]), split_k, triton.cdiv(M, META["BLOCK_M"])),
                           partial_args, common)
    reduce_args = (
        ws, ws_small, bias if bias is not None else ws, lora_B, rb, base_u8 if base_u8 is not None else ws,
        y, gates, saved,
        M, N, m_key, scaling,
        ws.stride(0), ws.stride(1), ws_small.stride(0), ws_small.stride(1),
        lora_B.stride(0), lora_B.stride(1), lora_B.stride(2), rb.stride(0),
        y.stride(0), y.stride(1), gates.stride(0), gates.stride(1), saved.stride(0),
    )
    _splitk_reduce.launch(lambda META: (triton.cdiv(N, META["BLOCK_N"]), triton.cdiv(M, META["BLOCK_M"])),
                          reduce_args, dict(common, HAS_BIAS=bias is not None, HAS_BASE_ROWS=base_u8 is not None))


def _split_k_env() -> Optional[int]:
    """The ``MOGU_TRITON_SPLIT_K`` override: None for unset/empty/"auto", else the count
    (0 and 1 both mean one slice, i.e. split-K off for path="auto")."""
    text = os.environ.get(SPLIT_K_ENV, "").strip().lower()
    if text in ("", "auto"):
        return None
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= _SPLIT_K_ENV_MAX:
        raise ValueError(f"{SPLIT_K_ENV} must be 'auto' or an integer in 0..{_SPLIT_K_ENV_MAX}, got {text!r}")
    return max(n, 1)


def split_k_count(N: int, K: int) -> int:
    """How many K slices a split-K launch uses for an N x K layer (module doc): the
    ``MOGU_TRITON_SPLIT_K`` override if set, else the smallest power of two SPLIT_K with
    cdiv(N, SPLITK_BLOCK_N) * SPLIT_K >= 2 * NOMINAL_SMS, capped at SPLITK_MAX and at K
    slices of SPLITK_MIN_K columns (1: split-K would not help)."""
    forced = _split_k_env()
    if forced is not None:
        return forced
    n_tiles = triton.cdiv(N, SPLITK_BLOCK_N)
    split = 1
    while n_tiles * split < 2 * NOMINAL_SMS and split * 2 <= SPLITK_MAX and K >= split * 2 * SPLITK_MIN_K:
        split *= 2
    return split


def _choose_path(M: int, N: int, K: int, path: str) -> Tuple[str, int]:
    """(path, split count): "auto" -> "splitk" (M <= SPLITK_MAX_M and split_k_count(N, K)
    >= 2), else "fused" (M <= FUSED_MAX_M), else "split"; a named path is kept. The split
    count (1 unless the path is "splitk") is computed at most once per call."""
    if path not in PATHS:
        raise ValueError(f"mogu_linear[triton]: path must be one of {PATHS}, got {path!r}")
    if path == "auto":
        if M <= SPLITK_MAX_M:
            split = split_k_count(N, K)
            if split >= 2:
                return "splitk", split
        return ("fused" if M <= FUSED_MAX_M else "split"), 1
    return path, (split_k_count(N, K) if path == "splitk" else 1)


def _check_runnable(x: torch.Tensor) -> None:
    if not x.is_cuda and not INTERPRET:
        raise RuntimeError("mogu_linear[triton]: CPU tensors need TRITON_INTERPRET=1 set before mogu_kernels "
                           "is imported (the Triton interpreter); use backend='reference' or 'cpp' on CPU")


def _forward_impl(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows, path):
    """Allocate outputs and launch; see ``triton_linear`` for the contract."""
    K = x.shape[-1]
    lead = x.shape[:-1]
    N = weight.shape[0]
    E, r, _ = lora_A.shape
    y = x.new_empty((*lead, N))
    gates = x.new_empty((*lead, E))
    saved = x.new_empty((*lead, E * r + E), dtype=accumulation_dtype(x.dtype))   # fp32: no fp64 reaches here
    x2 = x.reshape(-1, K)                 # a view whenever the leading dims allow (any K stride)
    M = x2.shape[0]
    if M == 0:
        return y, gates, saved
    _check_runnable(x)
    base_u8 = None if base_rows is None else base_rows.reshape(-1).view(torch.uint8)
    chosen, split = _choose_path(M, N, K, path)
    if chosen == "splitk":
        launch = functools.partial(_launch_splitk, split_k=split)
    else:
        launch = _launch_fused if chosen == "fused" else _launch_split
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        launch(x2, weight, bias, lora_A, lora_B, router_weight, router_bias, base_u8,
               y.view(M, N), gates.view(M, E), saved.view(M, E * r + E), float(scaling))
    return y, gates, saved


# --------------------------------------------------------------------------- torch.library op
@torch.library.custom_op("mogu::triton_linear", mutates_args=())
def triton_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor,
    scaling: float,
    base_rows: Optional[torch.Tensor],
    path: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mogu::triton_linear``: the Triton forward of ``mogu_linear`` (arguments validated by the caller).

    Shapes as in :func:`mogu_kernels.mogu_linear`; ``path`` is "auto" | "fused" | "split" | "splitk".
    Returns (y (..., N) x.dtype, gates (..., E) x.dtype, saved (..., E*r + E) fp32), where
    ``saved`` = [x A_0^T, ..., x A_{E-1}^T (unscaled shrink) | fp32 gates] is what backward
    needs per token (not differentiable).
    """
    return _forward_impl(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows, path)


@triton_linear.register_fake
def _triton_linear_fake(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows, path):
    lead = x.shape[:-1]
    E, r, _ = lora_A.shape
    return (x.new_empty((*lead, weight.shape[0])), x.new_empty((*lead, E)),
            x.new_empty((*lead, E * r + E), dtype=accumulation_dtype(x.dtype)))


def _setup_context(ctx, inputs, output):
    """Saves x, the parameters (weight, bias, lora_A, lora_B, router_weight: not per token),
    base_rows and ``saved``. Per token that is x (K values, x's dtype) plus E*r + E fp32
    values (the unscaled shrink and the gates); the (M, N) output is not kept."""
    x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows, _path = inputs
    _, _, saved = output
    ctx.mark_non_differentiable(saved)
    ctx.save_for_backward(x, weight, bias, lora_A, lora_B, router_weight, base_rows, saved)
    ctx.scaling = scaling
    ctx.router_bias_dtype = router_bias.dtype


def _backward(ctx, grad_y, grad_gates, _grad_saved):
    """Gradients for x, lora_A, lora_B, router_weight, router_bias; weight and bias are
    frozen base parameters (None). Plain torch matmuls (cuBLAS) in x's dtype for the big
    products, fp32 for everything gate-shaped; no host syncs, no data-dependent shapes.

    With dy (M, N), z = saved[:, :E*r], g = saved[:, E*r:], mix = g (0 on base rows)::

        dyW     = dy W                                  (M, K)   needed for dx anyway
        dm_e    = (dyW . x + dy . b) + s (dy B_e) . z_e   (M, E)   = d y / d mix_e, no base output
        dlogit  = (grad_gates + dm [0 on base rows]) * g (1 - g)
        dz_e    = s mix_e (dy B_e)                      (M, r)
        dx      = gate_sum dyW + dz S + dlogit v;   dA_e = dz_e^T x;   dB_e = dy^T (s mix_e z_e)
        dv      = dlogit^T x;   dc = sum_rows dlogit
    """
    x, weight, bias, lora_A, lora_B, router_weight, base_rows, saved = ctx.saved_tensors
    need_x, _, _, need_A, need_B, need_rw, need_rb = ctx.needs_input_grad[:7]
    s = ctx.scaling
    E, r, K = lora_A.shape
    N = weight.shape[0]
    ER = E * r
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    dy = grad_y.reshape(M, N)
    sv = saved.reshape(M, ER + E)
    z = sv[:, :ER].reshape(M, E, r)
    g = sv[:, ER:]
    if base_rows is not None:
        keep = (~base_rows.reshape(M, 1)).to(torch.float32)       # 0 on base rows
        mix = g * keep
        gate_sum = mix.sum(-1, keepdim=True) + (1.0 - keep)
    else:
        keep = None
        mix = g
        gate_sum = g.sum(-1, keepdim=True)

    dyW = (dy @ weight).float()                                    # (M, K)
    dyB = (dy @ lora_B.permute(1, 0, 2).reshape(N, ER)).float().reshape(M, E, r)
    xf = x2.float()
    dy_dot_base = (dyW * xf).sum(-1)                               # dy . (x W^T), without x W^T
    if bias is not None:
        dy_dot_base = dy_dot_base + torch.mv(dy, bias).float()
    dmix = dy_dot_base.unsqueeze(-1) + s * (dyB * z).sum(-1)       # (M, E)
    if keep is not None:
        dmix = dmix * keep                                         # base rows: mix is the constant 0
    dgates = dmix if grad_gates is None else dmix + grad_gates.reshape(M, E).float()
    dlogit = dgates * g * (1.0 - g)

    dx = dA = dB = drw = drb = None
    if need_rw:
        drw = (dlogit.t() @ xf).to(router_weight.dtype)
    if need_rb:
        drb = dlogit.sum(0).to(ctx.router_bias_dtype)
    if need_x or need_A:
        dz = (s * mix.unsqueeze(-1) * dyB).reshape(M, ER)            # fp32
        if need_A:
            dA = (dz.to(x.dtype).t() @ x2).reshape(E, r, K)
        if need_x:
            dxf = gate_sum * dyW + dz @ lora_A.reshape(ER, K).float() + dlogit @ router_weight.float()
            dx = dxf.to(x.dtype).reshape(x.shape)
    if need_B:
        scaled = (s * mix.unsqueeze(-1) * z).reshape(M, ER).to(x.dtype)
        dB = (dy.t() @ scaled).reshape(N, E, r).permute(1, 0, 2).contiguous()
    return dx, None, None, dA, dB, drw, drb, None, None, None


triton_linear.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- the backend
def triton_mogu_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor,
    scaling: float,
    base_rows: Optional[torch.Tensor] = None,
    *,
    path: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``mogu_linear`` on the Triton kernels; arguments and result as in
    :func:`mogu_kernels.mogu_linear` (validated there). fp32/fp16/bf16 run the kernels;
    fp64 (no fp64 tensor-core dot) runs the reference implementation. ``path`` forces
    the "fused", "split" or "splitk" forward (tests, benchmarks; "splitk" uses
    ``split_k_count(N, K)`` slices); "auto" picks by M, N and K (module doc)."""
    if x.dtype == torch.float64:
        return reference_mogu_linear(x, weight, bias, lora_A, lora_B, router_weight, router_bias, scaling, base_rows)
    y, gates, _ = torch.ops.mogu.triton_linear(x, weight, bias, lora_A, lora_B, router_weight, router_bias,
                                               float(scaling), base_rows, path)
    return y, gates


def _supports_device(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    # CPU tensors only through the interpreter, and only if the kernels were built by it.
    return device.type == "cpu" and INTERPRET and os.environ.get("TRITON_INTERPRET") == "1"


register_backend(Backend(name="triton", fn=triton_mogu_linear, supports_device=_supports_device))

__all__ = ["triton_mogu_linear", "triton_linear", "split_k_count", "LAUNCHES", "FUSED_MAX_M", "SPLITK_MAX_M",
           "SPLIT_K_ENV", "INTERPRET"]
