"""Training (issue 6): data, stage-1 experts, stage-2 routers, resume/overwrite, CLI.

Tiny random models (tests/tiny_models.py) and an offline word-level tokenizer without a
chat template (tests/tiny_tokenizer.py: word ``w<i>`` is token id i), so prompts use the
Llama-2 ``[INST]`` template and token ids are known exactly.
"""
import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

import mogu
from mogu.training import data as mdata
from mogu.training import load_experts, train_expert, train_router
from mogu.training.data import DataError
from mogu.training.losses import GateCollector, expert_loss, ratio_loss, router_loss, sequence_ce
from tiny_models import random_release, rel_err, tiny_falcon, tiny_llama, write_published
from tiny_tokenizer import tiny_tokenizer, words

BOS, EOS, INST, EINST, SYS, ESYS = 1, 2, 4, 5, 6, 7
FAST = dict(progress=False, save_steps=None)


# ------------------------------------------------------------------ helpers
def dump(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return str(path)


def dump_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def pair_rows(n, seed=0):
    """n aligned (affirm, reject) rows with instructions of varying length."""
    rng = random.Random(seed)
    affirm, reject = [], []
    for i in range(n):
        ins = words([rng.randrange(10, 50) for _ in range(rng.randint(2, 5))])
        affirm.append({"instruction": ins, "output": words([60 + i % 3, 61, 62])})
        reject.append({"instruction": ins, "output": words([80, 81 + i % 2])})
    return affirm, reject


def pair_files(tmp_path, n=6, seed=0):
    a, r = pair_rows(n, seed)
    return dump(tmp_path / "affirm.json", a), dump(tmp_path / "reject.json", r)


def two_class_rows(n=16, seed=0):
    """Labelled rows whose instructions come from two disjoint word sets (1: w10..w13, 0: w40..w43)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = i % 2
        pool = range(10, 14) if y else range(40, 44)
        rows.append({"instruction": words([rng.choice(pool) for _ in range(rng.randint(6, 8))]),
                     "output": words([60, 61, 62] if y else [70, 71, 72, 73]), "label": y})
    return rows


def params_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A published-layout release (random experts r=4 and routers) for tiny_llama()."""
    return write_published(random_release(tiny_llama()), str(tmp_path_factory.mktemp("release")))


# =================================================================== data
def test_llama2_prompt_template_and_response_labels(tok):
    assert mdata.prompt_ids(tok, "w10 w11") == [BOS, INST, 10, 11, EINST]
    assert mdata.prompt_ids(tok, "w10", system="w90 w91") == [BOS, INST, SYS, 90, 91, ESYS, 10, EINST]
    ex = mdata.Example("w10 w11", "w20 w21", path="x.json", row=3)
    f = mdata.tokenize_example(tok, ex, max_length=64)
    assert f["input_ids"] == [BOS, INST, 10, 11, EINST, 20, 21, EOS]
    assert f["labels"] == [-100] * 5 + [20, 21, EOS]
    cut = mdata.tokenize_example(tok, ex, max_length=6)                 # cut at the end
    assert cut["input_ids"] == [BOS, INST, 10, 11, EINST, 20] and cut["labels"] == [-100] * 5 + [20]
    with pytest.raises(DataError, match=r"x\.json, row 3: .*max_length=5"):
        mdata.tokenize_example(tok, ex, max_length=5)                   # no response token fits


def test_chat_template_is_used_when_present():
    tok = tiny_tokenizer(chat_template="{% for m in messages %}<s> [INST] {% if m['role'] == 'system' %}<<SYS>> "
                                       "{{ m['content'] }} <</SYS>> {% else %}{{ m['content'] }} {% endif %}"
                                       "{% endfor %}{% if add_generation_prompt %}[/INST]{% endif %}")
    # The template writes its own <s>: no second bos is added.
    assert mdata.prompt_ids(tok, "w10 w11") == [BOS, INST, 10, 11, EINST]
    assert mdata.prompt_ids(tok, "w10", system="w90") == [BOS, INST, SYS, 90, ESYS, BOS, INST, 10, EINST]


def test_collators_pad_right_and_mask(tok):
    feats = [{"affirm": {"input_ids": [1, 10, 11], "labels": [-100, 11, 2]},
              "reject": {"input_ids": [1, 10, 12, 13, 2], "labels": [-100, -100, 12, 13, 2]}},
             {"affirm": {"input_ids": [1, 20], "labels": [-100, 20]},
              "reject": {"input_ids": [1, 21, 22], "labels": [-100, 21, 22]}}]
    b = mdata.PairCollator(pad_id=0)(feats)
    assert b["input_ids"].shape == (4, 5) and b["input_ids"].dtype == torch.long
    assert b["input_ids"][0].tolist() == [1, 10, 11, 0, 0] and b["input_ids"][2].tolist() == [1, 10, 12, 13, 2]
    assert b["attention_mask"][1].tolist() == [1, 1, 0, 0, 0]
    assert b["labels"][3].tolist() == [-100, 21, 22, -100, -100]
    s = mdata.LabelledCollator(pad_id=0)([{"input_ids": [1, 10], "labels": [-100, 10], "label": 1},
                                          {"input_ids": [1], "labels": [5], "label": 0}])
    assert s["label"].tolist() == [1, 0] and s["attention_mask"].tolist() == [[1, 1], [1, 0]]


# ============================================================ stage 1: loss
def hand_ce(model, ids, labels):
    """Mean next-token CE over labelled tokens of ONE unpadded sequence, by log-softmax gather."""
    logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    terms = [-logp[t - 1, labels[t]] for t in range(1, len(ids)) if labels[t] != -100]
    return torch.stack(terms).mean()


@pytest.mark.parametrize("expert", ["glad", "unwill"])
def test_ratio_loss_matches_hand_computation(tok, tmp_path, expert):
    model = tiny_llama()
    a, r = pair_files(tmp_path, n=3)
    feats = mdata.tokenize_pairs(tok, mdata.load_pairs(a, r), 64)
    batch = mdata.PairCollator(0)(feats)                # padded: pairs and answers differ in length
    with torch.no_grad():
        loss, stats = expert_loss(model, batch, expert)
        hand = []
        for f in feats:
            ca = hand_ce(model, f["affirm"]["input_ids"], f["affirm"]["labels"])
            cr = hand_ce(model, f["reject"]["input_ids"], f["reject"]["labels"])
            hand.append(ca / cr if expert == "glad" else cr / ca)
    lengths = {len(f[k]["input_ids"]) for f in feats for k in ("affirm", "reject")}
    assert len(lengths) > 2 and batch["input_ids"].shape[1] == max(lengths)   # padding is exercised
    assert loss.shape == (3,)
    torch.testing.assert_close(loss.double(), torch.stack(hand), rtol=1e-5, atol=0)
    torch.testing.assert_close(ratio_loss(stats["ce_affirm"], stats["ce_reject"], expert), loss)
    with pytest.raises(ValueError, match="expert"):
        ratio_loss(stats["ce_affirm"], stats["ce_reject"], "safe")
    with pytest.raises(ValueError, match="no labelled"):            # a row without answer tokens
        sequence_ce(torch.zeros(2, 3, 5), torch.tensor([[-100, 1, 2], [-100, -100, -100]]))


def test_train_expert_optimises_the_ratio_loss(tok, tmp_path):
    """Step 1's loss (before any update, LoRA B = 0) is the hand-computed mean ratio over
    all pairs (one step = all 4 pairs, in file order), and the loss then decreases."""
    model = tiny_llama()
    a, r = pair_files(tmp_path, n=4)
    feats = mdata.tokenize_pairs(tok, mdata.load_pairs(a, r), 64)
    with torch.no_grad():
        hand = torch.stack([hand_ce(model, f["affirm"]["input_ids"], f["affirm"]["labels"]) /
                            hand_ce(model, f["reject"]["input_ids"], f["reject"]["labels"]) for f in feats]).mean()
    before = params_snapshot(model)
    res = train_expert(model, tok, "glad", a, r, tmp_path / "glad", lr=1e-2, lora_dropout=0.0, pairs_per_step=4,
                       batch_size=2, epochs=8, shuffle=False, **FAST)
    assert res.global_step == 8 and res.finished and len(res.losses) == 8
    assert res.losses[0] == pytest.approx(float(hand), rel=1e-5)
    assert res.losses[-1] < res.losses[0] - 0.05
    assert all(y < x for x, y in zip(res.losses, res.losses[1:]))
    # The caller's model is back to itself: no LoRA modules left, weights untouched.
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    log = [json.loads(l) for l in open(res.log_file)]
    assert [l["step"] for l in log] == list(range(1, 9))
    assert [l["loss"] for l in log] == res.losses and {"ce_affirm", "ce_reject"} <= set(log[0])


def test_batch_size_does_not_change_the_objective(tok, tmp_path):
    a, r = pair_files(tmp_path, n=4)
    runs = [train_expert(tiny_llama(), tok, "unwill", a, r, tmp_path / f"bs{bs}", lr=1e-2, lora_dropout=0.0,
                         pairs_per_step=4, batch_size=bs, epochs=2, **FAST).losses for bs in (1, 4)]
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "falcon"])
def test_saved_adapter_loads_with_peft_and_load_official(tok, tmp_path, family):
    from peft import PeftModel

    make = tiny_llama if family == "llama" else tiny_falcon
    a, r = pair_files(tmp_path, n=4)
    outs = {}
    for expert in ("glad", "unwill"):
        outs[expert] = tmp_path / expert
        train_expert(make(), tok, expert, a, r, outs[expert], lr=1e-2, pairs_per_step=2, epochs=1, **FAST)
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(outs[expert]))
    router = write_published(random_release(make()), str(tmp_path / "rel"), model_type=family)["router"]
    model = make()
    mogu.load_official(model, glad=outs["glad"], unwill=outs["unwill"], router=router)
    x = torch.tensor([[1, 4, 10, 11, 5, 20]])
    for expert in ("glad", "unwill"):
        peft_model = PeftModel.from_pretrained(make(), str(outs[expert])).eval()
        lora_B = [m for n, m in peft_model.named_modules() if n.endswith("lora_B.default")]
        assert lora_B and all(m.weight.abs().max() > 0 for m in lora_B)       # really trained
        with torch.no_grad(), mogu.mode(model, expert):
            torch.testing.assert_close(model(x).logits, peft_model(x).logits, rtol=1e-5, atol=1e-5)


