"""The benchmark script runs and writes its documented outputs (no timing is asserted)."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import throughput  # noqa: E402


def test_throughput_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert throughput.main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    impls = {r["impl"] for r in data["rows"]}
    assert {"base", "published", "mogu:reference"} <= impls
    assert all(r["ratio_to_base"] > 0 for r in data["rows"])
    assert "ratio to base" in capsys.readouterr().out


def test_every_benchmarked_layer_computes_the_float64_spec():
    """The timed implementations compute the op contract: ``published`` (the deliberate
    unfused restatement, unfolded heads) and the folded ``mogu:*`` rows agree with the
    float64 spec on random non-zero weights; ``base`` is the plain projection."""
    import torch
    from layer_impls import layer_impls, make_layer_weights
    from op_spec import rel_err, spec_mogu_linear

    import mogu_kernels

    w = make_layer_weights(K=48, N=40, r=4, dtype=torch.float32, device="cpu", hidden=16, seed=3)
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(1))
    # The spec gets the heads unfolded (in float64), so a wrong fold fails too.
    v, c = [], []
    for head in ("alpha_", "beta_"):
        w0, w1, b1, w2, b2 = (t.double() for t in w[head])
        v.append((w2 @ w1 @ w0).squeeze(0))
        c.append((w2 @ b1 + b2).squeeze(0))
    y_ref, _ = spec_mogu_linear(x, w["weight"], w["bias"], w["lora_A"], w["lora_B"], torch.stack(v), torch.stack(c),
                                w["scaling"])
    impls = layer_impls(w, mogu_kernels.available_backends("cpu"))
    assert {"published", "mogu:reference"} <= set(impls)
    for name, fn in impls.items():
        if name == "base":
            assert rel_err(fn(x), x.double() @ w["weight"].double().T + w["bias"].double()) < 1e-5
        else:
            assert rel_err(fn(x), y_ref) < 1e-5, name
