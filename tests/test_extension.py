"""The C++/CUDA extension ``mogu_kernels._C``: backends ``cpp`` (CPU) and ``cuda``.

Every result is checked against ``op_spec.spec_mogu_linear``, the float64 statement of the
op shared by every backend's tests and written independently of mogu_kernels (one expert
at a time, as docs/design.md section 2 states the formula), on fresh random inputs. Tests
that need the built extension skip when it is not loadable, except
``test_extension_is_built``, which fails then (unless the build was switched off with
MOGU_BUILD_EXT=0), so a broken build cannot pass silently.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import mogu_kernels
from mogu_kernels import dispatch, extension
from op_spec import make_inputs, random_base_rows, rel_err, spec_mogu_linear

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

needs_ext = pytest.mark.skipif(extension.LOAD_ERROR is not None,
                               reason=f"C++ extension not loadable: {extension.LOAD_ERROR}")

# Relative error (by norm) allowed against float64, per input dtype.
FWD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float64: 1e-12}
BWD_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}
# On CUDA fp32 allows for cuBLAS's reduction order (and TF32, should a caller enable it).
CUDA_TOL = {**FWD_TOL, torch.float32: 1e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ----------------------------------------------------------------------------- helpers
def make_args(M, K, N, r, E, bias=True, layout="2d", dtype=torch.float32, seed=0, device="cpu"):
    """op_spec.make_inputs with this file's argument order."""
    return make_inputs(M, K, N, r, E, bias=bias, dtype=dtype, layout=layout, seed=seed, device=device)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


# ----------------------------------------------------------------------------- build and loading
def test_extension_is_built():
    if os.environ.get("MOGU_BUILD_EXT") == "0":
        pytest.skip("extension build switched off (MOGU_BUILD_EXT=0)")
    assert extension.LOAD_ERROR is None, extension.LOAD_ERROR
    assert "cpp" in mogu_kernels.available_backends("cpu")
    assert dispatch.resolve_backend("cpu").name == "cpp"          # the default on CPU tensors
    assert hasattr(torch.ops.mogu_C, "mogu_linear") and hasattr(torch.ops.mogu_C, "mogu_linear_backward")


def test_both_backends_always_registered():
    """cpp and cuda are registered even when one cannot run: asking for cuda with CPU
    tensors raises (not "unknown backend") and the CPU default is never cuda."""
    registered = dispatch.registered_backends()
    assert {"cpp", "cuda"} <= set(registered)
    args = make_args(3, 16, 12, 4, 2, seed=3)
    with pytest.raises(RuntimeError, match="cuda"):
        mogu_kernels.mogu_linear(*args, 1.0, backend="cuda")
    assert "cuda" not in mogu_kernels.available_backends("cpu")
    assert dispatch.resolve_backend("cpu").name != "cuda"
    if extension.LOAD_ERROR is None and not extension._C.WITH_CUDA:
        assert "without its CUDA sources" in registered["cuda"].unavailable_reason()
        assert "without its CUDA sources" in mogu_kernels.unavailable_backends()["cuda"]


