"""mogu.generate: the published decoding protocol, token-exact, on tiny random Llama and Falcon.

The reference is written here, independent of mogu's own layer: the published procedure
runs m greedy MoGU steps WITHOUT a cache (re-encoding the whole prefix each step) on an
unpatched copy that computes the published layer math through hooks, then lets a second,
plain copy of the base model continue from prompt + those tokens with HF ``generate``.
"""
import copy
import io
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationMixin
from transformers.generation.streamers import BaseStreamer

import mogu
from mogu import generation, hf_compat
from mogu.prompting import encode_prompt, format_chat, format_prompt
from tiny_models import VOCAB, published_reference_hooks, random_release, rel_err, tiny_llama, write_published

EOS, PAD = 2, 0


def tiny_falcon_untied(seed: int = 0):
    """tiny_models.tiny_falcon ties the embeddings, so its greedy output just repeats the
    current token whatever the layers do; untied, MoGU and base visibly differ."""
    from transformers import FalconConfig, FalconForCausalLM
    torch.manual_seed(seed)
    cfg = FalconConfig(vocab_size=VOCAB, hidden_size=40, num_hidden_layers=2, num_attention_heads=4, bias=True,
                       new_decoder_architecture=False, multi_query=True, parallel_attn=True, bos_token_id=1,
                       eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    return FalconForCausalLM(cfg).eval()


BUILDERS = {"llama": tiny_llama, "falcon": tiny_falcon_untied}


@pytest.fixture(scope="module", params=["llama", "falcon"])
def fam(request, tmp_path_factory):
    """base: the plain model; model: a MoGU-patched copy with a random published release;
    ref: an unpatched copy computing the published MoGU layer (float64 hooks)."""
    base = BUILDERS[request.param]()
    rel = random_release(base)
    paths = write_published(rel, str(tmp_path_factory.mktemp(f"release_{request.param}")), model_type=request.param)
    model = mogu.load_official(copy.deepcopy(base), **paths)
    ref = copy.deepcopy(base)
    ref_gates = {}
    published_reference_hooks(ref, rel, ref_gates)
    return SimpleNamespace(name=request.param, base=base, model=model, ref=ref, ref_gates=ref_gates, rel=rel)


def prompt(seed: int, length: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def greedy(**kw):
    return dict(do_sample=False, pad_token_id=PAD, **kw)


@torch.no_grad()
def published_procedure(fam, ids, m, max_new, eos=None):
    """The published protocol for one prompt (1, L): m no-cache MoGU steps, then the base model."""
    seq = ids
    for _ in range(min(m, max_new)):
        token = fam.ref(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, token], dim=-1)
        if eos is not None and token.item() == eos:
            return seq
    rest = max_new - (seq.shape[1] - ids.shape[1])
    if rest > 0:
        seq = fam.base.generate(seq, max_new_tokens=rest, **greedy(eos_token_id=eos))
    return seq


def new_tokens(out, prompt_len):
    return out[:, prompt_len:].tolist()


# ------------------------------------------------------------------ parity
def test_exact_matches_published_procedure(fam):
    """Token-exact vs the published procedure: several prompt lengths, m values, max_new < m."""
    cases = [(seed, length, 5, 10) for seed in range(3) for length in (1, 6, 19)]
    cases += [(3, 7, 2, 8), (4, 11, 1, 6), (5, 4, 5, 3), (6, 9, 0, 6)]
    differs_from_base = differs_from_cached = 0
    for seed, length, m, max_new in cases:
        ids = prompt(seed, length)
        out = mogu.generate(fam.model, ids, max_new_tokens=max_new, mogu_tokens=m, **greedy(eos_token_id=None))
        expected = published_procedure(fam, ids, m, max_new)
        assert out.tolist() == expected.tolist(), (fam.name, seed, length, m, max_new)
        assert out.shape[1] == length + max_new
        plain = fam.base.generate(ids, max_new_tokens=max_new, **greedy(eos_token_id=None))
        cached = mogu.generate(fam.model, ids, max_new_tokens=max_new, mogu_tokens=m, protocol="cached",
                               **greedy(eos_token_id=None))
        differs_from_base += out.tolist() != plain.tolist()
        differs_from_cached += out.tolist() != cached.tolist()
        if m == 0:
            assert out.tolist() == plain.tolist()
    # The release changes the tokens, and the base view of the prefix matters: a wrong
    # protocol (base model never used, or base reading the MoGU cache) would fail above.
    assert differs_from_base >= len(cases) // 2
    assert differs_from_cached >= 3


def test_exact_without_cache_or_with_a_bare_cache(fam):
    """The other cache paths: no cache (every forward re-encodes the whole sequence, in
    mode "mogu" then "base") and a user-made DynamicCache, emptied and refilled by the
    base prefill in place; same tokens."""
    from transformers import DynamicCache

    for seed, length in ((7, 3), (8, 10)):
        ids = prompt(seed, length)
        kw = dict(max_new_tokens=8, mogu_tokens=4, **greedy(eos_token_id=None))
        cached = mogu.generate(fam.model, ids, **kw)
        assert mogu.generate(fam.model, ids, use_cache=False, **kw).tolist() == cached.tolist()
        user_cache = {hf_compat.cache_kwarg(): DynamicCache()}     # 'cache' or 'past_key_values' by release
        assert mogu.generate(fam.model, ids, **user_cache, **kw).tolist() == cached.tolist()
        # the user's object holds the base model's cache of the whole sequence but its last token
        assert next(iter(user_cache.values())).get_seq_length() == length + 8 - 1
        assert cached.tolist() == published_procedure(fam, ids, 4, 8).tolist()


def test_batched_left_padded_equals_one_by_one(fam):
    lengths = [4, 9, 1, 6]
    prompts = [prompt(10 + i, n) for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - p.shape[1]:] = p[0]
        mask[i, width - p.shape[1]:] = 1
    for protocol in ("exact", "cached", "always"):
        out = mogu.generate(fam.model, ids, attention_mask=mask, max_new_tokens=9, mogu_tokens=3,
                            protocol=protocol, **greedy(eos_token_id=EOS))
        for i, p in enumerate(prompts):
            alone = mogu.generate(fam.model, p, max_new_tokens=9, mogu_tokens=3, protocol=protocol,
                                  **greedy(eos_token_id=EOS))[0, p.shape[1]:].tolist()
            row = out[i, width:].tolist()
            assert row[:len(alone)] == alone, (fam.name, protocol, i)
            assert all(t == PAD for t in row[len(alone):])        # finished early: padded like HF
            if len(alone) < 9:
                assert alone[-1] == EOS


def test_cached_and_always_match_hand_mode_switches(fam):
    model, m, max_new = fam.model, 4, 10
    for seed, length in ((20, 5), (21, 12)):
        ids = prompt(seed, length)
        kw = greedy(eos_token_id=None)
        with mogu.mode(model, "mogu"):
            always_hand = GenerationMixin.generate(model, ids, max_new_tokens=max_new, **kw)
            first = GenerationMixin.generate(model, ids, max_new_tokens=m, return_dict_in_generate=True, **kw)
        with mogu.mode(model, "base"):
            cached_hand = GenerationMixin.generate(model, first.sequences,
                                                   **{hf_compat.cache_kwarg(): hf_compat.output_cache(first)},
                                                   max_new_tokens=max_new - m, **kw)
        always = mogu.generate(model, ids, max_new_tokens=max_new, mogu_tokens=m, protocol="always", **kw)
        cached = mogu.generate(model, ids, max_new_tokens=max_new, mogu_tokens=m, protocol="cached", **kw)
        assert always.tolist() == always_hand.tolist()
        assert cached.tolist() == cached_hand.tolist()
        assert mogu.get_mode(model) == "mogu"                       # modes restored


def test_eos_in_mogu_phase_ends_the_sequence(fam):
    model, m = fam.model, 5
    for seed in range(30, 60):                 # a prompt whose 2nd-4th MoGU token is new: use it as eos
        ids = prompt(seed, 6)
        free = mogu.generate(model, ids, max_new_tokens=12, mogu_tokens=m, **greedy(eos_token_id=None))[0, 6:].tolist()
        k = next((k for k in range(1, m - 1) if free[k] not in free[:k] and free[k] != PAD), None)
        if k is not None:
            break
    else:
        pytest.fail("no prompt with a fresh token inside the MoGU phase")
    eos = free[k]
    out, gates = mogu.generate(model, ids, max_new_tokens=12, mogu_tokens=m, return_gates=True,
                               **greedy(eos_token_id=eos))
    assert out[0, 6:].tolist() == free[:k + 1]                      # stops right at the eos
    assert out.tolist() == published_procedure(fam, ids, m, 12, eos=eos).tolist()
    assert gates.shape[1] == k + 1
    # In a batch the finished row is padded while the other row goes on.
    other = prompt(99, 6)
    both = mogu.generate(model, torch.cat([ids, other]), max_new_tokens=12, mogu_tokens=m,
                         **greedy(eos_token_id=eos))
    other_alone = mogu.generate(model, other, max_new_tokens=12, mogu_tokens=m, **greedy(eos_token_id=eos))
    assert both[0, 6:7 + k].tolist() == free[:k + 1]
    assert all(t == PAD for t in both[0, 7 + k:].tolist())
    assert both[1, :other_alone.shape[1]].tolist() == other_alone[0].tolist()


# ------------------------------------------------------------------ gates
def test_gates_per_mogu_token_match_published_router(fam):
    model, m = fam.model, 4
    ids = prompt(40, 7)
    out, gates = mogu.generate(model, ids, max_new_tokens=8, mogu_tokens=m, return_gates=True,
                               **greedy(eos_token_id=None))
    names = list(mogu.patched_modules(model))
    assert gates.shape == (1, m, len(names), 2) and gates.dtype == torch.float32
    with torch.no_grad():
        for t in range(m):
            fam.ref(out[:, :7 + t], use_cache=False)               # the position that chose token t
            expected = torch.stack([fam.ref_gates[n][:, -1] for n in names], dim=1)   # (1, L, 2)
            assert rel_err(gates[:, t], expected) < 1e-4
    # "always" records every token; m = 0 records none.
    _, g_always = mogu.generate(model, ids, max_new_tokens=6, protocol="always", return_gates=True,
                                **greedy(eos_token_id=None))
    _, g_none = mogu.generate(model, ids, max_new_tokens=6, mogu_tokens=0, return_gates=True,
                              **greedy(eos_token_id=None))
    assert g_always.shape == (1, 6, len(names), 2) and g_none.shape == (1, 0, len(names), 2)
    # Batched exact protocol: each row's gates are its MoGU row's (not the base copy's).
    other = prompt(41, 7)
    _, g2 = mogu.generate(model, torch.cat([other, ids]), max_new_tokens=8, mogu_tokens=m, return_gates=True,
                          **greedy(eos_token_id=None))
    assert rel_err(g2[1], gates[0]) < 1e-5
    # capture_gates around generate sees the MoGU rows only: prompt + (m - 1) decode positions.
    with mogu.capture_gates(model) as captured:
        mogu.generate(model, torch.cat([other, ids]), max_new_tokens=8, mogu_tokens=m, **greedy(eos_token_id=None))
    assert all(g.shape == (2, 7 + m - 1, 2) for g in captured.values())


# ------------------------------------------------------------------ HF conventions
def test_model_generate_on_patched_model_follows_protocol(fam):
    model, base = fam.model, fam.base
    ids = prompt(50, 8)
    kw = greedy(eos_token_id=None, max_new_tokens=9)
    exact = mogu.generate(model, ids, **kw)
    assert isinstance(model.__dict__.get("generate"), generation.MoGUGenerate)
    assert model.generate(ids, **kw).tolist() == exact.tolist()
    assert model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).tolist() == exact.tolist()
    assert model.generate(ids, protocol="always", **kw).tolist() == \
        mogu.generate(model, ids, protocol="always", **kw).tolist()
    plain = base.generate(ids, **kw)
    assert exact.tolist() != plain.tolist()                         # so the comparisons above can fail
    with mogu.mode(model, "base"):                                  # an explicit mode: plain HF generate
        assert model.generate(ids, **kw).tolist() == plain.tolist()
        with pytest.raises(ValueError, match="mode 'mogu'"):
            model.generate(ids, protocol="exact", **kw)
    twin = copy.deepcopy(model)
    assert twin.generate.model is twin
    assert twin.generate(ids, **kw).tolist() == exact.tolist()
    mogu.unpatch(twin)
    assert "generate" not in twin.__dict__
    assert twin.generate(ids, **kw).tolist() == plain.tolist()


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ends += 1