def test_stage1_resume_is_bitwise_the_uninterrupted_run(tok, tmp_path):
    """Default LoRA dropout (RNG!), shuffled epochs; interrupted mid-epoch, last checkpoint lost."""
    a, r = pair_files(tmp_path, n=6)
    kw = dict(lr=1e-2, pairs_per_step=2, epochs=2, progress=False)
    full = train_expert(tiny_llama(), tok, "glad", a, r, tmp_path / "full", save_steps=None, **kw)
    part = train_expert(tiny_llama(), tok, "glad", a, r, tmp_path / "part", save_steps=2, max_steps=5, **kw)
    assert part.global_step == 5 and part.finished
    ckpts = sorted(os.listdir(tmp_path / "part" / "checkpoints"))
    assert ckpts == ["step-00000002", "step-00000004", "step-00000005"]
    import shutil
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-00000005")     # as if killed after step 5
    resumed = train_expert(tiny_llama(), tok, "glad", a, r, tmp_path / "part", save_steps=2, resume=True, **kw)
    assert resumed.global_step == 6 and len(resumed.losses) == 2
    assert resumed.losses == full.losses[4:]
    wf = load_file(tmp_path / "full" / "adapter_model.safetensors")
    wp = load_file(tmp_path / "part" / "adapter_model.safetensors")
    assert wf.keys() == wp.keys() and all(torch.equal(wf[k], wp[k]) for k in wf)
    assert [json.loads(l)["loss"] for l in open(resumed.log_file)] == full.losses     # log truncated, then continued
    with pytest.raises(ValueError, match="lr"):
        train_expert(tiny_llama(), tok, "glad", a, r, tmp_path / "part", save_steps=2, resume=True,
                     **{**kw, "lr": 1e-3})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_expert(tiny_llama(), tok, "glad", a, r, tmp_path / "nothing", resume=True, **kw)


