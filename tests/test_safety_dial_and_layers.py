"""The usability/safety dial (router offset, calibration), layer selection (MoGU v2:
``MoGUConfig(layers=...)``, the layer probe) and joint adaptation, on tiny random models."""
import json
import random

import pytest
import torch

import mogu
from mogu.evaluation import calibration, probing
from mogu.layer import MoGULinear
from tiny_models import random_release, tiny_llama, write_published
from test_training import two_class_rows
from tiny_tokenizer import tiny_tokenizer, words

FAST = dict(progress=False, save_steps=None)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_published(random_release(tiny_llama(layers=3)), str(tmp_path_factory.mktemp("release")))


def _loaded(release, config=None):
    model = tiny_llama(layers=3)
    mogu.load_official(model, glad=release["glad"], unwill=release["unwill"], router=release["router"],
                       config=config)
    return model.eval()


def _ids(seed=0, n=2, t=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 90, (n, t), generator=g)


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("bad", ["auto", "auto:0", "top:3", [], [-1], [1, 1], [0.5], [True]])
def test_bad_layers_are_named(bad):
    with pytest.raises(ValueError, match="layers"):
        mogu.MoGUConfig(layers=bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1", True])
def test_bad_router_offset_is_named(bad):
    with pytest.raises(ValueError, match="router_offset"):
        mogu.MoGUConfig(router_offset=bad)


def test_layers_are_sorted_and_auto_must_be_resolved_before_patching():
    assert mogu.MoGUConfig(layers=[2, 0]).layers == [0, 2]
    cfg = mogu.MoGUConfig(layers="auto:2")
    assert cfg.auto_layers == 2
    with pytest.raises(ValueError, match="select_layers"):
        mogu.patch_model(tiny_llama(layers=3), cfg)
    with pytest.raises(ValueError, match=r"indices \[5\]"):
        mogu.patch_model(tiny_llama(layers=3), mogu.MoGUConfig(layers=[0, 5]))


# ---------------------------------------------------------- layer selection
def test_unselected_layers_are_bitwise_base():
    """Only the chosen layers are wrapped; the others keep their module and their output."""
    plain = tiny_llama(layers=3).eval()
    model = tiny_llama(layers=3).eval()
    mogu.patch_model(model, mogu.MoGUConfig(layers=[1], router_hidden=8))
    names = [n for n, m in model.named_modules() if n.endswith("self_attn.o_proj")]
    kinds = {n: type(model.get_submodule(n)) for n in names}
    assert kinds == {"model.layers.0.self_attn.o_proj": torch.nn.Linear,
                     "model.layers.1.self_attn.o_proj": MoGULinear,
                     "model.layers.2.self_attn.o_proj": torch.nn.Linear}
    layer = model.get_submodule("model.layers.1.self_attn.o_proj")
    torch.manual_seed(0)
    with torch.no_grad():
        layer.lora_B.normal_()                                 # the chosen layer visibly changes its output

    def outputs(m):
        seen = {}
        hooks = [m.get_submodule(n).register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, o.clone()))
                 for n in names]
        with torch.no_grad():
            logits = m(_ids()).logits
        for h in hooks:
            h.remove()
        return seen, logits

    got, logits = outputs(model)
    ref, ref_logits = outputs(plain)
    assert torch.equal(got["model.layers.0.self_attn.o_proj"], ref["model.layers.0.self_attn.o_proj"])
    assert not torch.allclose(got["model.layers.1.self_attn.o_proj"], ref["model.layers.1.self_attn.o_proj"])
    assert not torch.allclose(logits, ref_logits)
    with mogu.mode(model, "base"):
        assert torch.equal(model(_ids()).logits, ref_logits)


def test_layer_subset_saves_and_loads(tmp_path):
    model = tiny_llama(layers=3)
    mogu.patch_model(model, mogu.MoGUConfig(layers=[0, 2], router_hidden=8))
    with torch.no_grad():
        for layer in mogu.patched_modules(model).values():
            layer.lora_B.normal_()
    mogu.save_pretrained(model, tmp_path / "m", folded=True)
    other = tiny_llama(layers=3)
    mogu.load(other, str(tmp_path / "m"))
    assert list(mogu.patched_modules(other)) == ["model.layers.0.self_attn.o_proj", "model.layers.2.self_attn.o_proj"]
    with torch.no_grad():
        assert torch.allclose(other.eval()(_ids()).logits, model.eval()(_ids()).logits, atol=1e-6)