def test_streamer_receives_prompt_then_each_token(fam):
    ids = prompt(60, 5)
    for call in (lambda s: mogu.generate(fam.model, ids, max_new_tokens=7, streamer=s, **greedy(eos_token_id=None)),
                 lambda s: fam.model.generate(ids, max_new_tokens=7, streamer=s, **greedy(eos_token_id=None))):
        rec = Recorder()
        out = call(rec)
        assert rec.puts[0] == ids.tolist()
        assert [p for step in rec.puts[1:] for p in step] == out[0, 5:].tolist()
        assert len(rec.puts) == 1 + 7 and rec.ends == 1


def test_sampling_is_seeded_and_uses_processors(fam):
    ids = prompt(70, 6)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.95, pad_token_id=PAD, eos_token_id=None)
    torch.manual_seed(0)
    a = mogu.generate(fam.model, ids, **kw)
    torch.manual_seed(0)
    b = mogu.generate(fam.model, ids, **kw)
    assert a.tolist() == b.tolist()
    draws = set()
    for seed in range(1, 6):
        torch.manual_seed(seed)
        draws.add(tuple(mogu.generate(fam.model, ids, **kw)[0].tolist()))
    assert len(draws) > 1                                           # it really samples
    # top_k=1 sampling must pick what greedy picks in both phases (MoGU rows, then base).
    greedy_out = mogu.generate(fam.model, ids, max_new_tokens=10, **greedy(eos_token_id=None))
    top1 = mogu.generate(fam.model, ids, max_new_tokens=10, do_sample=True, top_k=1, pad_token_id=PAD,
                         eos_token_id=None)
    assert top1.tolist() == greedy_out.tolist()
    torch.manual_seed(1)
    many = mogu.generate(fam.model, ids, num_return_sequences=3, **kw)
    assert many.shape == (3, 16)


