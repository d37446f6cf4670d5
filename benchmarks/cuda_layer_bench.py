"""CUDA layer rows for ``benchmarks/throughput.py --device cuda``.

Times, per shape (M rows, d x d layer, rank r; bf16 by default):

* ``base``: cuBLAS ``F.linear`` (the yardstick of every ratio);
* ``published``: the published unfused MoGU layer (two 512-wide router heads, two peft-style
  LoRA branches, the gated mix: ~12 launches), from ``layer_impls.py``;
* ``mogu:<backend>`` for each given ``mogu_linear`` backend;
* with the triton backend, also ``mogu:triton/fused`` and ``mogu:triton/split`` (both
  forward paths forced) for the first rank and M <= 1024, to re-measure
  ``triton_backend.FUSED_MAX_M`` (the M up to which the single-launch kernel is used);
  and, for M <= ``triton_backend.SPLITK_MAX_M`` (16), ``mogu:triton/splitk`` (the split-K
  decode path with the heuristic's count, ``triton_backend.split_k_count``) plus one
  ``mogu:triton/splitk=<n>`` row per forced count in ``split_ks``, to re-measure the
  split-K heuristic against the fused kernel at M = 1, 4, 16.

Timing: ``triton.testing.do_bench`` medians; decode rows (M <= 16) through
``do_bench_cudagraph`` so that launch overhead is what a CUDA-graph decoder sees. Every
impl is warmed up (compile + autotune) before timing, and the impls alternate inside each
of ``rounds`` rounds; the reported ms is the median over rounds. Only ratios to ``base``
of the same shape transfer between machines.

Command line (the GPU check's split-K step; ``--check`` also runs on CPU)::

    python benchmarks/cuda_layer_bench.py --Ms 1,4,16 --ranks 8 --split-k 2,4,8 --json out.json
    TRITON_INTERPRET=1 python benchmarks/cuda_layer_bench.py --check --device cpu --d 200 --Ms 1,4,16

``--check`` times nothing: it builds the same impls, runs each once per shape and compares
every ``mogu:*`` row's output with the ``published`` layer (relative error by norm), so the
argument paths and the forced-path wiring can be exercised without a GPU (on CPU the
triton rows run in the Triton interpreter, which must be enabled before import).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from layer_impls import layer_impls, make_layer_weights  # noqa: E402

CUDA_GRAPH_MAX_M = 16
FORCED_PATHS = ("fused", "split", "splitk")     # the triton_mogu_linear paths timed as mogu:triton/<path>


@contextlib.contextmanager
def _split_k_env(n: Optional[int]):
    """MOGU_TRITON_SPLIT_K=n for the duration (None: leave the environment alone)."""
    from mogu_kernels.triton_backend import SPLIT_K_ENV

    if n is None:
        yield
        return
    old = os.environ.get(SPLIT_K_ENV)
    os.environ[SPLIT_K_ENV] = str(n)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(SPLIT_K_ENV, None)
        else:
            os.environ[SPLIT_K_ENV] = old


def _forced_path_impls(w: Dict, paths=("fused", "split"), split_ks: Sequence[int] = ()) -> Dict[str, Callable]:
    """``mogu:triton/<path>`` for each path, plus ``mogu:triton/splitk=<n>`` for each forced
    split count n (the launcher reads the count from MOGU_TRITON_SPLIT_K per call, i.e. at
    capture time under a CUDA graph)."""
    from mogu_kernels.triton_backend import triton_mogu_linear

    def make(path, split_k=None):
        def forward(x):
            with _split_k_env(split_k):
                return triton_mogu_linear(x, w["weight"], w["bias"], w["lora_A"], w["lora_B"], w["router_weight"],
                                          w["router_bias"], w["scaling"], None, path=path)[0]
        return forward
    impls = {f"mogu:triton/{p}": make(p) for p in paths}
    impls.update({f"mogu:triton/splitk={n}": make("splitk", n) for n in split_ks})
    return impls


def _split_k_of(name: str, d: int) -> Optional[int]:
    """The split count a ``mogu:triton/splitk*`` row ran with (None for other rows)."""
    if not name.startswith("mogu:triton/splitk"):
        return None
    if "=" in name:
        return int(name.split("=", 1)[1])
    from mogu_kernels.triton_backend import split_k_count
    with _split_k_env(None):
        return split_k_count(d, d)


def _shape_impls(impls: Dict, path_impls: Dict, M: int) -> Dict[str, Callable]:
    """The impls timed at M rows: every impl, the forced fused/split rows up to M = 1024,
    the split-K rows only up to SPLITK_MAX_M (where "auto" may pick split-K)."""
    from mogu_kernels.triton_backend import SPLITK_MAX_M

    fns = dict(impls)
    if M <= 1024:
        fns.update({k: f for k, f in path_impls.items() if "/splitk" not in k or M <= SPLITK_MAX_M})
    return fns


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
    split_ks: Sequence[int] = (),
    paths: Sequence[str] = FORCED_PATHS,
) -> List[dict]:
    """Rows ``{"shape": "M=..,K=..,N=..,r=..", "impl", "ms", "ratio_to_base", "M", "r",
    "cuda_graph", "split_k"}`` for every (r, M); ``ms`` is a median over ``rounds``
    interleaved do_bench medians; ``split_k`` is the count of a split-K row, else None."""
    if not torch.cuda.is_available():
        raise RuntimeError("run_cuda_layer_rows needs a CUDA device")
    rows: List[dict] = []
    with torch.no_grad():
        for r in ranks:
            w = make_layer_weights(d, d, r, dtype, device)
            impls = layer_impls(w, list(backends))
            path_impls = _path_impls_for(w, backends, compare_paths and r == ranks[0], split_ks, paths)
            for M in Ms:
                x = torch.randn(M, d, device=device, dtype=dtype)
                fns = _shape_impls(impls, path_impls, M)
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
                                 "M": M, "r": r, "cuda_graph": use_graph, "split_k": _split_k_of(name, d)})
                del x
            del w, impls, path_impls
            torch.cuda.empty_cache()
    return rows


def _path_impls_for(w: Dict, backends: Sequence[str], enabled: bool, split_ks: Sequence[int],
                    paths: Sequence[str] = FORCED_PATHS) -> Dict:
    """Forced-path rows (first rank only: each extra (path, rank) is more compiles)."""
    if not enabled or "triton" not in backends:
        return {}
    return _forced_path_impls(w, paths, split_ks)


def check_layer_rows(
    backends: Sequence[str],
    dtype: torch.dtype,
    d: int,
    ranks: Sequence[int],
    Ms: Sequence[int],
    split_ks: Sequence[int] = (),
    device: str = "cuda",
    paths: Sequence[str] = FORCED_PATHS,
) -> List[dict]:
    """No timing: the impls ``run_cuda_layer_rows`` would time, each run once per (r, M),
    every ``mogu:*`` output compared with the ``published`` layer's. Rows ``{"shape", "impl",
    "rel_err", "M", "r", "split_k"}``."""
    rows: List[dict] = []
    with torch.no_grad():
        for r in ranks:
            w = make_layer_weights(d, d, r, dtype, device)
            impls = layer_impls(w, list(backends))
            path_impls = _path_impls_for(w, backends, r == ranks[0], split_ks, paths)
            for M in Ms:
                x = torch.randn(M, d, device=device, dtype=dtype)
                fns = _shape_impls(impls, path_impls, M)
                want = fns["published"](x).double()
                for name, fn in fns.items():
                    if not name.startswith("mogu:"):
                        continue
                    got = fn(x).double()
                    err = float((got - want).norm() / want.norm().clamp_min(1e-300))
                    rows.append({"shape": f"M={M},K={d},N={d},r={r}", "impl": name, "rel_err": err, "M": M,
                                 "r": r, "split_k": _split_k_of(name, d)})
    return rows


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CHECK_TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu only with --check")
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--d", type=int, default=4096, help="layer width: K = N = d (default 4096)")
    p.add_argument("--ranks", type=_int_list, default=[8], metavar="R[,R...]", help="LoRA ranks (default 8)")
    p.add_argument("--Ms", type=_int_list, default=[1, 4, 16], metavar="M[,M...]", help="rows (default 1,4,16)")
    p.add_argument("--split-k", type=_int_list, default=[], metavar="N[,N...]",
                   help="extra mogu:triton/splitk=N rows with the split count forced (M <= 16 only)")
    p.add_argument("--paths", default=",".join(FORCED_PATHS),
                   help=f"forced triton paths to add as mogu:triton/<path> rows (default {','.join(FORCED_PATHS)})")
    p.add_argument("--backends", default=None,
                   help="comma-separated mogu_linear backends (default: every one available on the device)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rep-ms", type=int, default=40)
    p.add_argument("--check", action="store_true", help="no timing: run every impl once and compare outputs")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)

    import mogu_kernels

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device (--check --device cpu runs without one)")
    if args.device == "cpu" and not args.check:
        p.error("--device cpu only with --check (nothing is timed on CPU here)")
    available = mogu_kernels.available_backends(args.device)
    backends = available if args.backends is None else [b for b in args.backends.split(",") if b]
    missing = [b for b in backends if b not in available]
    if missing:
        p.error(f"backend(s) {missing} not available on {args.device} (available: {available}; on CPU the triton "
                "backend needs TRITON_INTERPRET=1 in the environment)")
    if args.split_k and "triton" not in backends:
        p.error("--split-k needs the triton backend")
    paths = [x for x in args.paths.split(",") if x]
    unknown = [x for x in paths if x not in FORCED_PATHS]
    if unknown:
        p.error(f"--paths: unknown {unknown}; choose from {','.join(FORCED_PATHS)}")
    dtype = _DTYPES[args.dtype]
    if args.check:
        rows = check_layer_rows(backends, dtype, args.d, args.ranks, args.Ms, args.split_k, args.device, paths)
        tol = _CHECK_TOL[dtype]
        bad = [row for row in rows if not row["rel_err"] < tol]
        for row in rows:
            print(f"{row['shape']:<28} {row['impl']:<26} rel err vs published {row['rel_err']:.2e}"
                  f"{'' if row['rel_err'] < tol else '  FAIL'}")
        print(f"{len(rows)} outputs checked, {len(bad)} above {tol:g}")
    else:
        rows = run_cuda_layer_rows(backends, dtype=dtype, d=args.d, ranks=args.ranks, Ms=args.Ms,
                                   rounds=args.rounds, rep_ms=args.rep_ms, split_ks=args.split_k, paths=paths)
        bad = []
        for row in rows:
            print(f"{row['shape']:<28} {row['impl']:<26} {row['ms']:8.4f} ms {row['ratio_to_base']:6.2f}x")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "check": args.check, "rows": rows}, f, indent=2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