def test_probe_picks_the_separable_layer_on_synthetic_activations():
    """Five layers of noise, one of which (layer 3) carries the class in one direction."""
    g = torch.Generator().manual_seed(0)
    L, D, n, m = 5, 12, 80, 60

    def make(count):
        y = torch.arange(count) % 2
        x = torch.randn(L, count, D, generator=g)
        x[3, :, 4] += 3.0 * (2 * y.double() - 1).float()         # separable at layer 3 only
        x[1, :, 2] += 0.4 * (2 * y.double() - 1).float()         # weakly informative at layer 1
        return x, y
    (xtr, ytr), (xte, yte) = make(n), make(m)
    acc, acc_tr, nll = probing.probe_accuracy(xtr, ytr, xte, yte)
    ranking = probing.rank_layers(acc.tolist(), nll.tolist())
    assert ranking[0] == 3 and acc[3] > 0.9, acc
    assert ranking[1] == 1, (ranking, acc)
    assert all(acc[l] < 0.8 for l in (0, 2, 4)), acc


def test_select_layers_on_a_tiny_model(tok, tmp_path):
    """Resolve "auto:K" through real forward passes; the probe files are written."""
    rng = random.Random(0)
    rows = [{"instruction": words([rng.choice(range(10, 14) if i % 2 else range(40, 44)) for _ in range(6)]),
             "label": "malicious" if i % 2 else "benign"} for i in range(24)]
    model = tiny_llama(layers=3)
    cfg = probing.select_layers(model, tok, mogu.MoGUConfig(layers="auto:2"), rows[:16], rows[16:],
                                out=tmp_path / "probe", progress=False)
    assert isinstance(cfg.layers, list) and len(cfg.layers) == 2 and set(cfg.layers) <= {0, 1, 2}
    report = json.load(open(tmp_path / "probe" / probing.PROBE_FILE))
    assert len(report["accuracy"]) == 3 and report["chosen"] == cfg.layers
    with pytest.raises(ValueError, match="both benign and malicious"):
        probing.probe_layers(model, tok, rows[:16:2], rows[16:], progress=False)


def _reference_recall(logits, malicious, rate, among=None):
    """Independent reference: sweep every candidate threshold (each score, and below all),
    keep those letting at most ``rate`` of the benign rows strictly above, take the best recall."""
    out = []
    counted = malicious if among is None else malicious & among
    for row in logits.tolist():
        neg = [v for v, bad in zip(row, malicious.tolist()) if not bad]
        pos = [v for v, c in zip(row, counted.tolist()) if c]
        best = 0.0
        for t in sorted(set(row)) + [min(row) - 1.0]:
            if sum(v > t for v in neg) <= rate * len(neg):
                best = max(best, sum(v > t for v in pos) / len(pos))
        out.append(best)
    return out


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.2, 0.5])
def test_recall_at_benign_rate_is_the_best_threshold_within_the_rate(rate):
    """Against a brute-force threshold sweep, with tied scores (quarter steps) and a category mask."""
    g = torch.Generator().manual_seed(3)
    L, m = 4, 61
    malicious = torch.rand(m, generator=g) < 0.4
    logits = (torch.randn(L, m, generator=g, dtype=torch.float64) + 1.5 * malicious.double()).mul(4).round() / 4
    among = torch.rand(m, generator=g) < 0.5
    assert int((~malicious).sum()) != 0 and int((malicious & among).sum()) != 0
    got = probing.recall_at_benign_rate(logits, malicious, rate)
    assert got.tolist() == pytest.approx(_reference_recall(logits, malicious, rate), abs=1e-12)
    got = probing.recall_at_benign_rate(logits, malicious, rate, among=among)
    assert got.tolist() == pytest.approx(_reference_recall(logits, malicious, rate, among), abs=1e-12)
    assert any(0.0 < v < 1.0 for v in got.tolist()), got              # not a trivial all-or-nothing case


def test_recall_at_benign_rate_rejects_bad_input():
    logits, malicious = torch.randn(2, 6, dtype=torch.float64), torch.tensor([1, 0, 1, 0, 1, 0]).bool()
    with pytest.raises(ValueError, match="benign_rate"):
        probing.recall_at_benign_rate(logits, malicious, 1.0)
    with pytest.raises(ValueError, match="benign rows and malicious rows"):
        probing.recall_at_benign_rate(logits, torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="benign rows and malicious rows"):
        probing.recall_at_benign_rate(logits, malicious, among=torch.zeros(6, dtype=torch.bool))