def test_return_dict_scores_and_stopping_criteria(fam):
    from transformers import StoppingCriteria, StoppingCriteriaList

    ids = prompt(80, 5)
    out = mogu.generate(fam.model, ids, max_new_tokens=6, return_dict_in_generate=True, output_scores=True,
                        output_logits=True, **greedy(eos_token_id=None))
    plain = mogu.generate(fam.model, ids, max_new_tokens=6, **greedy(eos_token_id=None))
    assert out.sequences.tolist() == plain.tolist()
    assert len(out.scores) == 6 and out.scores[0].shape == (1, VOCAB)
    assert [int(s.argmax()) for s in out.scores] == plain[0, 5:].tolist()
    cache = hf_compat.output_cache(out)
    assert cache.get_seq_length() == 5 + 6 - 1 and cache.layers[0].keys.shape[0] == 1   # base rows only

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 5 + 3, dtype=torch.bool)

    short = mogu.generate(fam.model, ids, max_new_tokens=6, stopping_criteria=StoppingCriteriaList([StopAfter()]),
                          **greedy(eos_token_id=None))
    assert short.tolist() == plain[:, :8].tolist()


# ------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors():
    model = tiny_llama()
    ids = prompt(0, 4)
    with pytest.raises(ValueError, match="not MoGU-patched"):
        mogu.generate(model, ids, max_new_tokens=2)
    mogu.patch_model(model)
    with pytest.raises(ValueError, match="empty prompt"):
        mogu.generate(model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="empty prompt in row"):
        mogu.generate(model, torch.cat([ids, ids]), attention_mask=torch.tensor([[1] * 4, [0] * 4]),
                      max_new_tokens=2)
    with pytest.raises(ValueError, match="mogu_tokens must be an integer >= 0"):
        mogu.generate(model, ids, mogu_tokens=-1, max_new_tokens=2)
    with pytest.raises(ValueError, match="unknown protocol"):
        mogu.generate(model, ids, protocol="sometimes", max_new_tokens=2)
    with pytest.raises(ValueError, match="beam search"):
        mogu.generate(model, ids, num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="shape \\(batch, prompt_length\\)"):
        mogu.generate(model, ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="mogu_tokens must be an integer >= 0"):
        model.generate(ids, mogu_tokens=-1, max_new_tokens=2)
    with pytest.raises(ValueError, match="static|DynamicCache"):
        mogu.generate(model, ids, max_new_tokens=2, cache_implementation="static")
    assert mogu.get_mode(model) == "mogu" and all(l.base_rows is None for l in mogu.patched_modules(model).values())


