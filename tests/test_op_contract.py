"""mogu_linear's contract, checked for every backend available on the CPU.

The reference backend always runs; "cpp" runs when the extension is built, "triton" when
TRITON_INTERPRET=1 (conftest sets it when there is no GPU). Backend-specific suites
(tests/test_triton_backend.py, tests/test_extension.py) go deeper.
"""
import pytest
import torch

import mogu_kernels
from op_spec import TOL, make_inputs, rel_err, spec_mogu_linear

CPU_BACKENDS = mogu_kernels.available_backends("cpu")


def test_reference_is_always_available():
    assert "reference" in CPU_BACKENDS


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("M,K,N,r,E,bias,three_d", [
    (1, 40, 24, 4, 2, True, False),
    (5, 33, 47, 8, 2, False, False),
    (9, 40, 36, 64, 2, True, True),
    (6, 20, 17, 4, 3, True, False),
    (4, 24, 20, 1, 1, False, True),
])
def test_forward_matches_float64_spec(backend, M, K, N, r, E, bias, three_d):
    args = make_inputs(M, K, N, r, E, bias=bias, three_d=three_d, seed=M * 100 + K)
    y, gates = mogu_kernels.mogu_linear(*args, 1.75, backend=backend)
    y_ref, g_ref = spec_mogu_linear(*args, 1.75)
    assert y.shape == y_ref.shape and y.dtype == args[0].dtype
    assert gates.shape == (*args[0].shape[:-1], E)
    assert rel_err(y, y_ref) < TOL[torch.float32]
    assert rel_err(gates, g_ref) < TOL[torch.float32]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M,K,N,r", [(7, 40, 36, 8), (1, 262, 300, 8), (19, 130, 517, 5)])
def test_half_precision_forward(backend, dtype, M, K, N, r):
    """fp16 and bf16 on the CPU (sizes off every block size; K=130 and 262 take the C++
    extension's brgemm path for bf16 where the CPU has one, K=40 too, M=1 its dot kernel)."""
    args = make_inputs(M, K, N, r, dtype=dtype, seed=3 + M)
    y, gates = mogu_kernels.mogu_linear(*args, 2.0, backend=backend)
    y_ref, g_ref = spec_mogu_linear(*args, 2.0)
    assert y.dtype == dtype and gates.dtype == dtype
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(gates, g_ref) < TOL[dtype]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_x(backend):
    x, *rest = make_inputs(6, 40, 24, 4, seed=5)
    wide = torch.randn(6, 80)
    x_nc = wide[:, ::2]                     # stride 2 in K
    assert not x_nc.is_contiguous()
    y, _ = mogu_kernels.mogu_linear(x_nc, *rest, 2.0, backend=backend)
    y_ref, _ = spec_mogu_linear(x_nc, *rest, 2.0)
    assert rel_err(y, y_ref) < TOL[torch.float32]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_base_rows_run_as_plain_base(backend):
    args = make_inputs(8, 40, 24, 4, seed=7, three_d=True)
    base_rows = torch.tensor([[True, False, False, True], [False, True, False, False]])
    y, gates = mogu_kernels.mogu_linear(*args, 2.0, backend=backend, base_rows=base_rows)
    y_ref, g_ref = spec_mogu_linear(*args, 2.0, base_rows=base_rows)
    assert rel_err(y, y_ref) < TOL[torch.float32]
    assert rel_err(gates, g_ref) < TOL[torch.float32]       # gates still reported for base rows
    x, w, b = args[0], args[1], args[2]
    plain = torch.nn.functional.linear(x, w, b)
    assert rel_err(y[base_rows], plain[base_rows]) < TOL[torch.float32]
    assert rel_err(y[~base_rows], plain[~base_rows]) > 1e-2  # MoGU rows really differ


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_float64_autograd(backend, bias):
    x, w, b, A, B, rw, rb = make_inputs(5, 24, 20, 4, E=2, bias=bias, seed=11, three_d=True)
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B, rw, rb)]
    y, gates = mogu_kernels.mogu_linear(leaves[0], w, b, leaves[1], leaves[2], leaves[3], leaves[4], 1.5,
                                        backend=backend)
    gy = torch.randn_like(y)
    gg = torch.randn_like(gates)
    torch.autograd.backward([y, gates], [gy, gg])
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, A, B, rw, rb)]
    y64, g64 = spec_mogu_linear(leaves64[0], w.double(), None if b is None else b.double(), *leaves64[1:], 1.5)
    torch.autograd.backward([y64, g64], [gy.double(), gg.double()])
    for name, got, ref in zip(("x", "lora_A", "lora_B", "router_weight", "router_bias"), leaves, leaves64):
        assert got.grad is not None, name
        assert rel_err(got.grad, ref.grad) < 1e-4, name


