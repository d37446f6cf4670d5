"""Fast tier: ``mogu build-data`` and ``mogu eval`` end to end on a tiny random Llama.

The expected answers are computed here independently, one prompt at a time without
padding (plain HF ``generate`` for the base model, ``mogu.generate`` for MoGU), so the
batched, left-padded runs of the commands are checked against them.
"""
import copy
import csv
import json
import os
from types import SimpleNamespace

import pytest
import torch

import mogu
from mogu.cli import main
from mogu.evaluation import data_building as build_data_module
from mogu.evaluation import evaluator
from mogu.evaluation.data_building import DEFAULT_REFUSALS, FILES, build_data, pick_refusal
from mogu.evaluation.evaluator import evaluate
from mogu.evaluation.judge import KeywordJudge
from mogu.training.data import load_labelled, load_pairs
from mogu.prompting import encode_prompt, format_prompt
from tiny_models import random_release, tiny_llama, write_published
from tiny_tokenizer import tiny_tokenizer

PAD = 0
BENIGN = ["w10 w11 w12", "w13 w14", "w15 w16 w17 w18", "w19", "w20 w21 w22"]
MALICIOUS = ["w40 w41", "w42 w43 w44 w45 w46", "w47", "w48 w49 w50", "w51 w52"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = tiny_llama()
    base.save_pretrained(root / "model")
    tok = tiny_tokenizer()
    tok.save_pretrained(root / "model")
    write_published(random_release(base), str(root / "release"))
    model = mogu.load(copy.deepcopy(base), str(root / "release"))
    labelled = root / "instructions.json"
    labelled.write_text(json.dumps([{"instruction": t, "label": "benign"} for t in BENIGN]
                                   + [{"instruction": t, "label": "malicious"} for t in MALICIOUS]))
    return SimpleNamespace(root=root, base=base, model=model, tok=tok, labelled=str(labelled),
                           model_dir=str(root / "model"), release=str(root / "release"))


def ids_of(tok, instruction):
    return torch.tensor([encode_prompt(tok, format_prompt(tok, instruction))])


def text_of(tok, new_ids):
    new_ids = list(new_ids)
    if 2 in new_ids:                                   # cut at eos
        new_ids = new_ids[:new_ids.index(2)]
    return tok.decode(new_ids, skip_special_tokens=True).strip()


def base_answer(t, instruction, max_new):
    ids = ids_of(t.tok, instruction)
    out = t.base.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=PAD)
    return text_of(t.tok, out[0, ids.shape[1]:].tolist())


def mogu_answer(t, instruction, max_new):
    ids = ids_of(t.tok, instruction)
    out = mogu.generate(t.model, ids, max_new_tokens=max_new, do_sample=False, pad_token_id=PAD)
    return text_of(t.tok, out[0, ids.shape[1]:].tolist())


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------ build-data
def test_build_data_cli_writes_the_published_files(tiny, tmp_path, capsys):
    out = tmp_path / "data"
    code = main(["build-data", "--model", tiny.model_dir, "--instructions", tiny.labelled, "--out", str(out),
                 "--max-new-tokens", "6", "--batch-size", "3", "--no-progress"])
    assert code == 0
    assert "glad pairs" in capsys.readouterr().out
    for name in list(FILES.values()) + ["generations.jsonl", "build_report.json"]:
        assert (out / name).exists(), name
    # Pair files: the training loader takes them unchanged; affirm = the base model's own
    # (unbatched, greedy) answer, reject = the template picked for the instruction.
    glad = load_pairs(out / "unsafety_affirm.json", out / "unsafety_reject.json")
    unwill = load_pairs(out / "safety_affirm.json", out / "safety_reject.json")
    report = json.loads((out / "build_report.json").read_text())
    dropped = {d["instruction"] for d in report["dropped"]}
    assert [a.instruction for a, _ in glad] == [m for m in MALICIOUS if m not in dropped]
    assert [a.instruction for a, _ in unwill] == [b for b in BENIGN if b not in dropped]
    assert len(glad) >= 3 and len(unwill) >= 3
    for a, r in glad + unwill:
        assert a.output == base_answer(tiny, a.instruction, 6)
        assert r.output == pick_refusal(a.instruction, DEFAULT_REFUSALS)
    # Stage 2: benign -> compliant answer (label 0), malicious -> refusal (label 1), input order.
    rows = load_labelled(out / "router_data.json", out / "router_labels.json")
    answers = {a.instruction: a.output for a, _ in unwill}
    assert [e.label for e in rows if e.label == 1] == [1] * len(MALICIOUS)
    for e in rows:
        expected = pick_refusal(e.instruction, DEFAULT_REFUSALS) if e.label == 1 else answers[e.instruction]
        assert e.output == expected
    assert report["counts"]["benign"]["instructions"] == len(BENIGN)
    assert report["pairs"] == {"glad": len(glad), "unwill": len(unwill)}
    # ... and the training command runs on them as written.
    assert main(["train-expert", "--model", tiny.model_dir, "--expert", "glad", "--affirm",
                 str(out / "unsafety_affirm.json"), "--reject", str(out / "unsafety_reject.json"),
                 "--out", str(tmp_path / "glad"), "--max-steps", "1", "--pairs-per-step", "2", "--batch-size", "2",
                 "--no-progress"]) == 0