def test_overwrite_refusal(tok, tmp_path):
    a, r = pair_files(tmp_path, n=2)
    out = tmp_path / "out"
    (out / "checkpoints" / "step-00000099").mkdir(parents=True)
    (out / "checkpoints" / "step-00000099" / "state.json").write_text("{}")
    (out / "notes.txt").write_text("keep me")
    model = tiny_llama()
    with pytest.raises(FileExistsError, match="overwrite"):
        train_expert(model, tok, "glad", a, r, out, pairs_per_step=2, epochs=1, **FAST)
    assert not (out / "adapter_config.json").exists() and not any("lora" in n for n, _ in model.named_parameters())
    train_expert(model, tok, "glad", a, r, out, pairs_per_step=2, epochs=1, overwrite=True, **FAST)
    assert (out / "adapter_model.safetensors").exists() and (out / "notes.txt").read_text() == "keep me"
    assert os.listdir(out / "checkpoints") == ["step-00000001"]          # the stale checkpoint is gone
    with pytest.raises(FileExistsError):
        train_router(model, tok, out, out, a, tmp_path / "out", labels=dump(tmp_path / "l.json", [0, 1]), **FAST)


# ========================================================= bad data: stage 1/2
def _rows(n=3):
    return pair_rows(n)[0]


BAD_STAGE1 = {
    # name: (affirm rows or raw text, reject rows or raw text, file named in the error, row, message part)
    "missing_output": (lambda a, r: (a[:1] + [{"instruction": a[1]["instruction"]}] + a[2:], r), "affirm", 1,
                       "missing field 'output'"),
    "missing_instruction": (lambda a, r: (a, [{"output": "w80"}] + r[1:]), "reject", 0, "missing field 'instruction'"),
    "not_a_string": (lambda a, r: (a[:2] + [{"instruction": a[2]["instruction"], "output": 7}], r), "affirm", 2,
                     "must be a string"),
    "empty_field": (lambda a, r: (a, r[:1] + [{"instruction": r[1]["instruction"], "output": "  "}] + r[2:]),
                    "reject", 1, "'output' is empty"),
    "row_not_object": (lambda a, r: (["w10"] + a[1:], r), "affirm", 0, "expected an object"),
    "different_lengths": (lambda a, r: (a, r[:2]), "reject", 2, "misaligned files"),
    "different_instructions": (lambda a, r: (a, r[:1] + [{**r[1], "instruction": "w90"}] + r[2:]), "reject", 1,
                               "instruction differs"),
    "empty_list": (lambda a, r: ([], r), "affirm", None, "no rows"),
    "empty_file": (lambda a, r: ("", r), "affirm", None, "file is empty"),
    "invalid_json": (lambda a, r: (a, "[{\"instruction\": "), "reject", None, "not valid JSON"),
}