def test_probe_cli_reports_recall_per_category(tok, tmp_path, capsys):
    """``mogu probe`` end to end on a saved tiny model: recall overall and per malicious category
    in the table and probe.json, one value per layer; on --target-modules' modules."""
    from mogu.cli import main
    tiny_llama(layers=3).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rng = random.Random(1)
    rows = []
    for i in range(48):
        label = ("benign", "malicious")[i % 2]
        category = {"benign": ("benign", "borderline"), "malicious": ("malicious", "jailbreak")}[label][(i // 2) % 2]
        vocab = range(10, 14) if label == "malicious" else range(40, 44)
        rows.append({"instruction": words([rng.choice(vocab) for _ in range(5)]), "label": label,
                     "category": category})
    for name, part in (("train", rows[:32]), ("heldout", rows[32:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    assert main(["probe", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "train.jsonl"),
                 "--heldout", str(tmp_path / "heldout.jsonl"), "--out", str(tmp_path / "probe"),
                 "--target-modules", "mlp.down_proj", "--benign-rate", "0.1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.load(open(tmp_path / "probe" / probing.PROBE_FILE))
    assert report["modules"] == [f"model.layers.{l}.mlp.down_proj" for l in range(3)]
    assert report["benign_rate"] == 0.1 and len(report["recall"]) == 3
    assert sorted(report["recall_by_category"]) == ["jailbreak", "malicious"]
    # the two classes use disjoint words, so every layer's probe separates them (held-out accuracy
    # 1.0 on this model): a recall of zeros, or one that ignores the threshold rule's direction, fails
    assert min(report["recall"] + sum(report["recall_by_category"].values(), [])) >= 0.75, report
    assert "malicious caught at 10% benign" in printed and "jailbreak" in printed
    assert "probe: highest recall at 10% benign: layer" in printed


# ------------------------------------------------------------------ the dial
def test_router_offset_shifts_the_logits_exactly(release):
    model = _loaded(release)
    ids = _ids()
    with torch.no_grad(), mogu.capture_gates(model) as g0:
        model(ids)
    d = 0.75
    mogu.set_router_offset(model, d)
    assert model.mogu_config.router_offset == d
    with torch.no_grad(), mogu.capture_gates(model) as g1:
        model(ids)
    first = next(iter(g0))            # later layers see inputs the earlier gates changed
    for name in [first]:
        logit0, logit1 = torch.logit(g0[name].double()), torch.logit(g1[name].double())
        torch.testing.assert_close(logit1[..., 0], logit0[..., 0] - d, atol=2e-4, rtol=1e-4)    # unwill - d
        torch.testing.assert_close(logit1[..., 1], logit0[..., 1] + d, atol=2e-4, rtol=1e-4)    # glad + d
    with mogu.router_offset(model, 0.0):
        with torch.no_grad(), mogu.capture_gates(model) as g2:
            model(ids)
    assert model.mogu_config.router_offset == d
    for name in g0:
        torch.testing.assert_close(g2[name], g0[name])


def test_per_call_caches_made_in_inference_mode_are_normal_tensors(release):
    """The router fold and the cast experts are cached by a first call under
    torch.inference_mode (as in serving); they must still be normal tensors, because the
    C++ op keeps packed copies only of tensors with a version counter (inference tensors
    have none and would be repacked on every call). Output equals a no-cache recomputation."""
    model = _loaded(release)
    layer = next(iter(mogu.patched_modules(model).values()))
    if layer.is_folded:
        pytest.skip("release routers load folded: no fold cache to check")
    layer.weight.data = layer.weight.data.bfloat16()                  # experts stay fp32: a cast is cached
    if layer.bias is not None:
        layer.bias.data = layer.bias.data.bfloat16()
    x = torch.randn(3, layer.weight.shape[1], generator=torch.Generator().manual_seed(8)).bfloat16()
    with torch.inference_mode():
        y = layer(x)
    cached = {slot: entry[3] for slot, entry in layer._call_cache.items()}
    assert {"fold", "experts"} <= set(cached)
    for slot, tensors in cached.items():
        for t in tensors:
            assert not t.is_inference(), slot
    layer._call_cache = {}
    with torch.no_grad():
        assert torch.equal(layer(x), y)


def test_per_call_caches_follow_the_dial_the_weights_and_autograd(release):
    """The layer caches the dial-shifted router bias and the experts cast to the model dtype
    between calls; every change (dial, in-place edit, replaced or moved tensor, dtype) must
    show in the next output, which always equals an uncached float64 recomputation."""
    model = _loaded(release)
    layer = next(iter(mogu.patched_modules(model).values()))
    x = torch.randn(3, layer.weight.shape[1], generator=torch.Generator().manual_seed(5))

    def expected(layer, x):
        w, c = (t.double() for t in layer.router_vectors())
        c = c + torch.tensor([-layer.router_offset, layer.router_offset], dtype=torch.float64)
        g = torch.sigmoid(x.double() @ w.T + c)
        base = x.double() @ layer.weight.double().T + (layer.bias.double() if layer.bias is not None else 0)
        A, B = layer.lora_A.double(), layer.lora_B.double()
        delta = sum(g[:, e, None] * (x.double() @ A[e].T @ B[e].T) for e in range(2))
        return g.sum(-1, keepdim=True) * base + layer.scaling * delta

    def check():
        with torch.no_grad():
            y = layer(x)
        assert torch.allclose(y.double(), expected(layer, x), rtol=1e-4, atol=1e-5)

    for d in (0.7, 0.7, -1.3):                                    # a dial change reaches the next call
        layer.router_offset = d
        check()
    with torch.no_grad():
        layer.router_bias.add_(0.25) if layer.is_folded else layer.beta_.linear_2.bias.add_(0.25)
        layer.lora_B.mul_(1.5)                                     # in-place edits
    check()
    layer.lora_A = torch.nn.Parameter(layer.lora_A.detach() * 0.5)   # a replaced tensor
    check()
    # experts in fp32 under a bf16 base: the cast copy is cached and refreshed the same way
    layer.weight.data = layer.weight.data.bfloat16()
    if layer.bias is not None:
        layer.bias.data = layer.bias.data.bfloat16()
    xb = x.bfloat16()
    with torch.no_grad():
        first = layer(xb)
        layer.lora_B.mul_(2.0)
        second = layer(xb)
    assert not torch.equal(first, second)
    ref = expected(layer, xb.float())
    assert (second.double() - ref).abs().max() / ref.abs().max() < 3e-2
    # autograd: nothing cached, gradients reach the experts through the cast
    layer.lora_A.requires_grad_(True)
    layer(xb).float().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0


def test_router_offset_travels_with_the_folder(release, tmp_path):
    model = _loaded(release)
    mogu.set_router_offset(model, -0.5)
    mogu.save_pretrained(model, tmp_path / "m", folded=True)
    other = tiny_llama(layers=3)
    mogu.load(other, str(tmp_path / "m"))
    assert other.mogu_config.router_offset == -0.5
    assert all(layer.router_offset == -0.5 for layer in mogu.patched_modules(other).values())
    # calibration rewrites the stored dial in place; loading picks it up
    calibration.write_mogu_offset(tmp_path / "m", 1.25)
    third = tiny_llama(layers=3)
    mogu.load(third, str(tmp_path / "m"))
    assert third.mogu_config.router_offset == 1.25
    with pytest.raises(FileNotFoundError, match="mogu_config.json"):
        calibration.write_mogu_offset(tmp_path / "nothing", 1.0)


def test_dial_curve_is_monotone_and_choice_meets_target_on_synthetic_gates(release):
    """Gate-decided refusal (unwill gate > 0.5 at the last prompt token, in the last layer)
    on two synthetic populations: the curve falls monotonically as d grows, and the
    chosen point meets the benign target."""
    model = _loaded(release)
    last = list(mogu.patched_modules(model))[-1]
    ids = _ids(seed=1, n=40, t=6)
    with torch.no_grad(), mogu.capture_gates(model) as g:
        model(ids)
    base_alpha_logit = torch.logit(g[last][:, -1, 0].double())
    # two populations: the "malicious" half is shifted towards unwill through the offset-free bias
    benign_rows, malicious_rows = torch.arange(0, 40, 2), torch.arange(1, 40, 2)
    shift = base_alpha_logit.median()

    def refusal_at(d):
        with mogu.router_offset(model, d), torch.no_grad(), mogu.capture_gates(model) as gates:
            model(ids)
        logit = torch.logit(gates[last][:, -1, 0].double()) - shift
        refused_b = (logit[benign_rows] - 1.0 > 0).double().mean().item()
        refused_m = (logit[malicious_rows] + 2.0 > 0).double().mean().item()
        return refused_b, refused_m

    offsets = [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    curve = []
    for d in offsets:
        b, m = refusal_at(d)
        curve.append({"offset": d, "benign": b, "malicious": m})
    for key in ("benign", "malicious"):
        values = [r[key] for r in curve]
        assert all(a >= b for a, b in zip(values, values[1:])), (key, values)
    assert curve[0]["benign"] > 0.05 and curve[-1]["benign"] == 0.0      # the dial really moves
    chosen, met = calibration.choose_offset(curve, 0.05)
    assert met and refusal_at(chosen)[0] <= 0.05
    smaller = [r for r in curve if r["offset"] < chosen]
    assert not smaller or smaller[-1]["benign"] > 0.05                    # the safest such point


def test_choose_offset_rule():
    c = [{"offset": d, "benign": b} for d, b in [(-1, 0.5), (0, 0.2), (1, 0.04), (2, 0.1), (3, 0.0), (4, 0.0)]]
    assert calibration.choose_offset(c, 0.05) == (3.0, True)       # 1 meets it, but 2 does not: not robust
    assert calibration.choose_offset(c, 0.15) == (1.0, True)
    c = [{"offset": d, "benign": b} for d, b in [(0, 0.5), (1, 0.3), (2, 0.3)]]
    assert calibration.choose_offset(c, 0.05) == (2.0, False)      # unreachable: lowest benign rate, safest tie


def test_calibrate_end_to_end_writes_curve_and_folder(release, tok, tmp_path):
    model = _loaded(release)
    mogu.save_pretrained(model, tmp_path / "m", folded=True)
    rows = [{"instruction": words([10 + i, 11, 12 + i]), "label": "benign" if i % 2 else "malicious"} for i in range(6)]
    prompts = tmp_path / "val.json"
    prompts.write_text(json.dumps(rows))
    seen = []

    def judge(text):                        # refuses everything at d < 1: the dial must move to 1
        seen.append(model.mogu_config.router_offset)
        return model.mogu_config.router_offset < 1.0

    res = mogu.calibrate(model, tok, [str(prompts)], out=tmp_path / "cal", offsets=[-1.0, 0.0, 1.0, 2.0],
                         target_benign_refusal=0.0, mogu_dir=tmp_path / "m", max_new_tokens=3, batch_size=4,
                         judge=judge, refine=0, progress=False)
    assert sorted(set(seen)) == [-1.0, 0.0, 1.0, 2.0]
    assert [r["benign"] for r in res.curve] == [1.0, 1.0, 0.0, 0.0] and res.chosen == 1.0 and res.met_target
    assert model.mogu_config.router_offset == 1.0
    assert json.load(open(tmp_path / "m" / "mogu_config.json"))["config"]["router_offset"] == 1.0
    report = json.load(open(tmp_path / "cal" / calibration.CALIBRATION_FILE))
    assert report["chosen"] == 1.0 and len(report["curve"]) == 4

    # Refinement bisects (0, 1]: a judge that refuses below d = 0.7 moves the choice to 0.75.
    def judge_07(text):
        return model.mogu_config.router_offset < 0.7

    res = mogu.calibrate(model, tok, [str(prompts)], out=tmp_path / "cal_refined", offsets=[-1.0, 0.0, 1.0, 2.0],
                         target_benign_refusal=0.0, mogu_dir=tmp_path / "m", max_new_tokens=3, batch_size=4,
                         judge=judge_07, refine=2, progress=False)
    assert [r["offset"] for r in res.curve] == [-1.0, 0.0, 0.5, 0.75, 1.0, 2.0]
    assert res.chosen == 0.75 and res.met_target and model.mogu_config.router_offset == 0.75
    assert json.load(open(tmp_path / "m" / "mogu_config.json"))["config"]["router_offset"] == 0.75
    with pytest.raises(ValueError, match="refine"):
        mogu.calibrate(model, tok, [str(prompts)], out=tmp_path / "c3", refine=-1, progress=False)
    with pytest.raises(ValueError, match="ascending"):
        mogu.calibrate(model, tok, [str(prompts)], out=tmp_path / "c2", offsets=[1.0, 0.0], progress=False)


# ------------------------------------------------------ training with layers
def _pair_files(tmp_path, n):
    """Stage-1 pair files of n two-class rows: (affirm path, reject path) as str."""
    affirm = [{"instruction": r["instruction"], "output": r["output"]} for r in two_class_rows(n)]
    reject = [{"instruction": r["instruction"], "output": words([80, 81])} for r in two_class_rows(n)]
    a, r = tmp_path / "a.json", tmp_path / "r.json"
    a.write_text(json.dumps(affirm))
    r.write_text(json.dumps(reject))
    return str(a), str(r)


def test_experts_and_routers_on_chosen_layers_and_joint_adaptation(tok, tmp_path):
    a, r = _pair_files(tmp_path, 6)
    model = tiny_llama(layers=3)
    for expert in ("glad", "unwill"):
        mogu.train_expert(model, tok, expert, a, r, tmp_path / expert, layers=[1, 2], r=4, lr=1e-2,
                          epochs=1, pairs_per_step=2, batch_size=2, **FAST)
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "glad" / "adapter_model.safetensors"))
    assert keys and all(".layers.1." in k or ".layers.2." in k for k in keys)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in two_class_rows(8)))
    torch.manual_seed(0)
    res = mogu.train_router(model, tok, tmp_path / "glad", tmp_path / "unwill", str(data), tmp_path / "router",
                            router_hidden=8, joint=True, expert_lr=1e-2, lr=1e-2, examples_per_step=4,
                            batch_size=4, epochs=1, **FAST)
    assert res.finished
    assert model.mogu_config.layers == [1, 2]                             # inferred from the adapters
    assert list(mogu.patched_modules(model)) == ["model.layers.1.self_attn.o_proj", "model.layers.2.self_attn.o_proj"]
    trained = mogu.patched_modules(model)["model.layers.1.self_attn.o_proj"].lora_B.detach().clone()
    fresh = tiny_llama(layers=3)
    mogu.training.load_experts(fresh, tmp_path / "glad", tmp_path / "unwill")
    assert not torch.equal(mogu.patched_modules(fresh)["model.layers.1.self_attn.o_proj"].lora_B, trained), \
        "joint=True must train the experts too"
    with pytest.raises(ValueError, match="joint"):
        mogu.train_router(tiny_llama(layers=3), tok, tmp_path / "glad", tmp_path / "unwill", str(data),
                          tmp_path / "r2", expert_lr=1e-3, **FAST)


@pytest.mark.parametrize("layers", [None, [0, 2]])
def test_experts_on_another_projection_carry_their_target_into_stage_2(tok, tmp_path, layers):
    """Experts trained on mlp.down_proj (not the family's o_proj): train_router and
    load_experts take the target (and the layers) from the adapters; the saved MoGU folder
    loads onto a fresh model with the same patched modules and outputs."""
    a, r = _pair_files(tmp_path, 4)
    model = tiny_llama(layers=3)
    for expert in ("glad", "unwill"):
        mogu.train_expert(model, tok, expert, a, r, tmp_path / expert, target_modules=["mlp.down_proj"],
                          layers=layers, r=4, lr=1e-2, max_steps=1, pairs_per_step=2, batch_size=2, **FAST)
    expected = [f"model.layers.{i}.mlp.down_proj" for i in (layers or [0, 1, 2])]
    fresh = mogu.training.load_experts(tiny_llama(layers=3), tmp_path / "glad", tmp_path / "unwill")
    assert list(mogu.patched_modules(fresh)) == expected
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in two_class_rows(4)))
    mogu.train_router(model, tok, tmp_path / "glad", tmp_path / "unwill", str(data), tmp_path / "router",
                      router_hidden=8, lr=1e-2, examples_per_step=2, batch_size=2, max_steps=1, **FAST)
    assert list(mogu.patched_modules(model)) == expected
    assert model.mogu_config.target_modules == ["mlp.down_proj"] and model.mogu_config.layers == layers
    loaded = mogu.load(tiny_llama(layers=3), str(tmp_path / "router" / "folded"))
    assert list(mogu.patched_modules(loaded)) == expected
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(_ids()).logits, model.eval()(_ids()).logits, atol=1e-5)