def test_fallback_when_extension_is_unavailable(monkeypatch):
    """Extension unusable: backend=None on CPU runs the reference and warns exactly once;
    backend="cpp" raises with the reason."""
    monkeypatch.setattr(extension, "LOAD_ERROR", "extension mogu_kernels._C not built: simulated")
    monkeypatch.setattr(dispatch, "_WARNED", set())
    monkeypatch.delenv("MOGU_BACKEND", raising=False)
    args = make_args(5, 24, 20, 4, 2, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1, g1 = mogu_kernels.mogu_linear(*args, 2.0)
        y2, _ = mogu_kernels.mogu_linear(*args, 2.0)
    ours = [w for w in caught if "backend 'cpp' is unavailable" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert "simulated" in str(ours[0].message)
    y_ref, g_ref = spec_mogu_linear(*args, 2.0)
    assert rel_err(y1, y_ref) < FWD_TOL[torch.float32] and rel_err(g1, g_ref) < FWD_TOL[torch.float32]
    assert torch.equal(y1, y2)
    assert "cpp" not in mogu_kernels.available_backends("cpu")
    with pytest.raises(RuntimeError, match="simulated"):
        mogu_kernels.mogu_linear(*args, 2.0, backend="cpp")


def test_package_imports_and_falls_back_without_the_shared_library():
    """A real failed load (the module import itself fails) in a fresh interpreter."""
    script = (
        "import sys, warnings\n"
        "sys.modules['mogu_kernels._C'] = None  # makes `from . import _C` raise ImportError\n"
        "import torch, mogu_kernels\n"
        "from mogu_kernels import extension\n"
        "assert extension.LOAD_ERROR and 'not built' in extension.LOAD_ERROR, extension.LOAD_ERROR\n"
        "assert 'cpp' not in mogu_kernels.available_backends('cpu')\n"
        "x, w, A, B, rw, rb = torch.randn(3, 8), torch.randn(6, 8), torch.randn(2, 2, 8),"
        " torch.randn(2, 6, 2), torch.randn(2, 8), torch.randn(2)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3):\n"
        "        y, g = mogu_kernels.mogu_linear(x, w, None, A, B, rw, rb, 2.0)\n"
        "assert sum(\"backend 'cpp' is unavailable\" in str(c.message) for c in caught) == 1\n"
        "assert y.shape == (3, 6) and g.shape == (3, 2)\n"
        "print('fallback ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MOGU_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0 and "fallback ok" in proc.stdout, proc.stdout + proc.stderr


@needs_ext
def test_backend_cpp_really_runs_the_extension(monkeypatch):
    """backend="cpp" (and the CPU default) go through torch.ops.mogu_C, never the reference."""
    def refuse(*args, **kwargs):
        raise AssertionError("the reference backend ran")
    monkeypatch.setitem(dispatch._REGISTRY, "reference", dispatch.Backend("reference", refuse, lambda d: True))
    monkeypatch.delenv("MOGU_BACKEND", raising=False)
    args = make_args(7, 40, 36, 8, 2, seed=2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y, gates = mogu_kernels.mogu_linear(*args, 2.0, backend="cpp")
        mogu_kernels.mogu_linear(*args, 2.0)                       # default on CPU tensors
    names = [e.name for e in prof.events()]
    assert names.count("mogu_C::mogu_linear") >= 2, sorted(set(names))
    assert "aten::sigmoid" not in names                            # the reference's gate op
    y_ref, g_ref = spec_mogu_linear(*args, 2.0)
    assert rel_err(y, y_ref) < FWD_TOL[torch.float32] and rel_err(gates, g_ref) < FWD_TOL[torch.float32]


@needs_ext
def test_fast_entry_is_the_op_and_defers_what_it_does_not_handle():
    """``_C.mogu_linear`` (what the cpp backend calls) is mogu_C::mogu_linear through the
    dispatcher without torch.ops' argument handling: same results, autograd, the op's own
    errors; NotImplemented (so torch.ops runs instead) for a non-float scaling, a tensor
    subclass or an active __torch_function__ mode."""
    fast = extension._C.mogu_linear
    assert dispatch.registered_backends()["cpp"].fast is fast       # mogu_linear calls it directly
    x, w, b, A, B, rw, rb = make_args(5, 24, 20, 4, 2, seed=21)
    y, g = fast(x, w, b, A, B, rw, rb, 1.5, None)
    y2, g2, _ = torch.ops.mogu_C.mogu_linear(x, w, b, A, B, rw, rb, 1.5, None)
    assert torch.equal(y, y2) and torch.equal(g, g2)
    param = torch.nn.Parameter(w.clone(), requires_grad=False)
    assert torch.equal(fast(x, param, b, A, B, rw, rb, 1.5, None)[0], y)
    xg = x.clone().requires_grad_(True)
    fast(xg, w, b, A, B, rw, rb, 1.5, None)[0].sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape
    with pytest.raises(RuntimeError, match=r"mogu_linear\[cpu\]: weight must be"):
        fast(x, w[:, :3], b, A, B, rw, rb, 1.5, None)

    class Sub(torch.Tensor):
        pass

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert fast(x, w, b, A, B, rw, rb, 2, None) is NotImplemented
    assert fast(x.as_subclass(Sub), w, b, A, B, rw, rb, 1.5, None) is NotImplemented
    with Mode():
        assert fast(x, w, b, A, B, rw, rb, 1.5, None) is NotImplemented
        y3, _ = mogu_kernels.mogu_linear(x, w, b, A, B, rw, rb, 1.5, backend="cpp")
    y4, _ = mogu_kernels.mogu_linear(x.as_subclass(Sub), w, b, A, B, rw, rb, 1.5, backend="cpp")
    assert torch.equal(y3, y) and torch.equal(y4.as_subclass(torch.Tensor), y)


# ----------------------------------------------------------------------------- forward
FORWARD_CASES = [  # M, K, N, r, E, bias, layout
    (1, 40, 36, 8, 2, True, "2d"),
    (1, 33, 300, 64, 3, False, "strided_k"),
    (3, 5, 3, 2, 2, True, "2d"),            # everything shorter than one vector
    (3, 33, 47, 1, 1, False, "3d"),
    (3, 129, 17, 4, 2, True, "strided_rows"),
    (37, 67, 129, 4, 3, True, "strided_k"),
    (37, 20, 261, 8, 1, True, "transposed"),
    (16, 1000, 20, 8, 3, True, "strided_rows"),   # K over several dot-product blocks
    (130, 45, 300, 64, 2, False, "3d"),
    (130, 257, 517, 8, 2, True, "2d"),
]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("M,K,N,r,E,bias,layout", FORWARD_CASES)
def test_forward_matches_float64(threads, dtype, M, K, N, r, E, bias, layout):
    args = make_args(M, K, N, r, E, bias=bias, layout=layout, dtype=dtype, seed=M * 31 + N)
    y, gates = mogu_kernels.mogu_linear(*args, 1.75, backend="cpp")
    y_ref, g_ref = spec_mogu_linear(*args, 1.75)
    assert y.shape == y_ref.shape and y.dtype == dtype and gates.dtype == dtype
    assert gates.shape == (*args[0].shape[:-1], E)
    assert rel_err(y, y_ref) < FWD_TOL[dtype]
    assert rel_err(gates, g_ref) < FWD_TOL[dtype]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", ["2d", "3d"])
def test_base_rows(threads, dtype, layout):
    """Base rows are the plain base layer (gates still reported); other rows are MoGU."""
    x, w, b, A, B, rw, rb = make_args(37, 40, 300, 8, 2, layout=layout, dtype=dtype, seed=5)
    rows = random_base_rows(x, seed=6)
    y, gates = mogu_kernels.mogu_linear(x, w, b, A, B, rw, rb, 2.0, backend="cpp", base_rows=rows)
    y_ref, g_ref = spec_mogu_linear(x, w, b, A, B, rw, rb, 2.0, base_rows=rows)
    assert rel_err(y, y_ref) < FWD_TOL[dtype] and rel_err(gates, g_ref) < FWD_TOL[dtype]
    plain = F.linear(x, w, b)
    assert rel_err(y[rows], plain[rows]) < FWD_TOL[dtype]
    assert rel_err(y[~rows], plain[~rows]) > 1e-2


@needs_ext
def test_all_base_rows_equal_plain_linear_exactly():
    x, w, b, A, B, rw, rb = make_args(9, 64, 40, 8, 2, seed=8)
    rows = torch.ones(9, dtype=torch.bool)
    y, _ = mogu_kernels.mogu_linear(x, w, b, A, B, rw, rb, 2.0, backend="cpp", base_rows=rows)
    assert torch.equal(y, x @ w.T + b)          # one rounding for the product, one for + b


@needs_ext
def test_float64_inputs_use_float64_gate_math():
    args = make_args(13, 40, 36, 64, 2, dtype=torch.float64, seed=2)
    y, gates = mogu_kernels.mogu_linear(*args, 2.0, backend="cpp")
    y_ref, g_ref = spec_mogu_linear(*args, 2.0)
    assert y.dtype == torch.float64
    assert rel_err(y, y_ref) < 1e-12 and rel_err(gates, g_ref) < 1e-12


@needs_ext
def test_two_threads_match_one_thread():
    """The row-parallel pass splits this shape across threads; each row's arithmetic is the
    same either way, so the results agree to the base GEMM's rounding."""
    args = make_args(130, 300, 300, 8, 2, seed=9)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, g1 = mogu_kernels.mogu_linear(*args, 2.0, backend="cpp")
        torch.set_num_threads(2)
        y2, g2 = mogu_kernels.mogu_linear(*args, 2.0, backend="cpp")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(g1, g2)
    assert rel_err(y1, y2) < 1e-6


@needs_ext
def test_empty_input():
    x, w, b, A, B, rw, rb = make_args(3, 16, 12, 4, 2)
    y, gates = mogu_kernels.mogu_linear(x[:0], w, b, A, B, rw, rb, 2.0, backend="cpp")
    assert y.shape == (0, 12) and gates.shape == (0, 2)


@needs_ext
def test_op_rejects_bad_shapes_when_called_directly():
    """The kernels index raw memory, so the op checks shapes even without mogu_linear's checks."""
    x, w, b, A, B, rw, rb = make_args(3, 16, 12, 4, 2)
    with pytest.raises(RuntimeError, match="lora_B"):
        torch.ops.mogu_C.mogu_linear(x, w, b, A, B[:, :-1], rw, rb, 2.0, None)
    with pytest.raises(RuntimeError, match="base_rows"):
        torch.ops.mogu_C.mogu_linear(x, w, b, A, B, rw, rb, 2.0, torch.ones(4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"mogu_linear\[cpu\]: x must be fp32, fp16, bf16 or fp64"):
        torch.ops.mogu_C.mogu_linear(x.to(torch.int32), w, b, A, B, rw, rb, 2.0, None)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_op_lays_out_strided_operands_itself(dtype):
    """The forward's entry preamble (csrc/mogu_entry.cpp), called directly: strided views of
    every parameter, a bf16 router (fp32 gate math), a strided bias and base-row mask and an
    x that is not viewable as (M, K) give the float64 spec's result."""
    x, w, b, A, B, rw, rb = make_args(37, 40, 30, 4, 2, layout="transposed", dtype=dtype, seed=17)
    base_rows = random_base_rows(x, seed=17)
    views = dict(
        w=w.t().contiguous().t(),
        b=torch.stack([b, b], 1)[:, 0],
        A=A.permute(2, 0, 1).contiguous().permute(1, 2, 0),
        B=B.permute(1, 2, 0).contiguous().permute(2, 0, 1),
        rw=rw.to(torch.bfloat16).t().contiguous().t(),
        rb=torch.stack([rb, rb], 1).to(torch.bfloat16)[:, 0],
        base_rows=base_rows.t().contiguous().t(),
    )
    assert not any(t.is_contiguous() for t in views.values())
    v = views
    y, gates, saved = torch.ops.mogu_C.mogu_linear(x, v["w"], v["b"], v["A"], v["B"], v["rw"], v["rb"], 1.5,
                                                   v["base_rows"])
    y_ref, g_ref = spec_mogu_linear(x, w, b, A, B, v["rw"], v["rb"], 1.5, base_rows)
    assert y.shape == y_ref.shape and gates.shape == g_ref.shape and saved.shape == (*x.shape[:-1], 2 * 4 + 2)
    assert y.dtype == dtype and gates.dtype == dtype and saved.dtype == torch.float32
    assert rel_err(y, y_ref) < FWD_TOL[dtype] and rel_err(gates, g_ref) < FWD_TOL[dtype]
    assert rel_err(saved[..., 8:], g_ref) < FWD_TOL[torch.float32]


# ----------------------------------------------------------------------------- bf16 / fp16 on the CPU
# Sizes off every block size of the CPU kernels (16-lane vectors, 8-row groups, 32-row brgemm
# calls, 128-row blocks, 256-column chunks, 512-long K blocks). bf16 with even K runs the small
# products on oneDNN's brgemm where the CPU has one (AMX / AVX512-BF16; shrink from 4 rows on);
# odd K, fp16 and other CPUs run the vector kernels.
HALF_DTYPES = [torch.bfloat16, torch.float16]
HALF_CASES = [  # M, K, N, r, E, bias, layout
    (1, 1030, 2100, 8, 2, True, "2d"),            # a decode row: dot-kernel shrink
    (3, 1030, 530, 5, 3, False, "3d"),            # Er = 15 (odd): the padded expand
    (5, 262, 530, 8, 2, True, "strided_rows"),    # first rows on the brgemm shrink
    (17, 1031, 300, 8, 2, True, "2d"),            # odd K
    (133, 514, 777, 6, 2, True, "strided_k"),     # two row blocks, four column chunks
    (301, 130, 2050, 4, 3, False, "transposed"),
]


@needs_ext
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("M,K,N,r,E,bias,layout", HALF_CASES)
def test_half_precision_forward_on_cpu(threads, dtype, M, K, N, r, E, bias, layout):
    """y and gates within the dtype's tolerance of the float64 spec, base rows the plain
    layer, and the fp32 state the op keeps for backward (unscaled shrink, gates) to fp32
    accuracy: the shrink and the router logits are accumulated in fp32, the logits from the
    fp32 router weights (not a bf16 copy of them)."""
    args = make_args(M, K, N, r, E, bias=bias, layout=layout, dtype=dtype, seed=M * 7 + K + N)
    x, w, b, A, B, rw, rb = args
    rows = random_base_rows(x, seed=M + 1)
    y, gates, saved = torch.ops.mogu_C.mogu_linear(x, w, b, A, B, rw, rb, 1.5, rows)
    y_ref, g_ref = spec_mogu_linear(*args, 1.5, base_rows=rows)
    assert y.shape == y_ref.shape and y.dtype == dtype and gates.dtype == dtype
    assert rel_err(y, y_ref) < FWD_TOL[dtype] and rel_err(gates, g_ref) < FWD_TOL[dtype]
    assert rel_err(y[rows], F.linear(x, w, b)[rows]) < FWD_TOL[dtype]
    z_ref = torch.einsum("...k,erk->...er", x.double(), A.double()).flatten(-2)
    assert saved.dtype == torch.float32
    assert rel_err(saved[..., :E * r], z_ref) < 1e-5
    assert float((saved[..., E * r:].double() - g_ref).abs().max()) < 1e-5
    y2, g2 = mogu_kernels.mogu_linear(*args, 1.5)           # the default CPU backend is this op
    assert torch.equal(g2, gates) and rel_err(y2, spec_mogu_linear(*args, 1.5)[0]) < FWD_TOL[dtype]


@needs_ext
@pytest.mark.parametrize("M", [1, 40], ids=["dot_shrink", "brgemm_shrink"])
@pytest.mark.parametrize("inference", [False, True], ids=["tensors", "inference_tensors"])
def test_bf16_packed_operands_follow_the_tensors(M, inference):
    """The bf16 path keeps its packed experts and router per source tensor across calls
    (csrc/mogu_cpu.cpp, packed_operand). Every change of a source between two calls must
    show in the next call: in-place updates of lora_B, lora_A and the router weights, a
    ``.data`` swap, a new tensor in place of a freed one; inference tensors (not cached) too.
    Each change is large enough that a stale packed operand would miss the new float64 spec
    by far more than the tolerance (checked), so the test fails if a cache entry outlives it."""
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx:
        x, w, b, A, B, rw, rb = make_args(M, 514, 530, 8, 2, dtype=torch.bfloat16, seed=M + 5)
        g = torch.Generator().manual_seed(M)

        def check(stale=None):
            y, gates = mogu_kernels.mogu_linear(x, w, b, A, B, rw, rb, 2.0)
            y_ref, g_ref = spec_mogu_linear(x, w, b, A, B, rw, rb, 2.0)
            assert rel_err(y, y_ref) < FWD_TOL[torch.bfloat16] and rel_err(gates, g_ref) < FWD_TOL[torch.bfloat16]
            if stale is not None:   # what a stale packed operand would give is far from the new spec
                assert rel_err(stale[0], y_ref) > 10 * FWD_TOL[torch.bfloat16] or \
                    rel_err(stale[1], g_ref) > 10 * FWD_TOL[torch.bfloat16]
            return y, gates

        out = check()
        check()                                                       # the same tensors again: a cache hit
        B.mul_(-30.0)                                                 # in place: version bump
        out = check(stale=out)
        A.add_(torch.randn(A.shape, generator=g).to(A.dtype) * 0.5)
        out = check(stale=out)
        rw.mul_(-1.0).add_(torch.randn(rw.shape, generator=g) * 0.05)
        out = check(stale=out)
        if not inference:                                             # .data assignment: same tensor object
            B.data = torch.randn(B.shape, generator=g).to(B.dtype) * 3.0
            out = check(stale=out)
        del B
        B = torch.randn(2, 530, 8, generator=g).to(torch.bfloat16) * 3.0   # a new tensor, maybe at B's address
        check(stale=out)


BF16_PATHS = ["generic", "brgemm", "brgemm+avx512bf16"]  # _C.cpu_bf16_path(), from least to most the CPU has


@needs_ext
@pytest.mark.parametrize("path", ["generic", "brgemm"])
def test_bf16_paths_of_other_cpus(path):
    """The bf16 forward takes one of three paths by what the CPU has (csrc/mogu_cpu.cpp): the
    AVX512-BF16 kernels plus oneDNN's brgemm (CPUs with AMX), brgemm alone (AMX without
    avx512_bf16), or the generic kernels (no bf16 brgemm, e.g. CPUs without AMX).
    MOGU_CPU_BF16_PATH caps the path per process, so the bf16 tests above run again here in
    a subprocess on each path below the one this machine takes, against the same float64
    spec. A cap at or above this machine's own path changes nothing: skipped, not passed."""
    env = dict(os.environ, MOGU_CPU_BF16_PATH=path,
               PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
    uncapped_env = {k: v for k, v in env.items() if k != "MOGU_CPU_BF16_PATH"}
    # One bf16 call at a shape every path handles (even K; 64 rows: the transposed tiles on
    # the top path), and the path the process reports.
    probe = ("import torch, mogu_kernels, mogu_kernels.extension as ext; g = torch.Generator().manual_seed(0)\n"
             "r = lambda *s: torch.randn(*s, generator=g)\n"
             "y, _ = mogu_kernels.mogu_linear(r(64, 2048).bfloat16(), r(2048, 2048).bfloat16(), None,"
             " r(2, 8, 2048).bfloat16(), r(2, 2048, 8).bfloat16(), r(2, 2048), r(2), 2.0)\n"
             "print(ext._C.cpu_bf16_path())\n"
             "print(y.float().double().sum().item(), y.view(torch.int16).long().sum().item())")
    here = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                          env=uncapped_env, timeout=300)
    there = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env,
                           timeout=300)
    assert here.returncode == 0 and there.returncode == 0, here.stderr[-2000:] + there.stderr[-2000:]
    own_path, own_result = here.stdout.split("\n", 1)
    capped_path, capped_result = there.stdout.split("\n", 1)
    assert own_path in BF16_PATHS, own_path
    expected = BF16_PATHS[min(BF16_PATHS.index(path), BF16_PATHS.index(own_path))]
    assert capped_path == expected, f"MOGU_CPU_BF16_PATH={path} on a {own_path} CPU gave {capped_path}"
    if capped_path == own_path:
        pytest.skip(f"this CPU's own bf16 path is {own_path}: the {path} cap changes nothing here")
    # The cap took effect: the same call rounds differently on the capped path (other
    # accumulation orders), so the subprocess's tests run on it.
    assert capped_result != own_result, f"MOGU_CPU_BF16_PATH={path} did not change the bf16 result"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "test_half_precision_forward_on_cpu and bf16 or test_bf16_router_logits_keep_fp32"
                           " or test_bf16_output_rounds_denormals or test_bf16_error_is_the_rounding_of_y"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-500:]


@needs_ext
@pytest.mark.parametrize("M", [1, 40])
def test_bf16_router_logits_keep_fp32_precision_for_large_x(M):
    """Large bf16 x whose router terms cancel (x_k = x_{k+1}, v_k ~ -v_{k+1}): with the
    router weights rounded to bf16 the logits would be off by ~|x| |v| 2^-9 per term; the op
    keeps fp32 precision, so its fp32 gates match the float64 sigmoid closely."""
    K, N, r = 514, 300, 8
    x, w, b, A, B, rw, rb = make_args(M, K, N, r, 2, dtype=torch.bfloat16, seed=M + 11)
    g = torch.Generator().manual_seed(M)
    big = (torch.rand(M, K // 2, generator=g) * 2e3 + 1e3).to(torch.bfloat16)
    x = big.repeat_interleave(2, dim=1)                                     # x_k = x_{k+1}, |x| ~ 2e3
    half = torch.randn(2, K // 2, generator=g) * 0.05
    rw = torch.stack([half, -half + torch.randn(2, K // 2, generator=g) * 1e-5], -1).flatten(1)
    rw = rw + torch.randn(2, K, generator=g) * 1e-9                         # not a bf16 value
    _, gates, saved = torch.ops.mogu_C.mogu_linear(x, w, b, A, B, rw, rb, 2.0, None)
    _, g_ref = spec_mogu_linear(x, w, b, A, B, rw, rb, 2.0)
    logits_ref = x.double() @ rw.double().T + rb.double()
    assert float(logits_ref.abs().max()) < 20                               # the cancellation happened
    assert float((saved[..., 2 * r:].double() - g_ref).abs().max()) < 1e-3
    rounded = torch.sigmoid(x.double() @ rw.to(torch.bfloat16).double().T + rb.double())
    assert float((rounded - g_ref).abs().max()) > 1e-2                      # what a bf16 router would give


@needs_ext
def test_bf16_output_rounds_denormals_and_nans_as_c10():
    """bf16 y is rounded bit for bit as c10::BFloat16 rounds, also where the result is
    denormal (gates ~1e-38 put gs * (x W^T + b) there) and where it is NaN (0x7FC0). AVX-512's
    vcvtneps2bf16 would flush those results to zero and keep the NaN's sign and payload, so
    the test fails on an epilogue that rounds with it alone. B is scaled by 1e-6, so the LoRA
    term (< 1e-42) is far below half a denormal step and how the matrix units treat denormal
    rank activations (they flush them) does not matter here.
    21 rows and N = 300: the 8-, 4- and 1-row blocks and a masked column tail."""
    M, K, N, r = 21, 514, 300, 8
    x, w, b, A, B, rw, rb = make_args(M, K, N, r, 2, dtype=torch.bfloat16, seed=3)
    B = (B.float() * 1e-6).to(torch.bfloat16)
    rw, rb = rw * 1e-3, torch.tensor([-87.0, -87.5])                   # gates ~1e-38: fp32, normal
    x[-1, 3] = float("nan")                                            # the last row: NaN through the op
    y, _, _ = torch.ops.mogu_C.mogu_linear(x, w, b, A, B, rw, rb, 2.0, None)
    y_ref, _ = spec_mogu_linear(x[:-1], w, b, A, B, rw, rb, 2.0)
    tiny = 2.0 ** -133                                                 # bf16's smallest denormal step
    denormal = (y_ref.abs() > 4 * tiny) & (y_ref.abs() < 2.0 ** -126)
    assert int(denormal.sum()) > 100                                   # the case under test is there
    err = (y[:-1].double() - y_ref).abs()
    assert bool((err <= tiny + 1e-2 * y_ref.abs()).all()), float((err - 1e-2 * y_ref.abs()).max())
    assert torch.equal(y[-1].view(torch.int16), torch.full((N,), 0x7FC0, dtype=torch.int16))


@needs_ext
@pytest.mark.parametrize("M, K, N, r, E, bias", [(1, 256, 300, 8, 2, True), (13, 256, 300, 8, 2, False),
                                                 (37, 130, 300, 5, 3, True), (300, 256, 300, 8, 2, True),
                                                 (530, 98, 70, 8, 2, True)])
def test_bf16_error_is_the_rounding_of_y(threads, M, K, N, r, E, bias):
    """bf16 y within 4e-3 (by norm) of the float64 spec: what rounding the base product, the
    rank activations t and y to bf16 costs (2.4e-3 at most on the three CPU paths), where
    FWD_TOL's 1.5e-2 would pass an expand with half of its terms 2% off (a build whose FMA
    expand scaled the odd rank terms by 0.99 passed every other bf16 test). M = 1 / 13 / 37 /
    300 / 530: the dot-kernel and the brgemm shrink, the 8-, 4- and 1-row blocks of the
    in-register expand (M < 32 and > 512) and the transposed path between (two superblocks at
    300, a 44-row block); N = 300 / 70: masked column tails; K = 130 / 98: a partial 16-pair
    group in the x^T pack; r = 5, E = 3: an odd Er (the padded pair)."""
    x, w, b, A, B, rw, rb = make_args(M, K, N, r, E, bias=bias, dtype=torch.bfloat16, seed=M + 11)
    y, gates = mogu_kernels.mogu_linear(x, w, b, A, B, rw, rb, 1.75, backend="cpp")
    y_ref, g_ref = spec_mogu_linear(x, w, b, A, B, rw, rb, 1.75)
    assert rel_err(y, y_ref) < 4e-3, rel_err(y, y_ref)
    assert rel_err(gates, g_ref) < 4e-3


@needs_ext
@pytest.mark.parametrize("M", [40, 600])
def test_bf16_weight_with_strides(threads, M):
    """W as a view: rows of a wider matrix (row stride K + 6: the transposed path reads W
    in place with that stride at M = 40) and a transposed view (not unit-stride along K: the
    oneDNN path). Both against float64, the row slice also bit for bit the contiguous W's."""
    x, w, b, A, B, rw, rb = make_args(M, 130, 70, 8, 2, dtype=torch.bfloat16, seed=4)
    y_ref, _ = spec_mogu_linear(x, w, b, A, B, rw, rb, 1.5)
    y_contig, _ = mogu_kernels.mogu_linear(x, w, b, A, B, rw, rb, 1.5, backend="cpp")
    wide = torch.cat([w, torch.randn(70, 6, generator=torch.Generator().manual_seed(5)).to(w.dtype)], 1)
    rows_view = wide[:, :130]
    assert rows_view.stride() == (136, 1)
    y_rows, _ = mogu_kernels.mogu_linear(x, rows_view, b, A, B, rw, rb, 1.5, backend="cpp")
    y_t, _ = mogu_kernels.mogu_linear(x, w.t().contiguous().t(), b, A, B, rw, rb, 1.5, backend="cpp")
    assert torch.equal(y_rows, y_contig)
    assert rel_err(y_rows, y_ref) < 4e-3 and rel_err(y_t, y_ref) < 4e-3


# ----------------------------------------------------------------------------- backward
BACKWARD_CASES = [  # M, K, N, r, E, bias, layout, with_base_rows
    (1, 24, 20, 4, 2, True, "2d", False),
    (5, 33, 47, 1, 1, False, "3d", True),
    (37, 40, 36, 8, 3, True, "strided_k", True),
    (130, 67, 129, 64, 2, False, "transposed", False),
]


def _grads_vs_float64(args, scaling, base_rows, use_y=True, use_gates=True, seed=0):
    x, w, b, A, B, rw, rb = args
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B, rw, rb)]
    y, gates = mogu_kernels.mogu_linear(leaves[0], w, b, *leaves[1:], scaling, backend="cpp", base_rows=base_rows)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g).to(y.dtype)
    gg = torch.randn(gates.shape, generator=g).to(gates.dtype)
    outs, grads = zip(*[(o, d) for o, d, use in ((y, gy, use_y), (gates, gg, use_gates)) if use])
    torch.autograd.backward(list(outs), list(grads))

    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, A, B, rw, rb)]
    y64, g64 = spec_mogu_linear(leaves64[0], w, b, *leaves64[1:], scaling, base_rows=base_rows)
    outs64 = [o for o, use in ((y64, use_y), (g64, use_gates)) if use]
    torch.autograd.backward(outs64, [d.double() for d in grads])
    return leaves, leaves64


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("M,K,N,r,E,bias,layout,with_base_rows", BACKWARD_CASES)
def test_backward_matches_float64(threads, dtype, M, K, N, r, E, bias, layout, with_base_rows):
    args = make_args(M, K, N, r, E, bias=bias, layout=layout, dtype=dtype, seed=M + 7 * K)
    base_rows = random_base_rows(args[0], seed=M) if with_base_rows else None
    got, ref = _grads_vs_float64(args, 1.5, base_rows, seed=M)
    for name, a, b in zip(("x", "lora_A", "lora_B", "router_weight", "router_bias"), got, ref):
        assert a.grad is not None and a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
        assert rel_err(a.grad, b.grad) < BWD_TOL[dtype], (name, rel_err(a.grad, b.grad))


@needs_ext
@pytest.mark.parametrize("use_y,use_gates", [(True, False), (False, True)])
def test_backward_with_one_output_unused(use_y, use_gates):
    args = make_args(6, 24, 20, 4, 2, seed=3)
    got, ref = _grads_vs_float64(args, 2.0, None, use_y=use_y, use_gates=use_gates)
    for name, a, b in zip(("x", "lora_A", "lora_B", "router_weight", "router_bias"), got, ref):
        if b.grad is None or b.grad.abs().max() == 0:      # e.g. gates alone do not reach the LoRA weights
            assert a.grad is None or a.grad.abs().max() == 0, name
        else:
            assert rel_err(a.grad, b.grad) < BWD_TOL[torch.float32], name


@needs_ext
def test_router_only_training_leaves_other_grads_empty():
    """Stage 2 trains only the routers: no gradient is produced for anything else."""
    x, w, b, A, B, rw, rb = make_args(8, 24, 20, 4, 2, seed=4)
    rw, rb = rw.clone().requires_grad_(True), rb.clone().requires_grad_(True)
    y, gates = mogu_kernels.mogu_linear(x, w, b, A, B, rw, rb, 2.0, backend="cpp")
    (y.square().mean() + gates.mean()).backward()
    assert rw.grad is not None and rb.grad is not None
    assert x.grad is None and A.grad is None and B.grad is None


@needs_ext
def test_no_graph_under_no_grad_or_without_trainable_inputs():
    x, w, b, A, B, rw, rb = make_args(4, 16, 12, 4, 2)
    y, gates = mogu_kernels.mogu_linear(x, w, b, A, B, rw, rb, 2.0, backend="cpp")
    assert not y.requires_grad and y.grad_fn is None
    with torch.no_grad():
        y, _ = mogu_kernels.mogu_linear(x.requires_grad_(True), w, b, A, B, rw, rb, 2.0, backend="cpp")
    assert not y.requires_grad


@needs_ext
def test_opcheck_schema_fake_autograd_and_compile_registration():
    """torch.library.opcheck: schema, fake kernel, autograd registration and AOT dispatch."""
    x, w, b, A, B, rw, rb = make_args(5, 24, 20, 4, 2, seed=12)
    rows = random_base_rows(x, seed=1)
    for req in (False, True):
        leaves = [t.clone().requires_grad_(req) for t in (x, A, B, rw, rb)]
        torch.library.opcheck(torch.ops.mogu_C.mogu_linear.default,
                              (leaves[0], w, b, leaves[1], leaves[2], leaves[3], leaves[4], 1.5, rows))
    _, _, saved = torch.ops.mogu_C.mogu_linear(x, w, None, A, B, rw, rb, 1.5, None)
    torch.library.opcheck(torch.ops.mogu_C.mogu_linear_backward.default,
                          (torch.randn(5, 20), torch.randn(5, 2), x, w, None, A, B, rw, None, saved, 1.5,
                           torch.float32))


@needs_ext
def test_torch_compile_forward_and_backward():
    x, w, b, A, B, rw, rb = make_args(6, 24, 20, 4, 2, seed=13)
    x, rw = x.clone().requires_grad_(True), rw.clone().requires_grad_(True)

    def loss_fn(x, rw):
        y, gates = mogu_kernels.mogu_linear(x, w, b, A, B, rw, rb, 2.0, backend="cpp")
        return y.square().sum() + gates.sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    loss = compiled(x, rw)
    gx, grw = torch.autograd.grad(loss, (x, rw))
    x64, rw64 = x.detach().double().requires_grad_(True), rw.detach().double().requires_grad_(True)
    y64, g64 = spec_mogu_linear(x64, w, b, A, B, rw64, rb, 2.0)
    loss64 = y64.square().sum() + g64.sum()
    gx64, grw64 = torch.autograd.grad(loss64, (x64, rw64))
    assert rel_err(loss, loss64) < 1e-5 and rel_err(gx, gx64) < 1e-4 and rel_err(grw, grw64) < 1e-4


# ----------------------------------------------------------------------------- CUDA
def test_cuda_sources_compile_for_sm80_and_sm90():
    """The .cu sources compile (not link, not run) with the machine's nvcc against this
    torch's headers, so CUDA code that does not compile cannot land."""
    sys.path.insert(0, os.path.join(ROOT, "csrc"))
    try:
        import check_cuda_compile
    finally:
        sys.path.pop(0)
    if check_cuda_compile.find_nvcc(None) is None:
        pytest.skip("nvcc not found (set $NVCC or $CUDA_HOME to run this check)")
    # The C++ sources are compiled by the build itself; CI runs the full script.
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "csrc", "check_cuda_compile.py"), "--skip-cxx"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _cuda_backend_ready():
    reason = extension.cuda_unavailable_reason()
    assert reason is None, f"CUDA device present but the cuda backend is unavailable: {reason}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("M,K,N,r,E,bias,layout", FORWARD_CASES + [(300, 512, 1000, 16, 2, True, "2d")])
def test_cuda_forward_matches_float64(dtype, M, K, N, r, E, bias, layout):
    _cuda_backend_ready()
    args = make_args(M, K, N, r, E, bias=bias, layout=layout, dtype=dtype, seed=M + N, device="cuda")
    rows = random_base_rows(args[0], seed=M)
    for base_rows in (None, rows):
        y, gates = mogu_kernels.mogu_linear(*args, 1.75, backend="cuda", base_rows=base_rows)
        y_ref, g_ref = spec_mogu_linear(*args, 1.75, base_rows=base_rows)
        assert y.dtype == dtype and y.device.type == "cuda"
        assert rel_err(y, y_ref) < CUDA_TOL[dtype] and rel_err(gates, g_ref) < CUDA_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("M,K,N,r,E,bias,layout,with_base_rows", BACKWARD_CASES)
def test_cuda_backward_matches_float64(dtype, M, K, N, r, E, bias, layout, with_base_rows):
    _cuda_backend_ready()
    args = make_args(M, K, N, r, E, bias=bias, layout=layout, dtype=dtype, seed=M, device="cuda")
    base_rows = random_base_rows(args[0], seed=M) if with_base_rows else None
    x, w, b, A, B, rw, rb = args
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B, rw, rb)]
    y, gates = mogu_kernels.mogu_linear(leaves[0], w, b, *leaves[1:], 1.5, backend="cuda", base_rows=base_rows)
    gy, gg = torch.randn_like(y), torch.randn_like(gates)
    torch.autograd.backward([y, gates], [gy, gg])
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, A, B, rw, rb)]
    y64, g64 = spec_mogu_linear(leaves64[0], w, b, *leaves64[1:], 1.5, base_rows=base_rows)
    torch.autograd.backward([y64, g64], [gy.double(), gg.double()])
    for name, a, ref in zip(("x", "lora_A", "lora_B", "router_weight", "router_bias"), leaves, leaves64):
        assert rel_err(a.grad, ref.grad) < max(CUDA_TOL[dtype], BWD_TOL[dtype]), name


@pytest.mark.gpu
def test_cuda_matches_cpp_on_the_same_inputs():
    _cuda_backend_ready()
    args = make_args(64, 256, 384, 8, 2, seed=21)
    y_cpu, g_cpu = mogu_kernels.mogu_linear(*args, 2.0, backend="cpp")
    cuda_args = [t if t is None else t.cuda() for t in args]
    y_gpu, g_gpu = mogu_kernels.mogu_linear(*cuda_args, 2.0, backend="cuda")
    assert rel_err(y_gpu.cpu(), y_cpu) < CUDA_TOL[torch.float32]
    assert rel_err(g_gpu.cpu(), g_cpu) < CUDA_TOL[torch.float32]