def _write(path, content):
    if isinstance(content, str):
        path.write_text(content)
        return str(path)
    return dump(path, content)


@pytest.mark.parametrize("case", sorted(BAD_STAGE1))
def test_bad_stage1_data_is_rejected_before_training(tok, tmp_path, case):
    make, which, row, message = BAD_STAGE1[case]
    a, r = make(*pair_rows(3))
    files = {"affirm": _write(tmp_path / "affirm.json", a), "reject": _write(tmp_path / "reject.json", r)}
    model = tiny_llama()
    before = params_snapshot(model)
    with pytest.raises(DataError) as err:
        train_expert(model, tok, "glad", files["affirm"], files["reject"], tmp_path / "out", **FAST)
    text = str(err.value)
    assert files[which] in text and message in text and err.value.path == files[which]
    assert err.value.row == row and (row is None or f"row {row}" in text)
    assert not (tmp_path / "out").exists()                                 # nothing written, no step run
    assert params_snapshot(model).keys() == before.keys()


BAD_STAGE2 = {
    # name: (data rows (or raw text), labels (list, raw text or None), file named, row, message part)
    "label_two": (lambda d: (d, [0, 1, 2]), "labels", 2, "label must be 0 or 1, got 2"),
    "label_bool": (lambda d: (d, [0, True, 1]), "labels", 1, "got true"),
    "label_string": (lambda d: (d, ["1", 0, 1]), "labels", 0, "got \"1\""),
    "labels_too_short": (lambda d: (d, [0, 1]), "labels", 2, "misaligned labels"),
    "labels_too_long": (lambda d: (d, [0, 1, 1, 0]), "labels", 3, "misaligned labels"),
    "labels_not_a_list": (lambda d: (d, {"0": 1}), "labels", None, "expected a JSON list"),
    "labels_empty": (lambda d: (d, []), "labels", None, "no rows"),
    "data_missing_output": (lambda d: (d[:2] + [{"instruction": "w10"}], [0, 1, 1]), "data", 2,
                            "missing field 'output'"),
    "inline_label_missing": (lambda d: ([{**d[0], "label": 1}] + d[1:], None), "data", 1, "missing field 'label'"),
    "inline_label_bad": (lambda d: ([{**x, "label": -1} for x in d], None), "data", 0, "got -1"),
}