def test_cli_calibrate_and_probe_fail_with_one_line_before_loading(tmp_path, capsys):
    from mogu.cli import main
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"instruction": "w10 w11", "label": "benign"}) + "\n")
    # the model folder does not exist: every check that names a given path comes first
    assert main(["probe", "--model", str(tmp_path / "nope"), "--train", str(tmp_path / "missing.jsonl"),
                 "--heldout", str(val), "--out", str(tmp_path / "p")]) == 1
    assert "mogu probe: error: prompt file not found" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tmp_path / "nope"), "--mogu", str(tmp_path / "no-mogu"),
                 "--prompts", str(val), "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mogu calibrate: error:") and "no-mogu" in err and "mogu_config.json" in err


# ------------------------------------------------------ probe-initialised routers
def _probe_model(layers=(0, 2), router_hidden=512, seed=0):
    model = tiny_llama(layers=3, seed=seed)
    torch.manual_seed(seed + 1)
    return mogu.patch_model(model, mogu.MoGUConfig(layers=list(layers), router_hidden=router_hidden))


@pytest.mark.parametrize("d, h", [(12, 1), (12, 5), (12, 12), (8, 20)])
def test_router_head_set_from_a_probe_folds_to_it_exactly(d, h):
    """h <= d (v in the span of an orthonormal Q) and h > d (W1 W0 = I_d): folded and
    unfolded maps are exactly v . x + c."""
    from tiny_models import rel_err
    g = torch.Generator().manual_seed(100 * d + h)
    v, c = torch.randn(d, generator=g, dtype=torch.float64) * 3, torch.randn((), generator=g, dtype=torch.float64)
    head = mogu.RouterHead(d, h)
    probing._set_router_head(head, v, c)
    v_f, c_f = head.folded()
    assert rel_err(v_f, v) < 1e-5 and rel_err(c_f, c) < 1e-5, (rel_err(v_f, v), float(c_f), float(c))
    x = torch.randn(6, d, generator=g)
    assert rel_err(head(x).squeeze(-1), x.double() @ v + c) < 1e-5
    assert head.linear_0.weight.dtype == torch.float32 and head.linear_1.bias.abs().max() == 0


