"""Compile the Triton kernels for a CUDA target on a machine without a GPU.

    python tests/triton_compile_check.py [--arch 90] [--max-shared 232448]

Runs the real ``triton`` backend launchers on CPU tensors with TRITON_INTERPRET unset and
autotuning off, intercepts each launch (kernel, config, arguments), and compiles it
ahead of time with ``triton.compile`` for ``--arch`` (ttir -> ttgir -> llvm -> ptx ->
cubin with the ptxas that ships with triton), specialized the way Triton's JIT would at
run time (16-byte aligned pointers and ints divisible by 16 marked, ints equal to 1
constant, the row count not specialized). Checks that every launch compiles (the split-K
decode kernels included) and that the config the pruner chose fits in ``--max-shared``
bytes of shared memory (H100/H200: 232448). Prints one line per launch; exit status 1 on
any failure.

Used by tests/test_triton_backend.py (in a subprocess: the kernels must not have been
created by the interpreter) so that CI without a GPU still catches kernels that the
interpreter accepts but the GPU compiler rejects.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ["MOGU_TRITON_AUTOTUNE"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from mogu_kernels import triton_backend as tb  # noqa: E402
from op_spec import make_inputs  # noqa: E402  (tests/ is sys.path[0] when run as a script)

_TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8"}

# (dtype, M, K, N, r, E, bias, base_rows, path): decode (split-K by default at these N, and
# the fused kernel forced), mid (fused) and prefill (split) layers.
CASES = [
    (torch.bfloat16, 1, 4096, 4096, 8, 2, True, True, "auto"),        # split-K, SPLIT_K = 4
    (torch.bfloat16, 1, 4096, 4096, 8, 2, True, True, "fused"),
    (torch.bfloat16, 48, 4096, 4096, 16, 2, False, False, "auto"),
    (torch.bfloat16, 4096, 4096, 4096, 8, 2, True, True, "auto"),
    (torch.float16, 3, 1000, 1000, 64, 2, True, False, "auto"),       # split-K with ragged K (EVEN_K=0)
    (torch.bfloat16, 1, 4096, 4096, 128, 3, True, False, "auto"),     # E*r = 384: the pruner's fallback tiles
    (torch.bfloat16, 1, 4096, 4096, 128, 3, True, False, "fused"),
    (torch.float32, 1, 512, 512, 8, 2, True, True, "auto"),            # exact-fp32 ("ieee") dots
    (torch.float32, 1, 512, 512, 8, 2, True, True, "fused"),
]


def _specialize(fn, args, meta):
    """(signature, constexprs, attrs) as the JIT would build them for these arguments."""
    consts = dict(meta)
    sig, attrs = {}, {}
    positional = [n for n in fn.arg_names if n not in consts]
    assert len(positional) == len(args), (fn.__name__, len(positional), len(args))
    for name, value in zip(positional, args):
        idx = fn.arg_names.index(name)
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _TL_DTYPE[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(idx,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif name in ("M", "M_KEY"):                       # do_not_specialize
            sig[name] = "i32"
        elif value == 1:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if value % 16 == 0:
                attrs[(idx,)] = [["tt.divisibility", 16]]
    for name in consts:
        sig[name] = "constexpr"
    return {n: sig[n] for n in fn.arg_names}, consts, attrs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--max-shared", type=int, default=232448)
    p.add_argument("--cases", default=None, help="comma-separated indices into CASES (default: all)")
    args = p.parse_args(argv)
    assert not tb.INTERPRET
    tb._MAX_SMEM = args.max_shared

    launches = []

    def capture(self, cfg, grid, kargs, meta):
        launches.append((self.fn, cfg, kargs, meta))
    tb._Kernel._run = capture
    tb._check_runnable = lambda x: None          # CPU tensors stand in for CUDA ones: nothing runs

    cases = CASES if args.cases is None else [CASES[int(i)] for i in args.cases.split(",")]
    os.environ.pop(tb.SPLIT_K_ENV, None)         # the shape heuristic decides the split count
    for dtype, M, K, N, r, E, bias, base_rows, path in cases:
        x, w, b, A, B, rw, rb = make_inputs(M, K, N, r, E, bias=bias, dtype=dtype)
        br = torch.zeros(M, dtype=torch.bool) if base_rows else None
        before = len(launches)
        tb.triton_mogu_linear(x, w, b, A, B, rw, rb, 2.0, br, path=path)
        assert len(launches) > before, "no kernel launch intercepted"

    failures = 0
    for fn, cfg, kargs, meta in launches:
        sig, consts, attrs = _specialize(fn, kargs, {**meta, **cfg.kwargs})
        dtype = sig["x_ptr" if "x_ptr" in sig else "b_ptr"][1:]      # the split-K reduce has no x
        extra = "".join(f" {k}={int(meta[k])}" for k in ("SPLIT_K", "EVEN_K") if k in meta)
        label = (f"{fn.__name__:<27} {dtype:<5} E={meta['E']} R={meta['R']:<4} "
                 f"{' '.join(f'{k}={v}' for k, v in cfg.kwargs.items())}{extra} "
                 f"w{cfg.num_warps} s{cfg.num_stages}")
        t0 = time.time()
        try:
            kernel = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                    target=GPUTarget("cuda", args.arch, 32),
                                    options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        except Exception as exc:  # a compile error is exactly what this check is for
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:400]}")
            continue
        shared = kernel.metadata.shared
        ok = shared <= args.max_shared
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {label}  shared={shared}  {time.time() - t0:.1f}s")
    print(f"{len(launches)} launches compiled for sm_{args.arch}, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