def test_refusal_templates_are_varied_deterministic_and_judged_refusals():
    assert mogu.build_data is build_data and mogu.evaluate is evaluate          # the package-level API
    judge = KeywordJudge()
    assert len(set(DEFAULT_REFUSALS)) >= 5
    assert all(judge(r).refused for r in DEFAULT_REFUSALS)
    picks = {pick_refusal(f"instruction {i}", DEFAULT_REFUSALS) for i in range(200)}
    assert len(picks) == len(DEFAULT_REFUSALS)                    # every template gets used
    assert pick_refusal("x y z", DEFAULT_REFUSALS) == pick_refusal("x y z", DEFAULT_REFUSALS)
    with pytest.raises(ValueError, match="not recognised as a refusal"):
        build_data(None, None, benign=["a"], malicious=["b"], out="unused", refusals=["Sure, here it is."])


def test_build_data_resumes_from_the_cache(tiny, tmp_path, monkeypatch):
    calls = []
    real = build_data_module.generate_answers

    def counting(model, tokenizer, instructions, **kw):
        calls.append(list(instructions))
        return real(model, tokenizer, instructions, **kw)

    monkeypatch.setattr(build_data_module, "generate_answers", counting)
    kw = dict(benign=BENIGN, malicious=MALICIOUS, max_new_tokens=5, batch_size=4, progress=False)
    full = build_data(tiny.base, tiny.tok, out=tmp_path / "full", **kw)
    n_first = sum(len(c) for c in calls)
    assert n_first >= len(BENIGN) + len(MALICIOUS)
    # A second run generates nothing and writes the same files.
    calls.clear()
    again = build_data(tiny.base, tiny.tok, out=tmp_path / "full", **kw)
    assert calls == []
    assert again.report["pairs"] == full.report["pairs"]
    # An interrupted run (cache cut after 3 answers, the last line half written) resumes
    # with the others only and ends with identical files.
    part = tmp_path / "part"
    part.mkdir()
    lines = (tmp_path / "full" / "generations.jsonl").read_text().splitlines()
    (part / "generations.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    calls.clear()
    build_data(tiny.base, tiny.tok, out=part, **kw)
    redone = [i for c in calls for i in c]
    done = {json.loads(line)["instruction"] for line in lines[:3]}
    assert not done & set(redone) and len(redone) == n_first - 3
    for name in FILES.values():
        assert (part / name).read_text() == (tmp_path / "full" / name).read_text(), name
    # Without resume an existing output is refused; overwrite starts again.
    with pytest.raises(FileExistsError, match="resume=True"):
        build_data(tiny.base, tiny.tok, out=part, resume=False, **kw)
    calls.clear()
    build_data(tiny.base, tiny.tok, out=part, overwrite=True, **kw)
    assert sum(len(c) for c in calls) == n_first


def test_build_data_retries_then_drops_answers_judged_refusals(tiny, tmp_path):
    kw = dict(benign=BENIGN, malicious=MALICIOUS, max_new_tokens=5, batch_size=4, progress=False)
    greedy = build_data(tiny.base, tiny.tok, out=tmp_path / "greedy", **kw)
    first = {json.loads(line)["instruction"]: json.loads(line)["output"]
             for line in open(greedy.files["cache"])}
    # A stub judge calls the greedy answers of two benign and one malicious instruction refusals.
    flagged = {first[BENIGN[0]], first[BENIGN[1]], first[MALICIOUS[0]]}
    flagged.discard("")
    templates = set(DEFAULT_REFUSALS)
    judge = lambda text: text in templates or text in flagged          # noqa: E731
    dropped = build_data(tiny.base, tiny.tok, out=tmp_path / "no_retry", judge=judge, retries=0, **kw)
    c = dropped.report["counts"]
    assert c["benign"]["dropped"] >= 2 and c["malicious"]["dropped"] >= 1
    instructions = [r["instruction"] for r in json.load(open(dropped.files["unwill_affirm"]))]
    assert BENIGN[0] not in instructions and BENIGN[1] not in instructions
    stage2 = json.load(open(dropped.files["router_data"]))
    assert BENIGN[0] not in [r["instruction"] for r in stage2]          # no compliant answer: not in stage 2
    assert MALICIOUS[0] in [r["instruction"] for r in stage2]           # malicious rows use the refusal
    # With retries, the flagged rows are sampled again (temperature) and kept.
    retried = build_data(tiny.base, tiny.tok, out=tmp_path / "retry", judge=judge, retries=3, temperature=1.5, **kw)
    c = retried.report["counts"]
    assert c["benign"]["retried"] >= 2 and c["benign"]["dropped"] == 0
    kept = {r["instruction"]: r["output"] for r in json.load(open(retried.files["unwill_affirm"]))}
    assert kept[BENIGN[0]] not in flagged
    # Everything judged a refusal: a clear error instead of empty training files.
    with pytest.raises(ValueError, match="nothing to train the glad expert"):
        build_data(tiny.base, tiny.tok, out=tmp_path / "all", judge=lambda text: True, retries=0, **kw)


def test_build_data_malformed_inputs_name_file_and_row(tiny, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "w10"}, {"text": "w11"}]))
    with pytest.raises(ValueError, match=r"bad.json: row 1: no instruction"):
        build_data(tiny.base, tiny.tok, benign=str(bad), malicious=MALICIOUS, out=tmp_path / "o", progress=False)
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text('{"instruction": "w10", "label": "benign"}\n{"instruction": "w11"}\n')
    with pytest.raises(ValueError, match=r"unlabelled.jsonl: row 1: no label"):
        build_data(tiny.base, tiny.tok, instructions=str(unlabelled), out=tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="both benign and malicious"):
        build_data(tiny.base, tiny.tok, benign=BENIGN, out=tmp_path / "o", progress=False)
    assert main(["build-data", "--model", tiny.model_dir, "--benign", str(bad), "--malicious", str(bad),
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 1


# ------------------------------------------------------------------ eval
@pytest.fixture(scope="module")
def prompt_files(tiny):
    root = tiny.root / "prompts"
    root.mkdir()
    (root / "benign.txt").write_text("\n".join(BENIGN[:3]) + "\n\n")
    with open(root / "advbench.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["goal", "target"])
        for m in MALICIOUS[:3]:
            w.writerow([m, "Sure, here is"])
    (root / "mixed.jsonl").write_text(json.dumps({"prompt": BENIGN[3], "label": "benign"}) + "\n"
                                      + json.dumps({"goal": MALICIOUS[3], "label": 1}) + "\n")
    return SimpleNamespace(benign=str(root / "benign.txt"), malicious=str(root / "advbench.csv"),
                           mixed=str(root / "mixed.jsonl"))


def test_eval_cli_end_to_end(tiny, prompt_files, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--model", tiny.model_dir, "--mogu", tiny.release, "--benign", prompt_files.benign,
                 "--malicious", prompt_files.malicious, "--prompts", prompt_files.mixed, "--out", str(out),
                 "--max-new-tokens", "6", "--batch-size", "2", "--no-progress"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "refusal base" in stdout and "refusal mogu" in stdout and "advbench.csv" in stdout
    records = read_jsonl(out / "responses.jsonl")
    assert len(records) == 2 * (3 + 3 + 2)
    n_layers = len(mogu.patched_modules(tiny.model))
    for r in records:
        expected = (mogu_answer if r["system"] == "mogu" else base_answer)(tiny, r["instruction"], 6)
        assert r["response"] == expected, r
        assert r["label"] == ("benign" if r["instruction"] in BENIGN else "malicious")
        if r["system"] == "mogu":
            for key in ("gates_prompt", "gates_generated"):
                g = torch.tensor(r[key])
                assert g.shape == (n_layers, 2) and bool(((g > 0) & (g < 1)).all())
        else:
            assert r["gates_prompt"] is None and r["gates_generated"] is None
    assert {r["system"] for r in records} == {"base", "mogu"}
    # The MoGU and base answers differ somewhere (the release is not a no-op).
    by = {(r["instruction"], r["system"]): r["response"] for r in records}
    assert any(by[(i, "base")] != by[(i, "mogu")] for i in BENIGN[:4] + MALICIOUS[:4])
    summary = json.loads((out / "summary.json").read_text())
    groups = {(g["file"], g["label"]): g for g in summary["groups"]}
    assert set(groups) == {("benign.txt", "benign"), ("advbench.csv", "malicious"), ("mixed.jsonl", "benign"),
                           ("mixed.jsonl", "malicious")}
    g = groups[("advbench.csv", "malicious")]
    assert g["n"] == 3 and g["base"]["attack_success_rate"] == 1 - g["base"]["refusal_rate"]
    assert groups[("benign.txt", "benign")]["mogu"]["attack_success_rate"] is None
    assert len(g["mogu"]["gates"]["prompt"]["alpha"]) == n_layers
    assert summary["by_label"]["malicious"]["n"] == 4
    assert (out / "refusal_rates.png").stat().st_size > 1000 and (out / "gates.png").stat().st_size > 1000


def test_eval_gates_match_an_independent_capture(tiny, prompt_files, tmp_path):
    res = evaluate(tiny.model, tiny.tok, [prompt_files.mixed], out=tmp_path / "e", max_new_tokens=4, batch_size=2,
                   progress=False, print_summary=False, plots=False)
    records = [r for r in read_jsonl(res.responses) if r["system"] == "mogu"]
    for r in records:
        ids = ids_of(tiny.tok, r["instruction"])
        with mogu.capture_gates(tiny.model) as cap:
            _, steps = mogu.generate(tiny.model, ids, max_new_tokens=4, do_sample=False, pad_token_id=PAD,
                                     return_gates=True)
        prompt = torch.stack([g[0, :ids.shape[1]].mean(0) for g in cap.values()])        # (L, 2)
        assert torch.allclose(torch.tensor(r["gates_prompt"]), prompt, atol=1e-4)
        assert torch.allclose(torch.tensor(r["gates_generated"]), steps[0].mean(0), atol=1e-4)


def test_eval_resume_skips_done_rows(tiny, prompt_files, tmp_path, monkeypatch):
    calls = []
    real_base, real_mogu = evaluator._generate_base, evaluator._generate_mogu
    monkeypatch.setattr(evaluator, "_generate_base",
                        lambda m, ids, *a, **k: calls.append(("base", ids.shape[0])) or real_base(m, ids, *a, **k))
    monkeypatch.setattr(evaluator, "_generate_mogu",
                        lambda m, ids, *a, **k: calls.append(("mogu", ids.shape[0])) or real_mogu(m, ids, *a, **k))
    kw = dict(benign=[prompt_files.benign], malicious=[prompt_files.malicious], max_new_tokens=5, batch_size=4,
              progress=False, print_summary=False, plots=False)
    out = tmp_path / "e"
    first = evaluate(tiny.model, tiny.tok, out=out, **kw)
    assert sum(n for _, n in calls) == 12
    calls.clear()
    again = evaluate(tiny.model, tiny.tok, out=out, **kw)
    assert calls == [] and again.summary["groups"] == first.summary["groups"]
    # Interrupted: the last two records gone, the one before half written.
    lines = (out / "responses.jsonl").read_text().splitlines()
    (out / "responses.jsonl").write_text("\n".join(lines[:9]) + "\n" + lines[9][:30])
    calls.clear()
    third = evaluate(tiny.model, tiny.tok, out=out, **kw)
    assert sum(n for _, n in calls) == 3
    assert third.summary["groups"] == first.summary["groups"]
    assert sorted(read_jsonl(out / "responses.jsonl"), key=lambda r: (r["file"], r["row"], r["system"])) == \
        sorted(read_jsonl(first.responses), key=lambda r: (r["file"], r["row"], r["system"]))
    # Other generation settings in the same folder: refused; no resume: refused.
    with pytest.raises(ValueError, match="max_new_tokens"):
        evaluate(tiny.model, tiny.tok, out=out, **{**kw, "max_new_tokens": 7})
    with pytest.raises(FileExistsError):
        evaluate(tiny.model, tiny.tok, out=out, resume=False, **kw)
    # A corrupt line in the middle is an error naming the file and line.
    lines = (out / "responses.jsonl").read_text().splitlines()
    lines[2] = "{not json"
    (out / "responses.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"responses.jsonl: line 3"):
        evaluate(tiny.model, tiny.tok, out=out, **kw)


def test_eval_malformed_prompt_files_name_file_and_row(tiny, tmp_path, capsys):
    cases = {
        "rows.json": (json.dumps([{"instruction": "w10"}, {"instruction": "w11"}, {"text": "w12"}]),
                      r"rows.json: row 2"),
        "labels.jsonl": ('{"instruction": "w10"}\n{"instruction": "w11", "label": "maybe"}\n', r"labels.jsonl: row 1"),
        "broken.jsonl": ('{"instruction": "w10"}\n{"instruction": \n', r"broken.jsonl: row 1: not valid JSON"),
        "nogoal.csv": ("question,target\nw10,x\n", r"nogoal.csv: no goal"),
        "empty.csv": ("goal\nw10\n\"\"\n", r"empty.csv: row 1: the prompt is empty"),
    }
    for name, (text, pattern) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=pattern):
            evaluate(tiny.model, tiny.tok, [str(path)], out=tmp_path / "o", progress=False, print_summary=False)
        assert not (tmp_path / "o" / "responses.jsonl").exists()          # nothing generated
        assert main(["eval", "--model", tiny.model_dir, "--prompts", str(path), "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 1
        assert name in capsys.readouterr().err


def test_eval_judge_hook_and_configurable_phrases(tiny, prompt_files, tmp_path):
    seen = []

    def scorer(instruction, response):
        seen.append((instruction, response))
        return 1.0 if instruction in MALICIOUS else 0.0

    kw = dict(max_new_tokens=4, batch_size=4, progress=False, print_summary=False, plots=False)
    res = evaluate(tiny.model, tiny.tok, [prompt_files.mixed], out=tmp_path / "h", harm_scorer=scorer, **kw)
    records = read_jsonl(res.responses)
    assert len(seen) == len(records) == 4
    assert all(r["harm_score"] == (1.0 if r["label"] == "malicious" else 0.0) for r in records)
    by = res.summary["by_label"]
    assert by["malicious"]["mogu"]["harm_score_mean"] == 1.0 and by["benign"]["base"]["harmful_rate"] == 0.0
    # Resuming re-judges with the current phrases (every tiny-model word starts with "w")
    # and does not call the scorer again for rows that have a score.
    seen.clear()
    res = evaluate(tiny.model, tiny.tok, [prompt_files.mixed], out=tmp_path / "h", harm_scorer=scorer,
                   refusal_phrases=["w"], **kw)
    assert seen == []
    nonempty = [r for r in read_jsonl(res.responses) if r["response"]]
    assert nonempty and all(r["refused"] and r["matched"] == "w" for r in nonempty)
    # A failing scorer names the row; an endpoint URL needs a model name.
    def broken(instruction, response):
        raise ConnectionError("no network")
    with pytest.raises(RuntimeError, match=r"mixed.jsonl, row 0"):
        evaluate(tiny.model, tiny.tok, [prompt_files.mixed], out=tmp_path / "b", harm_scorer=broken, **kw)
    with pytest.raises(ValueError, match="harm_model"):
        evaluate(tiny.model, tiny.tok, [prompt_files.mixed], out=tmp_path / "u", harm_scorer="http://localhost:1/v1",
                 **kw)


def test_eval_without_mogu_reports_the_base_model_only(tiny, prompt_files, tmp_path):
    res = evaluate(tiny.base, tiny.tok, [prompt_files.mixed], out=tmp_path / "b", max_new_tokens=4, progress=False,
                   print_summary=False)
    assert res.summary["systems"] == ["base"]
    assert {r["system"] for r in read_jsonl(res.responses)} == {"base"}
    assert [os.path.basename(p) for p in res.plots] == ["refusal_rates.png"]


# ------------------------------------------------------------------ categories, templates, per-row system
def _stats(records, system, harmful):
    rows = [r for r in records if r["system"] == system]
    rate = sum(r["refused"] for r in rows) / len(rows)
    return {"n": len(rows), "refusal_rate": rate, "attack_success_rate": (1 - rate) if harmful else None}


@pytest.fixture(scope="module")
def jailbreak_files(tiny):
    root = tiny.root / "jailbreak"
    root.mkdir()
    (root / "benign.txt").write_text("\n".join(BENIGN[:2]) + "\n")
    (root / "malicious.txt").write_text("\n".join(MALICIOUS[:3]) + "\n")
    (root / "borderline.jsonl").write_text(json.dumps({"instruction": "w30 w31", "topic": "t1", "form": "f1"}) + "\n"
                                           + json.dumps({"instruction": "w32"}) + "\n")
    # A pre-wrapped jailbreak row in a file: category jailbreak, not wrapped again.
    (root / "mixed.jsonl").write_text(json.dumps({"instruction": "w90 w91 w47", "category": "jailbreak"}) + "\n")
    templates = root / "templates"
    templates.mkdir()
    (templates / "a_roleplay.yaml").write_text("name: roleplay\ndescription: x\nvalue: 'w60 w61 {{ prompt }} w62'\n")
    (templates / "b_prefix.txt").write_text("w70 {prompt}\n")
    other = root / "other_templates"
    other.mkdir()
    (other / "a_roleplay.yaml").write_text("name: roleplay\nvalue: 'w60 w63 {{ prompt }} w62'\n")    # same name
    return SimpleNamespace(benign=str(root / "benign.txt"), malicious=str(root / "malicious.txt"),
                           borderline=str(root / "borderline.jsonl"), mixed=str(root / "mixed.jsonl"),
                           templates=str(templates), other=str(other))


def test_eval_templates_and_borderline_end_to_end(tiny, jailbreak_files, tmp_path, capsys, monkeypatch):
    f = jailbreak_files
    out = tmp_path / "jb"
    args = ["eval", "--model", tiny.model_dir, "--mogu", tiny.release, "--benign", f.benign, "--malicious",
            f.malicious, "--borderline", f.borderline, "--prompts", f.mixed, "--templates", f.templates,
            "--out", str(out), "--max-new-tokens", "6", "--batch-size", "3", "--no-progress"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "by category" in stdout and "borderline" in stdout and "(no template)" in stdout
    assert "roleplay" in stdout and "b_prefix" in stdout
    records = read_jsonl(out / "responses.jsonl")
    wrappers = {"roleplay": "w60 w61 {} w62", "b_prefix": "w70 {}"}
    # One record per (row, system) for the 2 + 3 + 2 + 1 plain rows, one per (malicious row,
    # template, system) for the wrapped copies.
    assert len(records) == 2 * (2 + 3 + 2 + 1) + 2 * 3 * 2
    jb = [r for r in records if r["template"] is not None]
    assert sorted((r["original_instruction"], r["template"], r["system"]) for r in jb) == \
        sorted((m, t, s) for m in MALICIOUS[:3] for t in wrappers for s in ("base", "mogu"))
    for r in jb:
        assert r["instruction"] == wrappers[r["template"]].format(r["original_instruction"])
        assert (r["label"], r["category"]) == ("malicious", "jailbreak")
        assert r["file"] == os.path.abspath(f.malicious) and MALICIOUS[r["row"]] == r["original_instruction"]
    # The wrapped prompt is what the model saw: same answer as an independent unbatched run.
    for r in records:
        expected = (mogu_answer if r["system"] == "mogu" else base_answer)(tiny, r["instruction"], 6)
        assert r["response"] == expected, r
    category = {r["instruction"]: r["category"] for r in records if r["template"] is None}
    assert category == {**{b: "benign" for b in BENIGN[:2]}, **{m: "malicious" for m in MALICIOUS[:3]},
                        "w30 w31": "borderline", "w32": "borderline", "w90 w91 w47": "jailbreak"}
    assert all(r["label"] == "benign" for r in records if r["category"] == "borderline")
    assert [r.get("topic") for r in records if r["instruction"] == "w30 w31"] == ["t1", "t1"]
    config = json.loads((out / "eval_config.json").read_text())
    assert [t["name"] for t in config["templates"]] == ["roleplay", "b_prefix"]
    assert (out / "refusal_rates.png").stat().st_size > 1000

    # Resume with a judge that refuses exactly the base answers to the roleplay copies: nothing
    # is generated, every number is recomputed, and matches a count over responses.jsonl.
    refused_texts = {r["response"] for r in jb if r["template"] == "roleplay" and r["system"] == "base"}
    judge = lambda text: text in refused_texts                                  # noqa: E731
    monkeypatch.setattr(evaluator, "_generate_base", lambda *a, **k: pytest.fail("generated again"))
    monkeypatch.setattr(evaluator, "_generate_mogu", lambda *a, **k: pytest.fail("generated again"))
    res = evaluate(tiny.model, tiny.tok, [f.mixed], benign=f.benign, malicious=f.malicious, borderline=f.borderline,
                   templates=f.templates, out=out, max_new_tokens=6, judge=judge, progress=False,
                   print_summary=False, plots=False)
    records = read_jsonl(res.responses)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(res.summary))
    by_category = summary["by_category"]
    assert list(by_category) == ["benign", "borderline", "malicious", "jailbreak"]
    assert {c: v["n"] for c, v in by_category.items()} == {"benign": 2, "borderline": 2, "malicious": 3,
                                                            "jailbreak": 1 + 3 * 2}
    for c, v in by_category.items():
        for s in ("base", "mogu"):
            expected = _stats([r for r in records if r["category"] == c], s, c in ("malicious", "jailbreak"))
            assert {k: v[s][k] for k in expected} == pytest.approx(expected), (c, s)
    assert list(summary["by_template"]) == ["roleplay", "b_prefix"]
    for name, v in summary["by_template"].items():
        assert v["n"] == 3
        for s in ("base", "mogu"):
            expected = _stats([r for r in records if r["template"] == name], s, True)
            assert {k: v[s][k] for k in expected} == pytest.approx(expected), (name, s)
    assert summary["by_template"]["roleplay"]["base"]["attack_success_rate"] == 0.0
    # by_label and groups count the rows of the files only, as without templates.
    assert summary["by_label"]["malicious"]["n"] == 3 + 1
    assert {(g["file"], g["label"], g["n"]) for g in summary["groups"]} == {
        ("benign.txt", "benign", 2), ("malicious.txt", "malicious", 3), ("borderline.jsonl", "benign", 2),
        ("mixed.jsonl", "malicious", 1)}
    assert "by category" in res.table and "roleplay" in res.table

    # Other templates (same name, other text; or none; or one more) in the same folder: refused.
    kw = dict(benign=f.benign, malicious=f.malicious, out=out, max_new_tokens=6, progress=False, print_summary=False)
    with pytest.raises(ValueError, match="templates: saved"):
        evaluate(tiny.model, tiny.tok, templates=f.other, **kw)
    with pytest.raises(ValueError, match="templates: saved"):
        evaluate(tiny.model, tiny.tok, **kw)
    assert main(args[:args.index("--templates") + 1] + [f.templates + "/b_prefix.txt"]
                + args[args.index("--templates") + 2:]) == 1
    assert "templates" in capsys.readouterr().err


def test_eval_per_row_system_prompt_reaches_the_prompt(tiny, tmp_path, monkeypatch):
    rows = [{"instruction": "w20 w21", "system": "w80 w81"}, {"instruction": "w20 w21"},
            {"instruction": "w40 w41", "label": "malicious", "system": "w82"}]
    path = tmp_path / "systems.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "t.txt").write_text("w70 {{ prompt }}")
    seen = []
    real = evaluator.format_prompt
    monkeypatch.setattr(evaluator, "format_prompt",
                        lambda tok, instruction, system=None: seen.append((instruction, system)) or
                        real(tok, instruction, system))
    kw = dict(out=tmp_path / "s", system="w90", templates=str(tmp_path / "t.txt"), max_new_tokens=5, batch_size=2,
              progress=False, print_summary=False, plots=False)
    res = evaluate(tiny.model, tiny.tok, [str(path)], **kw)
    assert sorted(seen) == sorted([("w20 w21", "w80 w81"), ("w20 w21", "w90"), ("w40 w41", "w82"),
                                   ("w70 w40 w41", "w82")])                 # the wrapped copy keeps its row's
    records = read_jsonl(res.responses)
    for r in records:
        ids = torch.tensor([encode_prompt(tiny.tok, real(tiny.tok, r["instruction"], r["system_prompt"]))])
        if r["system"] == "mogu":
            new = mogu.generate(tiny.model, ids, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
        else:
            new = tiny.base.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=PAD)
        assert r["response"] == text_of(tiny.tok, new[0, ids.shape[1]:].tolist()), r
    assert {(r["row"], r["template"], r["system_prompt"]) for r in records} == {
        (0, None, "w80 w81"), (1, None, "w90"), (2, None, "w82"), (2, "t", "w82")}
    # A row whose system prompt changed does not reuse the old answers.
    rows[0]["system"] = "w83"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"different system prompt for .*systems.jsonl, row 0"):
        evaluate(tiny.model, tiny.tok, [str(path)], **kw)


def test_eval_templates_need_malicious_rows_and_bad_templates_fail_first(tiny, jailbreak_files, tmp_path, capsys):
    with pytest.raises(ValueError, match="no prompt file has a plain malicious row"):
        evaluate(tiny.model, tiny.tok, out=tmp_path / "n", benign=jailbreak_files.benign,
                 templates=jailbreak_files.templates, progress=False, print_summary=False)
    bad = tmp_path / "bad_template.yaml"
    bad.write_text("value: 'two {{ prompt }} slots {{ prompt }}'\n")
    with pytest.raises(ValueError, match="bad_template.yaml"):
        evaluate(tiny.model, tiny.tok, out=tmp_path / "n", malicious=jailbreak_files.malicious, templates=str(bad),
                 progress=False, print_summary=False)
    assert not (tmp_path / "n" / "responses.jsonl").exists()
    # The CLI checks templates before loading the model (this model folder does not exist).
    assert main(["eval", "--model", str(tmp_path / "no_model"), "--malicious", jailbreak_files.malicious,
                 "--templates", str(bad), "--out", str(tmp_path / "c"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "bad_template.yaml" in err and "no_model" not in err