@pytest.mark.parametrize("case", sorted(BAD_STAGE2))
def test_bad_stage2_data_is_rejected_before_training(tok, tmp_path, release, case):
    make, which, row, message = BAD_STAGE2[case]
    d, labels = make(pair_rows(3)[0])
    files = {"data": _write(tmp_path / "data.json", d),
             "labels": None if labels is None else _write(tmp_path / "labels.json", labels)}
    model = tiny_llama()
    with pytest.raises(DataError) as err:
        train_router(model, tok, release["glad"], release["unwill"], files["data"], tmp_path / "out",
                     labels=files["labels"], **FAST)
    text = str(err.value)
    assert files[which] in text and message in text
    assert err.value.row == row and (row is None or f"row {row}" in text)
    assert not (tmp_path / "out").exists() and not mogu.is_patched(model)


def test_bad_jsonl_line_and_long_prompt(tok, tmp_path, release):
    d = tmp_path / "data.jsonl"
    d.write_text(json.dumps({"instruction": "w10", "output": "w20", "label": 1}) + "\n\n{oops\n")
    with pytest.raises(DataError, match=r"data\.jsonl, row 1: line 3 is not valid JSON"):
        train_router(tiny_llama(), tok, release["glad"], release["unwill"], str(d), tmp_path / "out", **FAST)
    a, r = pair_files(tmp_path, n=3)
    with pytest.raises(DataError, match=r"affirm\.json, row \d: the prompt is \d+ tokens"):
        train_expert(tiny_llama(), tok, "glad", a, r, tmp_path / "out", max_length=4, **FAST)
    assert not (tmp_path / "out").exists()