@pytest.mark.parametrize("router_hidden", [8, 64])      # o_proj input width is 40: h < d and h > d
def test_init_routers_from_probe_sets_both_heads_to_the_probe(tok, router_hidden):
    rows = two_class_rows(24, seed=3)
    model = _probe_model(router_hidden=router_hidden)
    scale = 2.5
    acc = mogu.init_routers_from_probe(model, tok, rows, scale=scale)
    layers = mogu.patched_modules(model)
    assert list(acc) == list(layers) and all(0.0 <= a <= 1.0 for a in acc.values())
    # the same probe, recomputed from the documented recipe: last-token features, fit_probe
    labelled = probing._rows(rows, "rows")
    names, feats = probing.layer_features(model, tok, labelled)
    K = feats.shape[-1] // 2
    x = feats[[names.index(n) for n in layers]][:, :, K:]
    y = torch.tensor([r["label"] == 1 for r in rows], dtype=torch.float64)
    w, b = probing.fit_probe(x, y)
    from tiny_models import rel_err
    for l, layer in enumerate(layers.values()):
        assert layer.alpha_.linear_0.weight.shape == (router_hidden, 40)
        for head, sign in ((layer.alpha_, 1.0), (layer.beta_, -1.0)):          # unwill, glad
            v, c = head.folded()
            assert rel_err(v, sign * scale * w[l]) < 1e-5, rel_err(v, sign * scale * w[l])
            assert rel_err(c, sign * scale * b[l]) < 1e-5
        rw, rb = layer.router_vectors()                                      # the cached fold follows
        assert rel_err(rw[0], scale * w[l]) < 1e-5 and rel_err(rb[1], -scale * b[l]) < 1e-5