# ------------------------------------------------------------------ prompting and CLI
def test_prompt_formats():
    from tiny_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    assert format_prompt(tok, "w10 w11") == "<s>[INST] w10 w11 [/INST]"
    assert format_prompt(tok, "w10", system="w9") == "<s>[INST] <<SYS>>\nw9\n<</SYS>>\n\nw10 [/INST]"
    chat = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w10"},
            {"role": "assistant", "content": "w11"}, {"role": "user", "content": "w12"}]
    assert format_chat(tok, chat) == "<s>[INST] <<SYS>>\nw9\n<</SYS>>\n\nw10 [/INST] w11 </s><s>[INST] w12 [/INST]"
    assert encode_prompt(tok, format_prompt(tok, "w10 w11")) == [1, 4, 10, 11, 5]
    with pytest.raises(ValueError, match="end with a user message"):
        format_chat(tok, chat[:3])
    with pytest.raises(ValueError, match="alternate"):
        format_chat(tok, [{"role": "assistant", "content": "w1"}])
    templated = tiny_tokenizer(chat_template="{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }} "
                                             "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    assert format_prompt(templated, "w10", system="w9") == "<system>w9 <user>w10 <assistant>"


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    from tiny_tokenizer import tiny_tokenizer

    root = tmp_path_factory.mktemp("cli")
    base = tiny_llama()
    base.save_pretrained(root / "model")
    tok = tiny_tokenizer()
    tok.save_pretrained(root / "model")
    rel = random_release(base)
    write_published(rel, str(root / "release"))
    model = mogu.load(copy.deepcopy(base), str(root / "release"))
    return SimpleNamespace(root=root, base=base, model=model, tok=tok)


def _expected_answer(t, instruction, max_new, system=None):
    ids = torch.tensor([encode_prompt(t.tok, format_prompt(t.tok, instruction, system))])
    out = mogu.generate(t.model, ids, max_new_tokens=max_new, do_sample=False, pad_token_id=PAD)
    new = out[0, ids.shape[1]:].tolist()
    return t.tok.decode(new, skip_special_tokens=True).strip(), new


def test_cli_generate_streams_the_mogu_answer(saved_tiny, capsys):
    from mogu.cli import main

    expected, new = _expected_answer(saved_tiny, "w10 w11 w12", 8)
    assert expected                                                 # something to compare
    code = main(["generate", "--model", str(saved_tiny.root / "model"), "--mogu", str(saved_tiny.root / "release"),
                 "--prompt", "w10 w11 w12", "--max-new-tokens", "8"])
    assert code == 0
    assert capsys.readouterr().out.strip() == expected
    # Plain base model without --mogu gives the base answer (different here).
    ids = torch.tensor([encode_prompt(saved_tiny.tok, format_prompt(saved_tiny.tok, "w10 w11 w12"))])
    base_new = saved_tiny.base.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=PAD)[0, ids.shape[1]:]
    code = main(["generate", "--model", str(saved_tiny.root / "model"), "--prompt", "w10 w11 w12",
                 "--max-new-tokens", "8"])
    assert code == 0
    base_text = capsys.readouterr().out.strip()
    assert base_text == saved_tiny.tok.decode(base_new, skip_special_tokens=True).strip()
    assert base_text != expected
    # Sampling with a seed is reproducible, and it really samples: some seed's answer differs
    # from the greedy one (an ignored --temperature would give the greedy answer every time).
    common = ["generate", "--model", str(saved_tiny.root / "model"), "--mogu", str(saved_tiny.root / "release"),
              "--prompt", "w10", "--max-new-tokens", "6"]
    assert main(common) == 0
    greedy = capsys.readouterr().out
    sampled = []
    for seed in ("3", "4", "5"):
        args = common + ["--temperature", "1.5", "--top-p", "1.0", "--seed", seed]
        assert main(args) == 0
        first = capsys.readouterr().out
        assert main(args) == 0
        assert capsys.readouterr().out == first
        sampled.append(first)
    assert any(s != greedy for s in sampled), (greedy, sampled)


