"""CUDA layer rows for ``benchmarks/throughput.py --device cuda``.

Times, per shape (M rows, d x d layer, rank r; bf16 by default):

* ``base``: cuBLAS ``F.linear`` (the yardstick of every ratio);
* ``published``: the published unfused MoGU layer (two 512-wide router heads, two peft-style
  LoRA branches, the gated mix: ~12 launches), from ``layer_impls.py``;
* ``mogu:<backend>`` for each given ``mogu_linear`` backend;
* with the triton backend, also ``mogu:triton/fused`` and ``mogu:triton/split`` (both
  forward paths forced) for the first rank and M <= 1024, to re-measure
  ``triton_backend.FUSED_MAX_M`` (the M up to which the single-launch kernel is used).

Timing: ``triton.testing.do_bench`` medians; decode rows (M <= 16) through
``do_bench_cudagraph`` so that launch overhead is what a CUDA-graph decoder sees. Every
impl is warmed up (compile + autotune) before timing, and the impls alternate inside each
of ``rounds`` rounds; the reported ms is the median over rounds. Only ratios to ``base``
of the same shape transfer between machines.
"""
from __future__ import annotations

import os
import statistics
import sys
from typing import Callable, Dict, List, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from layer_impls import layer_impls, make_layer_weights  # noqa: E402

CUDA_GRAPH_MAX_M = 16


def _forced_path_impls(w: Dict, paths=("fused", "split")) -> Dict[str, Callable]:
    from mogu_kernels.triton_backend import triton_mogu_linear

    def make(path):
        def forward(x):
            return triton_mogu_linear(x, w["weight"], w["bias"], w["lora_A"], w["lora_B"], w["router_weight"],
                                      w["router_bias"], w["scaling"], None, path=path)[0]
        return forward
    return {f"mogu:triton/{p}": make(p) for p in paths}


def _time_ms(fn: Callable[[], object], cuda_graph: bool, rep_ms: int) -> float:
    import triton.testing

    if cuda_graph:
        bench = lambda: triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5])  # noqa: E731
    else:
        bench = lambda: triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, quantiles=[0.5])  # noqa: E731
    t = bench()                      # quantiles=[0.5] is the median in every triton 3.x
    return float(t[0] if isinstance(t, (list, tuple)) else t)


def run_cuda_layer_rows(
    backends: Sequence[str],
    dtype: torch.dtype = torch.bfloat16,
    d: int = 4096,
    ranks: Sequence[int] = (8, 16, 64),
    Ms: Sequence[int] = (1, 4, 16, 128, 1024, 4096),
    rounds: int = 3,
    rep_ms: int = 40,
    compare_paths: bool = True,
    device: str = "cuda",
) -> List[dict]:
    """Rows ``{"shape": "M=..,K=..,N=..,r=..", "impl", "ms", "ratio_to_base", "M", "r"}``
    for every (r, M); ``ms`` is a median over ``rounds`` interleaved do_bench medians."""
    if not torch.cuda.is_available():
        raise RuntimeError("run_cuda_layer_rows needs a CUDA device")
    rows: List[dict] = []
    with torch.no_grad():
        for r in ranks:
            w = make_layer_weights(d, d, r, dtype, device)
            impls = layer_impls(w, list(backends))
            # Forced-path rows for the first rank only: each extra (path, rank) is more compiles.
            path_impls = _forced_path_impls(w) if compare_paths and "triton" in backends and r == ranks[0] else {}
            for M in Ms:
                x = torch.randn(M, d, device=device, dtype=dtype)
                fns = dict(impls)
                if M <= 1024:
                    fns.update(path_impls)
                for fn in fns.values():          # compile, autotune and allocate outside timing/capture
                    fn(x)
                    fn(x)
                torch.cuda.synchronize()
                use_graph = M <= CUDA_GRAPH_MAX_M
                samples: Dict[str, List[float]] = {name: [] for name in fns}
                for _ in range(rounds):
                    for name, fn in fns.items():
                        samples[name].append(_time_ms(lambda fn=fn, x=x: fn(x), use_graph, rep_ms))
                ms = {name: statistics.median(v) for name, v in samples.items()}
                shape = f"M={M},K={d},N={d},r={r}"
                for name, t in ms.items():
                    rows.append({"shape": shape, "impl": name, "ms": t, "ratio_to_base": t / ms["base"],
                                 "M": M, "r": r, "cuda_graph": use_graph})
                del x
            del w, impls, path_impls
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":   # quick manual run: python benchmarks/cuda_layer_bench.py
    import mogu_kernels

    for row in run_cuda_layer_rows(mogu_kernels.available_backends("cuda"), ranks=(8,), Ms=(1, 16, 4096)):
        print(f"{row['shape']:<28} {row['impl']:<22} {row['ms']:8.4f} ms {row['ratio_to_base']:6.2f}x")