def test_reference_matches_spec_in_float64():
    args = [t.double() if t is not None else None for t in make_inputs(13, 40, 36, 64, seed=2)]
    y, gates = mogu_kernels.mogu_linear(*args, 2.0, backend="reference")
    y_ref, g_ref = spec_mogu_linear(*args, 2.0)
    assert rel_err(y, y_ref) < 1e-12 and rel_err(gates, g_ref) < 1e-12


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize("mutate,needle", [
    (lambda a: a.__setitem__(1, a[1][:, :-1]), "weight"),
    (lambda a: a.__setitem__(2, a[2][:-1]), "bias"),
    (lambda a: a.__setitem__(3, a[3][:, :, :-1]), "lora_A"),
    (lambda a: a.__setitem__(4, a[4][:, :-1]), "lora_B"),
    (lambda a: a.__setitem__(5, a[5][:1]), "router_weight"),
    (lambda a: a.__setitem__(6, a[6][:1]), "router_bias"),
    (lambda a: a.__setitem__(1, a[1].double()), "weight"),
    (lambda a: a.__setitem__(3, a[3].half()), "lora_A"),
    (lambda a: a.__setitem__(0, a[0].long()), "x"),
    (lambda a: a.__setitem__(6, a[6].to("meta")), "router_bias"),
])
def test_bad_arguments_name_the_argument(mutate, needle):
    args = list(make_inputs(3, 16, 12, 4))
    mutate(args)
    with pytest.raises(ValueError, match=needle):
        mogu_kernels.mogu_linear(*args, 2.0)


def test_bad_base_rows_and_backend():
    args = make_inputs(3, 16, 12, 4)
    with pytest.raises(ValueError, match="base_rows"):
        mogu_kernels.mogu_linear(*args, 2.0, base_rows=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown backend"):
        mogu_kernels.mogu_linear(*args, 2.0, backend="nope")


def test_env_var_selects_backend(monkeypatch):
    calls = []
    original = mogu_kernels.dispatch._REGISTRY["reference"].fn
    monkeypatch.setitem(mogu_kernels.dispatch._REGISTRY, "reference", mogu_kernels.Backend(
        "reference", lambda *a: calls.append(1) or original(*a), lambda d: True))
    monkeypatch.setenv("MOGU_BACKEND", "reference")
    mogu_kernels.mogu_linear(*make_inputs(3, 16, 12, 4), 2.0)
    assert calls == [1]
    monkeypatch.setenv("MOGU_BACKEND", "does-not-exist")
    with pytest.raises(ValueError, match="MOGU_BACKEND"):
        mogu_kernels.mogu_linear(*make_inputs(3, 16, 12, 4), 2.0)


def test_backends_that_do_not_run_here_say_why(monkeypatch):
    """A backend whose module failed to import is listed with its reason and, asked for
    by name, raises with that reason (not "unknown backend")."""
    from mogu_kernels import dispatch
    monkeypatch.setattr(dispatch, "_MISSING", {"vanished": "mogu_kernels.vanished failed to import (ImportError: x)"})
    assert "vanished" not in mogu_kernels.available_backends()
    assert "ImportError: x" in mogu_kernels.unavailable_backends()["vanished"]
    args = make_inputs(2, 8, 6, 2, seed=0)
    with pytest.raises(RuntimeError, match="ImportError: x"):
        mogu_kernels.mogu_linear(*args, 1.0, backend="vanished")
    with pytest.raises(ValueError, match="unknown backend"):
        mogu_kernels.mogu_linear(*args, 1.0, backend="never-heard-of")


def test_available_backends_without_a_device_lists_only_what_runs_here():
    """Without CUDA and without the Triton interpreter, triton does not run here: it is
    left out and reported with the reason (a fresh process, since the env var is read at import)."""
    import subprocess
    import sys
    code = ("import mogu_kernels as m, json; "
            "print(json.dumps([m.available_backends(), m.unavailable_backends()]))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    available, unavailable = __import__("json").loads(out.stdout)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: triton runs here")
    assert "triton" not in available and "reference" in available
    assert "triton" in unavailable and "cpu" in unavailable["triton"]


def test_checking_backends_run_no_python_checks_on_valid_calls(monkeypatch):
    """Backends whose op checks its own arguments (checks_args: the C++ extension) get no
    Python checks on a valid call, only after the op raised; others are checked first."""
    from mogu_kernels import ops
    calls = []
    real = ops.check_mogu_linear_args
    monkeypatch.setattr(ops, "check_mogu_linear_args", lambda *a: calls.append(1) or real(*a))
    args = make_inputs(3, 16, 12, 4)
    for name in CPU_BACKENDS:
        calls.clear()
        mogu_kernels.mogu_linear(*args, 2.0, backend=name)
        checks_itself = mogu_kernels.dispatch.registered_backends()[name].checks_args
        assert calls == ([] if checks_itself else [1]), name
        bad = list(args)
        bad[4] = bad[4][:, :-1]
        with pytest.raises(ValueError, match="lora_B"):
            mogu_kernels.mogu_linear(*bad, 2.0, backend=name)


def test_backend_choice_follows_registry_changes(monkeypatch):
    """The per-call backend choice is cached, but a replaced or newly unavailable backend is
    seen on the next call."""
    from mogu_kernels import dispatch
    monkeypatch.delenv("MOGU_BACKEND", raising=False)
    first = dispatch.resolve_backend("cpu")
    assert dispatch.resolve_backend(torch.device("cpu")) is first
    stand_in = dispatch.Backend(first.name, first.fn, lambda d: True)
    monkeypatch.setitem(dispatch._REGISTRY, first.name, stand_in)
    assert dispatch.resolve_backend("cpu") is stand_in
    if first.name != "reference":
        monkeypatch.setitem(dispatch._REGISTRY, first.name,
                            dispatch.Backend(first.name, first.fn, lambda d: True, lambda: "switched off"))
        with pytest.warns(RuntimeWarning, match="switched off"):
            monkeypatch.setattr(dispatch, "_WARNED", set())
            assert dispatch.resolve_backend("cpu").name == "reference"
        monkeypatch.setitem(dispatch._REGISTRY, first.name, first)
        assert dispatch.resolve_backend("cpu") is first