# ========================================================== stage 2: routers
def test_router_training_separates_classes_and_changes_only_routers(tok, tmp_path, release):
    data = dump_jsonl(tmp_path / "data.jsonl", two_class_rows(16))       # labels inline, JSONL
    model = tiny_llama()
    torch.manual_seed(3)
    load_experts(model, release["glad"], release["unwill"], mogu.MoGUConfig(router_hidden=16))
    before = params_snapshot(model)
    res = train_router(model, tok, release["glad"], release["unwill"], data, tmp_path / "out", lr=5e-2,
                       examples_per_step=4, batch_size=4, epochs=12, **FAST)
    assert res.global_step == 48 and res.finished

    router_names = [n for n in before if ".alpha_." in n or ".beta_." in n]
    assert router_names
    for n, p in model.named_parameters():
        if n in router_names:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"{n} changed but is not a router parameter"

    def mean_alpha(m):
        m.eval()
        per_class = {0: [], 1: []}
        with torch.no_grad():
            for f in mdata.tokenize_labelled(tok, mdata.load_labelled(data), 64):
                with mogu.capture_gates(m) as gates:
                    m(torch.tensor([f["input_ids"]]))
                per_class[f["label"]].append(torch.stack([g[..., 0] for g in gates.values()]).mean())
        return {y: float(torch.stack(v).mean()) for y, v in per_class.items()}

    alpha = mean_alpha(model)
    assert alpha[1] > 0.8 and alpha[0] < 0.2, alpha
    log = [json.loads(l) for l in open(res.log_file)]
    assert log[-1]["alpha_malicious"] > log[0]["alpha_malicious"] and log[-1]["alpha_benign"] < log[0]["alpha_benign"]

    # The outputs load back: own format and the folded deployment copy give the same gates.
    for folder in (tmp_path / "out", tmp_path / "out" / "folded"):
        other = tiny_llama()
        mogu.load(other, str(folder))
        assert mean_alpha(other) == pytest.approx(alpha, abs=1e-5)


@pytest.mark.parametrize("gate_tokens", ["all", "prompt"])
def test_router_loss_formula(tok, release, gate_tokens):
    """Per example: CE + lam * (mean over layers and gate tokens of (a - t_a)^2 + (b - t_b)^2),
    the gate tokens every real token ("all") or the prompt's ("prompt")."""
    model = tiny_llama()
    mogu.load_official(model, **release)
    model.eval()
    examples = [mdata.Example("w10 w11 w12", "w20", 1), mdata.Example("w40", "w30 w31", 0)]
    feats = mdata.tokenize_labelled(tok, examples, 64)
    batch = mdata.LabelledCollator(0)(feats)
    collector = GateCollector(model).install()
    try:
        with torch.no_grad():
            loss, stats = router_loss(model, batch, collector, lam=2.0, gate_tokens=gate_tokens)
    finally:
        collector.remove()
    for i, f in enumerate(feats):
        with torch.no_grad(), mogu.capture_gates(model) as gates:
            ce = hand_ce(model, f["input_ids"], f["labels"])
        g = torch.stack(list(gates.values())).double()                     # (L, 1, T, 2)
        if gate_tokens == "prompt":
            prompt_len = sum(1 for lab in f["labels"] if lab == mdata.IGNORE_INDEX)
            assert 0 < prompt_len < g.shape[2]
            g = g[:, :, :prompt_len]
        t = torch.tensor([f["label"], 1 - f["label"]], dtype=torch.double)
        expected = ce + 2.0 * ((g - t) ** 2).mean(dim=(0, 1, 2)).sum()
        assert float(loss[i]) == pytest.approx(float(expected), rel=1e-5)
        assert float(stats["alpha"][i]) == pytest.approx(float(g[..., 0].mean()), rel=1e-5)
    with pytest.raises(ValueError, match="gate_tokens"):
        router_loss(model, batch, collector, gate_tokens="response")


def _cpu_fused_backends():
    import mogu_kernels
    return [b for b in mogu_kernels.available_backends("cpu") if b != "reference"]


def _router_grads(model, tok, backends, monkeypatch, device="cpu"):
    """{backend: {head param name: grad}} of the stage-2 loss on one padded two-class batch."""
    model.to(device).eval()              # eval: no LoRA dropout, so every layer calls mogu_linear
    heads = {n: p for n, p in model.named_parameters() if ".alpha_." in n or ".beta_." in n}
    for n, p in model.named_parameters():
        p.requires_grad_(n in heads)
    rows = two_class_rows(4)
    feats = mdata.tokenize_labelled(tok, [mdata.Example(r["instruction"], r["output"], r["label"]) for r in rows], 64)
    batch = {k: v.to(device) for k, v in mdata.LabelledCollator(0)(feats).items()}
    collector = GateCollector(model).install()
    grads = {}
    try:
        for name in backends:
            monkeypatch.setenv("MOGU_BACKEND", name)
            model.zero_grad(set_to_none=True)
            loss, _ = router_loss(model, batch, collector)
            loss.sum().backward()
            grads[name] = {n: p.grad.clone() for n, p in heads.items()}
    finally:
        collector.remove()
    return grads