def test_probe_initialised_unwill_gate_tells_malicious_from_benign(tok):
    """On a tiny Llama whose prompts' class is decided by their words, the unwill gate at the
    last prompt token is > 0.5 on malicious and < 0.5 on benign training prompts right after
    the init; nothing but the patched layers' router heads changes."""
    rows = two_class_rows(32, seed=7)                           # labels 0/1, as in the router data
    model = _probe_model(layers=(0, 2))
    heads = ("alpha_", "beta_")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not any(h in n for h in heads)}
    old_heads = {n: p.detach().clone() for n, p in model.named_parameters() if any(h in n for h in heads)}
    acc = mogu.init_routers_from_probe(model, tok, rows)
    assert set(acc) == {"model.layers.0.self_attn.o_proj", "model.layers.2.self_attn.o_proj"}
    assert min(acc.values()) >= 0.9, acc
    after = dict(model.named_parameters())
    assert set(after) == set(before) | set(old_heads)
    for n, p in before.items():                                  # base weights, experts, unpatched layer 1
        assert torch.equal(after[n], p), n
    assert all(not torch.equal(after[n], p) for n, p in old_heads.items())
    assert isinstance(model.model.layers[1].self_attn.o_proj, torch.nn.Linear)
    assert not model.training

    unwill = {n: [] for n in acc}
    with torch.no_grad():
        for r in rows:
            with mogu.capture_gates(model) as gates:
                model(torch.tensor([mogu.prompt_ids(tok, r["instruction"])]))
            for n in acc:
                g = gates[n][0, -1]                                  # (2,) at the last prompt token
                assert abs(float(g.sum()) - 1.0) < 1e-4              # glad = 1 - unwill
                unwill[n].append(float(g[0]))
    y = [r["label"] for r in rows]
    for n, u in unwill.items():
        mal = [g > 0.5 for g, lab in zip(u, y) if lab == 1]
        ben = [g < 0.5 for g, lab in zip(u, y) if lab == 0]
        assert sum(mal) >= 0.8 * len(mal) and sum(ben) >= 0.8 * len(ben), (n, u)


