"""The benchmark script runs and writes its documented outputs (no timing is asserted)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
sys.path.insert(0, os.path.dirname(__file__))

import throughput  # noqa: E402


def test_throughput_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert throughput.main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    impls = {r["impl"] for r in data["rows"]}
    assert {"base", "published", "mogu:reference"} <= impls
    assert all(r["ratio_to_base"] > 0 for r in data["rows"])
    assert {r["mode"] for r in data["rows"]} == {"warm", "model"}
    assert all(r["min_ms"] <= r["ms"] <= r["max_ms"] for r in data["rows"])
    assert {"F.linear", "mogu_linear"} <= {c["impl"] for c in data["call_cost"]}
    assert "loadavg_start" in data["load"]
    assert "ratio to base" in capsys.readouterr().out


def test_model_mode_walks_the_whole_stack_across_implementations():
    """"model" timing: consecutive calls (whatever the implementation) take consecutive
    layers, so a layer comes back only after every other layer was read; "warm" timing
    reuses layer 0. Repetitions stop at the cap."""
    import timing
    log = []
    impls = {name: [lambda name=name, i=i: log.append((name, i)) for i in range(5)] for name in ("a", "b", "c")}
    res = timing.time_interleaved(impls, cold=True, min_time=0.0, warmup=0.0, min_repeats=4, max_repeats=4)
    assert res["repeats"] == 4 and all(len(s) == 4 for s in res["samples"].values())
    layers = [i for _, i in log]
    assert layers == [k % 5 for k in range(len(layers))]
    assert {name for name, _ in log} == {"a", "b", "c"}
    log.clear()
    res = timing.time_interleaved({k: v[:1] for k, v in impls.items()}, cold=False, min_time=0.0, warmup=0.0,
                                  min_repeats=1, max_repeats=1)
    assert res["repeats"] == 1 and {i for _, i in log} == {0}


def test_load_warning(monkeypatch):
    import timing
    monkeypatch.setattr(timing, "_proc_stat_busy", lambda: None)
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    quiet = timing.LoadMonitor(threads=2)
    quiet.stop()
    assert quiet.start_warning() is None and quiet.warning() is None
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (3.5, 3.0, 2.0))
    busy = timing.LoadMonitor(threads=2)
    assert "load average 3.50" in busy.start_warning()
    busy.stop()
    assert "WARNING" in busy.warning() and "--threads 1" in busy.warning()
    # With /proc/stat readable, the CPU time others used during the run decides: a residual
    # load average from work that ended before the run is no warning, busy cores are.
    clock = iter([100.0, 100.0 + 0.01 * 1.0])            # others: 0.01 core-seconds
    monkeypatch.setattr(timing, "_proc_stat_busy", lambda: next(clock))
    monkeypatch.setattr(timing.time, "process_time", lambda: 0.0)
    walls = iter([0.0, 1.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(walls))
    residual = timing.LoadMonitor(threads=2)
    residual.stop()
    assert residual.others_cores == pytest.approx(0.01) and residual.warning() is None
    clock = iter([100.0, 101.5])                          # others: 1.5 cores over 1 s
    walls = iter([0.0, 1.0])
    loaded = timing.LoadMonitor(threads=2)
    loaded.stop()
    assert "WARNING" in loaded.warning() and "1.50 of" in loaded.warning()


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


def test_generation_bench_runs_each_dtype_and_thread_count(tmp_path, capsys):
    """benchmarks/generation_bench.py on a tiny Llama folder (the --model path the SmolLM2
    row takes too): one table per dtype x thread count, the rows and keys documented, the
    exact protocol's tokens equal to the published procedure's in fp32, a named error for
    a bad --dtypes value. No timing is asserted."""
    import generation_bench
    from tiny_models import tiny_llama

    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    out = tmp_path / "rows.json"
    assert generation_bench.main(["--model", str(folder), "--prompt-len", "9", "--new-tokens", "5",
                                  "--mogu-tokens", "2", "--repeats", "1", "--dtypes", "float32,bfloat16",
                                  "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["dtype"], r["impl"]) for r in rows] == [(d, i) for d in ("float32", "bfloat16")
                                                      for i in generation_bench.IMPLS]
    for r in rows:
        assert r["threads"] == 1 and r["prompt_len"] == 9 and r["new_tokens"] == 5 and r["total_s"] > 0
        assert r["peak_mem_mb"] > 0 and r["ratio_to_base"] > 0
    assert rows[0]["exact_tokens_equal_published"] is True
    printed = capsys.readouterr().out
    assert printed.count("mogu_exact") == 2 and "float32" in printed and "bfloat16" in printed
    with pytest.raises(SystemExit):
        generation_bench.main(["--model", str(folder), "--dtypes", "float8"])