@pytest.mark.parametrize("backend", _cpu_fused_backends())
def test_router_gradient_through_fused_op_equals_reference(tok, release, monkeypatch, backend):
    from mogu_kernels.dispatch import registered_backends

    model = tiny_llama()
    mogu.load_official(model, **release)
    calls = {"n": 0}
    impl = registered_backends()[backend]

    def counting(real):
        def call(*args, **kw):
            calls["n"] += 1
            return real(*args, **kw)
        return call

    monkeypatch.setattr(impl, "fn", counting(impl.fn))
    if impl.fast is not None:               # mogu_linear calls the fast entry first (Backend.fast)
        monkeypatch.setattr(impl, "fast", counting(impl.fast))
    grads = _router_grads(model, tok, ["reference", backend], monkeypatch)
    assert calls["n"] == len(mogu.patched_modules(model))               # the fused backend really ran
    for n, g in grads["reference"].items():
        assert rel_err(grads[backend][n], g) < 1e-4, n


def test_router_resume_batching_and_checkpointing(tok, tmp_path, release):
    data = dump(tmp_path / "data.json", [{k: r[k] for k in ("instruction", "output")} for r in two_class_rows(8)])
    labels = dump(tmp_path / "labels.json", [r["label"] for r in two_class_rows(8)])
    kw = dict(labels=labels, router_hidden=16, lr=1e-2, examples_per_step=4, epochs=2, progress=False)
    full = train_router(tiny_llama(), tok, release["glad"], release["unwill"], data, tmp_path / "full",
                        batch_size=4, save_steps=None, **kw)
    assert full.global_step == 4
    part = train_router(tiny_llama(), tok, release["glad"], release["unwill"], data, tmp_path / "part",
                        batch_size=4, save_steps=1, max_steps=3, **kw)
    resumed = train_router(tiny_llama(), tok, release["glad"], release["unwill"], data, tmp_path / "part",
                           batch_size=4, save_steps=1, resume=True, **kw)
    assert part.losses + resumed.losses == full.losses
    wf = load_file(tmp_path / "full" / "mogu_model.safetensors")
    wp = load_file(tmp_path / "part" / "mogu_model.safetensors")
    assert all(torch.equal(wf[k], wp[k]) for k in wf)
    # Same objective with batch size 1 and with gradient checkpointing (non-reentrant: gates keep autograd).
    for name, extra in (("bs1", dict(batch_size=1)), ("gc", dict(batch_size=2, gradient_checkpointing=True))):
        model = tiny_llama()
        other = train_router(model, tok, release["glad"], release["unwill"], data, tmp_path / name,
                             save_steps=None, **{**kw, **extra})
        assert other.losses == pytest.approx(full.losses, rel=1e-4), name
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


# ===================================================================== CLI
def test_cli_help_documents_every_option_and_default(capsys):
    from mogu.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for command in ("train-expert", "train-router"):
        p = sub.choices[command]
        for action in p._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help and ("default" in action.help or action.required), (command, action.dest)
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = capsys.readouterr().out
        assert "published" in text and ("5e-05" in text if command == "train-expert" else "0.0005" in text)