def test_probe_init_logit_std_rescales_each_layer_to_that_spread(tok):
    """logit_std=s: each layer's unwill head is the same probe direction with its logits
    over the rows rescaled to standard deviation s (checked against the unscaled init)."""
    rows = two_class_rows(24, seed=5)
    raw, scaled = _probe_model(router_hidden=8), _probe_model(router_hidden=8)
    mogu.init_routers_from_probe(raw, tok, rows)
    mogu.init_routers_from_probe(scaled, tok, rows, scale=2.0, logit_std=0.7)
    labelled = probing._rows(rows, "rows")
    names, feats = probing.layer_features(scaled, tok, labelled)
    K = feats.shape[-1] // 2
    from tiny_models import rel_err
    for name, layer in mogu.patched_modules(scaled).items():
        x = feats[names.index(name)][:, K:].double()                   # (n, K) last prompt token
        v_raw, c_raw = (t.detach() for t in mogu.patched_modules(raw)[name].alpha_.folded())
        v, c = (t.detach() for t in layer.alpha_.folded())
        raw_logits = x @ v_raw.double() + c_raw.double()
        logits = x @ v.double() + c.double()
        assert abs(float(logits.std()) - 2.0 * 0.7) < 1e-4 * 1.4, float(logits.std())
        ratio = float(logits.std() / raw_logits.std())
        assert rel_err(v.double(), ratio * v_raw.double()) < 1e-5              # same direction
        assert rel_err(c.double(), ratio * c_raw.double()) < 1e-5
        assert rel_err(layer.beta_.folded()[0].detach().double(), -v.double()) < 1e-5  # glad: the negation
    with pytest.raises(ValueError, match="logit_std must be a positive number"):
        mogu.init_routers_from_probe(_probe_model(router_hidden=8), tok, rows, logit_std=0.0)