def test_cli_chat_keeps_history(saved_tiny, capsys, monkeypatch):
    from mogu.cli import main

    expected, new = _expected_answer(saved_tiny, "w10 w11 w12", 6)
    monkeypatch.setattr(sys, "stdin", io.StringIO("w10 w11 w12\nw13\n/exit\n"))
    code = main(["chat", "--model", str(saved_tiny.root / "model"), "--mogu", str(saved_tiny.root / "release"),
                 "--max-new-tokens", "6"])
    assert code == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[0] == expected
    # The second answer continues the conversation (prompt holds the first turn and answer).
    history = [{"role": "user", "content": "w10 w11 w12"}, {"role": "assistant", "content": expected},
               {"role": "user", "content": "w13"}]
    ids = torch.tensor([encode_prompt(saved_tiny.tok, format_chat(saved_tiny.tok, history))])
    out = mogu.generate(saved_tiny.model, ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert lines[1] == saved_tiny.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_cli_errors_are_reported(tmp_path, capsys):
    from mogu.cli import main

    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 1
    assert "mogu generate: error:" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "0"]) == 1
    assert "--max-new-tokens must be positive" in capsys.readouterr().err


def _char_tokenizer():
    """One character per token id 3..96 (a-z first), so HF's StopStringCriteria can index it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(0x4E00 + i) for i in range(VOCAB - 3 - 26)]
    vocab = {"[PAD]": PAD, "<s>": 1, "</s>": EOS, **{c: 3 + i for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="[PAD]")


def test_stop_strings_with_tokenizer(saved_tiny):
    tok = _char_tokenizer()
    ids = prompt(90, 6)
    free = mogu.generate(saved_tiny.model, ids, max_new_tokens=8, **greedy(eos_token_id=None))[0, 6:].tolist()
    k = next(k for k, t in enumerate(free) if k >= 1 and t >= 3 and t not in free[:k])   # a fresh character
    out = mogu.generate(saved_tiny.model, ids, max_new_tokens=8, stop_strings=[tok.convert_ids_to_tokens(free[k])],
                        tokenizer=tok, **greedy(eos_token_id=None))
    assert out[0, 6:].tolist() == free[:k + 1]
    with pytest.raises(ValueError, match="stop_strings needs tokenizer"):
        mogu.generate(saved_tiny.model, ids, max_new_tokens=2, stop_strings=["a"])