def test_cli_trains_both_stages(tok, tmp_path):
    from mogu.cli import main

    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    a, r = pair_files(tmp_path, n=4)
    common = ["--model", str(model_dir), "--max-steps", "1", "--no-progress", "--epochs", "1"]
    for expert in ("glad", "unwill"):
        assert main(["train-expert", "--expert", expert, "--affirm", a, "--reject", r, "--out",
                     str(tmp_path / expert), "--pairs-per-step", "2", "--batch-size", "2"] + common) == 0
    labels = dump(tmp_path / "labels.json", [1, 0, 1, 0])
    assert main(["train-router", "--glad", str(tmp_path / "glad"), "--unwill", str(tmp_path / "unwill"),
                 "--data", a, "--labels", labels, "--out", str(tmp_path / "mogu"), "--router-hidden", "8",
                 "--examples-per-step", "2"] + common) == 0
    model = tiny_llama()
    mogu.load(model, str(tmp_path / "mogu" / "folded"))
    assert all(layer.is_folded for layer in mogu.patched_modules(model).values())
    # An existing output folder is one error line (exit 1), reported before the model loads.
    assert main(["train-expert", "--expert", "glad", "--affirm", a, "--reject", r, "--out", str(tmp_path / "glad")]
                + common) == 1


def test_router_init_from_published_file_and_bf16_keeps_mogu_params_fp32(tok, tmp_path, release):
    """router=FILE starts from that file (lr=0 leaves it as is); bf16 casts the base model
    but keeps experts and routers in fp32, holding exactly the adapters' and file's values."""
    data = dump_jsonl(tmp_path / "data.jsonl", two_class_rows(4))
    model = tiny_llama()
    train_router(model, tok, release["glad"], release["unwill"], data, tmp_path / "out", router=release["router"],
                 lr=0.0, weight_decay=0.0, examples_per_step=4, batch_size=2, max_steps=1, bf16=True, **FAST)
    ref = tiny_llama()
    mogu.load_official(ref, **release)
    assert model.lm_head.weight.dtype == torch.bfloat16
    trained, expected = mogu.patched_modules(model), mogu.patched_modules(ref)
    for name, layer in trained.items():
        assert layer.weight.dtype == torch.bfloat16
        for pname, p in layer.named_parameters():
            if pname in ("weight", "bias"):
                continue
            assert p.dtype == torch.float32, (name, pname)
            assert torch.equal(p, dict(expected[name].named_parameters())[pname]), (name, pname)


def test_stage1_bf16_trains_fp32_lora(tok, tmp_path):
    a, r = pair_files(tmp_path, n=2)
    model = tiny_llama()
    res = train_expert(model, tok, "glad", a, r, tmp_path / "out", pairs_per_step=2, batch_size=2, max_steps=2,
                       lr=1e-2, bf16=True, **FAST)
    assert res.global_step == 2 and model.lm_head.weight.dtype == torch.bfloat16
    w = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert w and all(t.dtype == torch.float32 for t in w.values())


@pytest.mark.gpu
def test_router_training_on_gpu_bf16_uses_fused_backward(tok, tmp_path, release, monkeypatch):
    """On CUDA the default backend (fused) trains the routers in bf16 and agrees with the
    reference backend's router gradient."""
    import mogu_kernels

    device = torch.device("cuda")
    assert mogu_kernels.resolve_backend(device).name != "reference"
    data = dump_jsonl(tmp_path / "data.jsonl", two_class_rows(8))
    model = tiny_llama()
    res = train_router(model, tok, release["glad"], release["unwill"], data, tmp_path / "out", router_hidden=16,
                       lr=5e-2, examples_per_step=4, batch_size=4, epochs=4, bf16=True, **FAST)
    assert res.global_step == 8 and all(torch.isfinite(torch.tensor(res.losses)))
    assert res.losses[-1] < res.losses[0]
    assert next(model.parameters()).device.type == "cuda"
    fp32 = tiny_llama()
    mogu.load_official(fp32, **release)
    fused = mogu_kernels.resolve_backend(device).name
    grads = _router_grads(fp32, tok, ["reference", fused], monkeypatch, device=device)
    for n, g in grads["reference"].items():
        assert rel_err(grads[fused][n], g) < 1e-3, n