def test_train_router_starts_from_probe_initialised_heads(tok, release, tmp_path):
    """The example's wiring: patch, init from the probe, train_router keeps those heads
    (lr=0: the trained heads are the initialised ones) and loads the experts into them."""
    model = tiny_llama(layers=3)
    mogu.patch_model(model, mogu.MoGUConfig(router_hidden=16))
    rows = two_class_rows(8, seed=11)
    mogu.init_routers_from_probe(model, tok, rows)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if "alpha_" in n or "beta_" in n}
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in rows))
    mogu.train_router(model, tok, release["glad"], release["unwill"], str(data), tmp_path / "router", lr=0.0,
                      weight_decay=0.0, examples_per_step=4, batch_size=4, max_steps=1, **FAST)
    params = dict(model.named_parameters())
    for n, p in init.items():
        assert torch.equal(params[n], p), n
    expected = mogu.load_official(tiny_llama(layers=3), glad=release["glad"], unwill=release["unwill"],
                                  router=release["router"])
    for n, layer in mogu.patched_modules(expected).items():
        assert torch.equal(mogu.patched_modules(model)[n].lora_B, layer.lora_B), n


def test_init_routers_from_probe_needs_a_patched_model_with_heads(tok):
    rows = two_class_rows(8, seed=5)
    with pytest.raises(ValueError, match="not MoGU-patched.*patch_model"):
        mogu.init_routers_from_probe(tiny_llama(layers=3), tok, rows)
    model = _probe_model(router_hidden=8)
    mogu.fold_routers(model)
    with pytest.raises(ValueError, match="folded"):
        mogu.init_routers_from_probe(model, tok, rows)
    with pytest.raises(ValueError, match="init_routers_from_probe: rows needs both benign and malicious"):
        mogu.init_routers_from_probe(_probe_model(router_hidden=8), tok, rows[::2])
