"""MoGU text generation: the published decoding protocol, token-exact, cached, one weight copy.

The published MoGU inference decides the first ``m`` (= ``mogu_tokens``, 5) new tokens with
the MoGU model, then lets the plain base model continue from prompt + those tokens with
its own view of the whole prefix. The published code re-encodes the prefix at every MoGU
step and keeps two copies of the weights. :func:`generate` gives the same tokens with one
copy and KV caching:

* ``protocol="exact"`` (default): the MoGU model prefills the prompt and decodes new
  tokens ``0 .. m-1`` with its KV cache; then the layers switch to mode "base" (bitwise
  the unpatched layer), the MoGU keys/values are dropped (``Cache.reset``) and the base
  model prefills prompt + those m tokens in one forward, exactly as the published code's
  second ``generate`` call does, and decoding continues as plain base generation. Cost
  over plain generation: a second prefill (the base model's, L + m tokens), and the m
  MoGU-mode forwards cost a little more than plain ones; memory: one KV cache at a time
  and the activation peak of one prefill. The first token
  comes as fast as in plain generation; token m + 1 waits for the base prefill.
* ``protocol="cached"``: one row per prompt; MoGU for the first ``m`` tokens, then the
  layers switch to "base" but keep the cache the MoGU steps built (cheapest, not exact:
  the base model attends to MoGU keys/values of the prefix).
* ``protocol="always"``: MoGU on every token.

Everything else is Hugging Face ``generate``: :func:`generate` calls the model class's
``generate`` with a ``custom_generate`` decoding loop, so generation config handling,
special tokens, attention masks and position ids for left padding, logits processors
(temperature, top-k, top-p, repetition penalty, ...), stopping criteria (max length, eos,
stop strings, custom) and streamers behave as in ``model.generate``. Finished rows are
padded with ``pad_token_id`` like HF does. Beam search and assisted decoding are not
supported (ValueError). The loop needs some transformers internals (the model-kwargs
update, the cache layers, the output dataclass); every one of them is a named function of
:mod:`mogu.hf_compat`, behind its version gate, and nothing here touches them directly.

After :func:`install_generate` (done by ``mogu.patch_model``), ``model.generate(...)``
follows the protocol too while the layers are in mode "mogu"; in any other mode
("base", "glad", "unwill", set with ``mogu.mode``/``mogu.set_mode``) it is the plain HF
``generate`` in that mode.
"""
from __future__ import annotations

import inspect
import os
import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from . import hf_compat as hf
from .checkpoint import load as load_mogu
from .layer import MoGULinear
from .patching import get_mode, is_patched, patched_modules, register_patch_hooks

PROTOCOLS = ("exact", "cached", "always")


# ------------------------------------------------------------------ helpers
def _check_inputs(model: nn.Module, input_ids, attention_mask, mogu_tokens, protocol) -> int:
    """Validate the arguments of :func:`generate`; returns the resolved mogu_tokens."""
    if not patched_modules(model):
        raise ValueError("mogu.generate: the model is not MoGU-patched; call mogu.patch_model(model) and load "
                         "MoGU weights (mogu.load / mogu.load_official) first, or use model.generate for the "
                         "plain model")
    if protocol not in PROTOCOLS:
        raise ValueError(f"mogu.generate: unknown protocol {protocol!r}; expected one of {list(PROTOCOLS)}")
    if mogu_tokens is None:
        config = getattr(model, "mogu_config", None)
        mogu_tokens = config.mogu_tokens if config is not None else 5
    if isinstance(mogu_tokens, bool) or not isinstance(mogu_tokens, int) or mogu_tokens < 0:
        raise ValueError(f"mogu.generate: mogu_tokens must be an integer >= 0, got {mogu_tokens!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        desc = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"mogu.generate: input_ids must be an integer tensor of shape (batch, prompt_length), "
                         f"got {desc}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"mogu.generate: empty prompt (input_ids has shape {tuple(input_ids.shape)}); every row "
                         f"needs at least one token")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"mogu.generate: attention_mask has shape {tuple(attention_mask.shape)}, expected "
                             f"{tuple(input_ids.shape)} like input_ids")
        empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"mogu.generate: empty prompt in row(s) {empty} (attention_mask is all zeros)")
    return int(mogu_tokens)


class _LayerState:
    """Save and restore the per-generation state (mode, gate sink) of every patched layer."""

    def __init__(self, layers: List[MoGULinear]):
        self.layers = layers
        self.saved = [(layer.mode, layer.gate_sink) for layer in layers]

    def set_mode(self, name: str) -> None:
        for layer in self.layers:
            layer.mode = name

    def restore(self) -> None:
        for layer, (mode, sink) in zip(self.layers, self.saved):
            layer.mode, layer.gate_sink = mode, sink


class _GateRecorder:
    """Keeps, for each MoGU-phase step, the gates at the position that chose the new token.

    Each patched layer's ``gate_sink`` is replaced by one that stores the last position's
    gates and forwards the gates of all positions to the sink the layer had before (e.g.
    ``capture_gates``).
    """

    def __init__(self, layers: List[MoGULinear], record: bool):
        self.layers = layers
        self.record = record
        self.current: List[Optional[torch.Tensor]] = [None] * len(layers)
        self.steps: List[torch.Tensor] = []
        for i, layer in enumerate(layers):
            if record or layer.gate_sink is not None:
                layer.gate_sink = self._sink(i, layer.gate_sink)

    def _sink(self, i: int, previous):
        def sink(gates: torch.Tensor) -> None:
            if self.record:
                last = gates[:, -1] if gates.dim() >= 3 else gates
                self.current[i] = last.detach().float()
            if previous is not None:
                previous(gates)
        return sink

    def end_step(self) -> None:
        """Called once per new token chosen by a MoGU-mode forward."""
        if not self.record:
            return
        missing = [i for i, g in enumerate(self.current) if g is None]
        if missing:
            raise RuntimeError(f"mogu.generate: patched layers {missing} produced no gates in a MoGU step")
        self.steps.append(torch.stack(self.current, dim=1).cpu())          # (B, L, 2)
        self.current = [None] * len(self.layers)

    def result(self, batch: int) -> torch.Tensor:
        if not self.steps:
            return torch.zeros(batch, 0, len(self.layers), 2)
        return torch.stack(self.steps, dim=1)                                # (B, S, L, 2)


class _MoGUDecoding:
    """The decoding loop, run by HF ``generate`` as its ``custom_generate`` callable.

    HF prepares everything (generation config, special tokens, attention mask, position
    ids, cache, logits processors, stopping criteria) and calls this with the prepared
    ``input_ids`` (B, L) and model kwargs; it mirrors ``GenerationMixin._sample`` with the
    protocol's mode switch after ``m`` tokens and, for "exact", the base model's prefill.
    """

    def __init__(self, protocol: str, mogu_tokens: int, streamer=None, record_gates: bool = False):
        self.protocol = protocol
        self.mogu_tokens = mogu_tokens
        self.streamer = streamer
        self.record_gates = record_gates
        self.gates: Optional[torch.Tensor] = None

    def __call__(self, model, input_ids, logits_processor, stopping_criteria, generation_config,
                 synced_gpus: bool = False, streamer=None, **model_kwargs):
        streamer = streamer if streamer is not None else self.streamer
        if getattr(generation_config, "num_beams", 1) not in (None, 1):
            raise ValueError("mogu.generate: beam search (num_beams > 1) is not supported; use greedy or sampling")
        if generation_config.return_dict_in_generate and (generation_config.output_attentions
                                                          or generation_config.output_hidden_states):
            raise ValueError("mogu.generate: output_attentions / output_hidden_states are not supported")
        if synced_gpus:
            raise ValueError("mogu.generate: synced_gpus is not supported")

        batch = input_ids.shape[0]
        cache = hf.find_cache(model_kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("mogu.generate: continuing from a filled cache is not supported; pass the whole "
                             "prompt without past key values")
        max_new = (generation_config.max_length - input_ids.shape[1]) if generation_config.max_length else None
        m = self.mogu_tokens if max_new is None else min(self.mogu_tokens, max(max_new, 0))
        if self.protocol == "exact" and m > 0 and cache is not None and not hf.is_dynamic_cache(cache):
            raise ValueError(f"mogu.generate: the exact protocol needs a DynamicCache (it empties the cache for "
                             f"the base model's prefill), got {type(cache).__name__}; do not set "
                             f"cache_implementation, or use protocol='cached'")

        layers = list(patched_modules(model).values())
        state = _LayerState(layers)
        try:
            # MoGU phase first; with m = 0 every protocol but "always" is plain base
            # generation from the start.
            state.set_mode("mogu" if m > 0 or self.protocol == "always" else "base")
            recorder = _GateRecorder(layers, self.record_gates)
            result = self._loop(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                streamer, model_kwargs, m, state, recorder)
            self.gates = recorder.result(batch) if self.record_gates else None
            return result
        finally:
            state.restore()

    @staticmethod
    def _forward(model, model_inputs: Dict, model_kwargs: Dict) -> Tuple[torch.Tensor, Dict]:
        """One forward; returns ((B, V) last-position logits, the model kwargs for the next step)."""
        outputs = model(**model_inputs, return_dict=True)
        model_kwargs = hf.update_model_kwargs(model, outputs, model_kwargs)
        return outputs.logits[:, -1, :], model_kwargs

    def _loop(self, model, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
              model_kwargs, m, state, recorder):
        batch = input_ids.shape[0]
        pad = hf.pad_token_tensor(generation_config, input_ids.device)
        has_eos_criteria = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        want_dict = generation_config.return_dict_in_generate
        scores = () if want_dict and generation_config.output_scores else None
        raw_logits = () if want_dict and generation_config.output_logits else None

        if streamer is not None:
            streamer.put(input_ids.cpu())
        sequences = input_ids                                        # (B, L + generated)
        unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
        mogu_phase = m > 0 or self.protocol == "always"
        generated = 0

        logits, model_kwargs = self._forward(model, hf.prefill_inputs(model, input_ids, model_kwargs), model_kwargs)
        while True:
            # logits: (B, V) last-position logits of the forward that chooses this token
            logits = logits.to(copy=True, dtype=torch.float32, device=input_ids.device)
            next_scores = logits_processor(sequences, logits)
            if scores is not None:
                scores += (next_scores,)
            if raw_logits is not None:
                raw_logits += (logits,)
            if generation_config.do_sample:
                probs = nn.functional.softmax(next_scores, dim=-1)
                next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                next_tokens = torch.argmax(next_scores, dim=-1)
            if has_eos_criteria and pad is not None:
                next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
            if mogu_phase:
                recorder.end_step()
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
            unfinished = unfinished & ~stopping_criteria(sequences, scores)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            generated += 1
            if unfinished.max() == 0:
                break
            if generated == m and self.protocol != "always":
                mogu_phase = False
                state.set_mode("base")
                cache = hf.find_cache(model_kwargs)
                if self.protocol == "exact" and cache is not None:
                    # The base model's own view of prompt + the m MoGU tokens: drop the MoGU
                    # keys/values first (one cache alive at a time), then one prefill.
                    hf.empty_cache(cache, model)
                    logits, model_kwargs = self._forward(model, hf.prefill_inputs(model, sequences, model_kwargs),
                                                         model_kwargs)
                    continue
            # Without a cache every forward re-encodes the whole sequence, in the current mode.
            logits, model_kwargs = self._forward(model, hf.decode_inputs(model, sequences, model_kwargs),
                                                 model_kwargs)

        if streamer is not None:
            streamer.end()
        if not want_dict:
            return sequences
        return hf.decoder_only_output(sequences, scores, raw_logits, hf.find_cache(model_kwargs))


# ------------------------------------------------------------------ public
def generate(model: nn.Module, input_ids: torch.Tensor = None, attention_mask: Optional[torch.Tensor] = None,
             max_new_tokens: Optional[int] = None, mogu_tokens: Optional[int] = None, protocol: str = "exact",
             return_gates: bool = False, **generation_kwargs):
    """Generate with a MoGU-patched Hugging Face causal LM under a MoGU decoding protocol.

    Args:
        model: a model patched by ``mogu.patch_model`` (with MoGU weights loaded).
        input_ids: LongTensor (B, L), left-padded for B > 1, every row non-empty.
        attention_mask: (B, L) 0/1, or None (inferred from ``pad_token_id`` like HF).
        max_new_tokens: new tokens at most, all protocols and phases counted (None: the
            model's generation config).
        mogu_tokens: m, the new tokens decided by MoGU; None = ``model.mogu_config.mogu_tokens``.
        protocol: "exact" (published protocol, token-exact, cached), "cached" or "always";
            see the module docstring.
        return_gates: also return the router gates of every MoGU-phase token.
        **generation_kwargs: anything ``model.generate`` accepts for greedy/sampling
            decoding: ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
            ``repetition_penalty``, ``eos_token_id``, ``pad_token_id``, ``min_new_tokens``,
            ``generation_config``, ``logits_processor``, ``stopping_criteria``,
            ``stop_strings`` (with ``tokenizer``), ``streamer``, ``num_return_sequences``,
            ``return_dict_in_generate`` with ``output_scores``/``output_logits``, ... Sampling is
            seeded with ``torch.manual_seed``.

    Returns:
        LongTensor (B, L + new) (prompt + new tokens; rows that stopped early are padded with
        ``pad_token_id``), or HF's ``GenerateDecoderOnlyOutput`` with
        ``return_dict_in_generate=True``. With ``return_gates=True`` a pair
        ``(that, gates)``: gates float32 CPU (B, S, n_layers, 2), S = new tokens chosen by a
        MoGU forward (min(m, new) for "exact"/"cached", all for "always"), layers in
        module order, last dim [unwill, glad]; ``gates[b, t]`` are the gates at the
        position whose logits chose new token t (the last prompt token for t = 0).

    Raises:
        ValueError: unpatched model, empty prompt (or an all-padding row), mogu_tokens < 0,
        unknown protocol, beam search, or a cache the protocol cannot use.

    Under greedy decoding, protocol="exact" returns the tokens of the published procedure
    (m MoGU steps re-encoding the prefix, then the base model continuing from prompt +
    those tokens).
    """
    if input_ids is None:
        input_ids = generation_kwargs.pop("inputs", None)
        if input_ids is None:
            input_ids = generation_kwargs.pop("input_ids", None)
    m = _check_inputs(model, input_ids, attention_mask, mogu_tokens, protocol)
    for unsupported in ("assistant_model", "custom_generate", "prompt_lookup_num_tokens"):
        if generation_kwargs.get(unsupported) is not None:
            raise ValueError(f"mogu.generate: {unsupported} is not supported")
    if (generation_kwargs.get("num_beams") or 1) > 1:
        raise ValueError("mogu.generate: beam search (num_beams > 1) is not supported; use greedy or sampling")
    streamer = generation_kwargs.pop("streamer", None)
    tokenizer = generation_kwargs.pop("tokenizer", None)
    stop_strings = generation_kwargs.pop("stop_strings", None)
    if stop_strings is not None:
        # HF drops ``tokenizer`` for custom_generate callables, so build the criterion here.
        if tokenizer is None:
            raise ValueError("mogu.generate: stop_strings needs tokenizer=...")
        from transformers import StoppingCriteriaList, StopStringCriteria
        criteria = StoppingCriteriaList(generation_kwargs.pop("stopping_criteria", None) or [])
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
        generation_kwargs["stopping_criteria"] = criteria
    decoding = _MoGUDecoding(protocol, m, streamer=streamer, record_gates=return_gates)
    if attention_mask is not None:
        generation_kwargs["attention_mask"] = attention_mask
    if max_new_tokens is not None:
        generation_kwargs["max_new_tokens"] = max_new_tokens
    # The class's generate (not an instance override installed by install_generate).
    result = hf.generate_with_loop(model, input_ids, decoding, **generation_kwargs)
    if return_gates:
        return result, decoding.gates
    return result


class MoGUGenerate:
    """``model.generate`` of a MoGU-patched model (installed by :func:`install_generate`).

    Same call as HF ``generate`` plus the keyword arguments ``mogu_tokens``, ``protocol``
    (default: the one given to ``install_generate``) and ``return_gates``. In mode "mogu"
    it runs :func:`generate`; in any other mode (and on a model that is no longer patched)
    the plain HF ``generate``.
    """

    def __init__(self, model: nn.Module, protocol: str = "exact"):
        if protocol not in PROTOCOLS:
            raise ValueError(f"mogu.install_generate: unknown protocol {protocol!r}; expected one of {list(PROTOCOLS)}")
        self.model = model
        self.protocol = protocol

    def __call__(self, inputs=None, *args, mogu_tokens=None, protocol=None, return_gates=False, **kwargs):
        model = self.model
        hf_generate = type(model).generate
        if args:            # positional HF arguments after ``inputs``: name them
            names = [p for p in inspect.signature(hf_generate).parameters if p not in ("self", "inputs")]
            for name, value in zip(names, args):
                if name in kwargs:
                    raise TypeError(f"generate() got multiple values for argument {name!r}")
                kwargs[name] = value
        if inputs is None and "input_ids" in kwargs:
            inputs = kwargs.pop("input_ids")
        if not is_patched(model) or get_mode(model) != "mogu":
            if return_gates or mogu_tokens is not None or protocol is not None:
                raise ValueError(f"model.generate: mogu_tokens/protocol/return_gates need the MoGU layers in mode "
                                 f"'mogu' (now {get_mode(model) if is_patched(model) else 'unpatched'!r})")
            return hf_generate(model, inputs, **kwargs)
        return generate(model, inputs, mogu_tokens=mogu_tokens, protocol=protocol or self.protocol,
                        return_gates=return_gates, **kwargs)

    def __repr__(self) -> str:
        return f"MoGUGenerate(protocol={self.protocol!r})"


def install_generate(model: nn.Module, protocol: str = "exact") -> nn.Module:
    """Make ``model.generate`` follow the MoGU protocol (an instance attribute; idempotent)."""
    model.__dict__["generate"] = MoGUGenerate(model, protocol)
    return model


def uninstall_generate(model: nn.Module) -> nn.Module:
    """Undo :func:`install_generate` (``model.generate`` is the class's again)."""
    if isinstance(model.__dict__.get("generate"), MoGUGenerate):
        del model.__dict__["generate"]
    return model


register_patch_hooks(install_generate, uninstall_generate)     # patch_model / unpatch call them


# ------------------------------------------------------------------ loading
def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """A torch dtype from a dtype or a name ("float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16"; "auto"
    or None: bf16 on CUDA, fp32 elsewhere); ValueError naming the accepted names otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"mogu: unknown dtype {dtype!r}; expected one of {sorted(names)} or 'auto'")
    return names[dtype]


# A Hugging Face hub repository id: "name" or "owner/name" (letters, digits, "_", "-", ".").
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_var() -> Optional[str]:
    """The variable that puts the hub in offline mode (HF_HUB_OFFLINE=1, ...), or None."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return var
    try:
        from huggingface_hub import constants
        return "HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else None
    except ImportError:
        return None


def is_hub_name(name: str) -> bool:
    """Whether ``name``, which is not an existing path, can only be a hub repository id:
    ``name`` or ``owner/name``, not absolute, no ``./``, ``~``, trailing slash, ``.gguf``
    ending or deeper nesting, and not inside an existing local folder (``runs/model``
    with ``runs/`` present is a missing local folder, not a hub name)."""
    if not _HUB_NAME.match(name) or ".." in name or "--" in name or name.endswith((".", "-")):
        return False
    if name.lower().endswith(".gguf"):
        return False
    return "/" not in name or not os.path.isdir(name.split("/")[0])


def resolve_model_path(model_path, gguf_file: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """Where a model is loaded from, checked before anything loads, local first.

    Returns ``(model_path, gguf_file)`` for ``from_pretrained``:

    * an existing folder: with ``gguf_file``, that file must be in it; without, a folder
      with ``config.json`` is a Hugging Face folder, else its only ``.gguf`` file is used
      (several: ValueError naming them; none: ValueError);
    * an existing ``.gguf`` file: its folder and its name;
    * a missing path: FileNotFoundError "model folder not found: PATH", unless the name
      can only be a hub repository id (:func:`is_hub_name`); then it is passed on to
      transformers (download and cache), except in offline mode (``HF_HUB_OFFLINE=1``)
      when it is not in the local cache: FileNotFoundError at once, no network.
    """
    raw = os.fspath(model_path)
    if not raw:
        raise ValueError("mogu: the model path is empty")
    path = os.path.normpath(raw)
    if os.path.isfile(path):
        if path.lower().endswith(".gguf") and gguf_file is None:
            return os.path.dirname(path) or ".", os.path.basename(path)
        raise ValueError(f"mogu: the model path must be a folder (or a .gguf file), got the file {path}")
    if os.path.isdir(path):
        ggufs = sorted(e for e in os.listdir(path)
                       if e.lower().endswith(".gguf") and os.path.isfile(os.path.join(path, e)))
        if gguf_file is not None:
            if not os.path.isfile(os.path.join(path, gguf_file)):
                held = f"it holds {', '.join(ggufs)}" if ggufs else "it holds no .gguf file"
                raise FileNotFoundError(f"mogu: GGUF file not found: {os.path.join(path, gguf_file)} ({held})")
            return path, gguf_file
        if os.path.isfile(os.path.join(path, "config.json")):
            return path, None
        if len(ggufs) == 1:
            return path, ggufs[0]
        if ggufs:
            raise ValueError(f"mogu: model folder {path} holds several GGUF files ({', '.join(ggufs)}) and no "
                             f"config.json; name one with --gguf-file (gguf_file=)")
        raise ValueError(f"mogu: {path} is not a model folder: it holds neither config.json nor a .gguf file")
    if not is_hub_name(raw):
        raise FileNotFoundError(f"mogu: model folder not found: {path}")
    offline = offline_var()
    if offline is not None and not _in_hub_cache(raw, gguf_file):
        raise FileNotFoundError(f"mogu: model folder not found: {path}; as a hub name it is not in the local "
                                f"Hugging Face cache, and offline mode ({offline}=1) forbids downloading it")
    return raw, gguf_file


def _in_hub_cache(name: str, gguf_file: Optional[str]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(name, gguf_file or "config.json"), str)
    except Exception:           # not a valid repo id for the cache either
        return False


_HUB_SEEN = set()


def check_hub_model(name: str, gguf_file: Optional[str] = None, timeout: float = 10.0) -> None:
    """For a hub name from :func:`resolve_model_path` (not a local path, not offline): one
    quick look-up without retries, so that a missing model or no connection fails at once
    instead of after transformers' download retries. A model in the local cache passes
    without a connection."""
    if os.path.exists(name) or name in _HUB_SEEN or offline_var() is not None:
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=timeout)
    except GatedRepoError:      # exists; access is transformers' business
        pass
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"mogu: model folder not found: {name}, and the Hugging Face hub has no model of "
                                f"that name (or it is private: log in with `hf auth login`)") from None
    except Exception as exc:
        if not _in_hub_cache(name, gguf_file):
            raise OSError(f"mogu: model folder not found: {name}; as a hub name it cannot be looked up "
                          f"({type(exc).__name__}: {exc}); check the connection, or set HF_HUB_OFFLINE=1 to use "
                          f"only the local cache") from exc
    _HUB_SEEN.add(name)


def load_for_inference(model_path, mogu_path=None, gguf_file: Optional[str] = None, dtype=None, device=None,
                       protocol: str = "exact"):
    """Load a local causal LM and its tokenizer for generation, with MoGU if ``mogu_path``.

    model_path: a local Hugging Face model folder, the folder of ``gguf_file`` (its only
        ``.gguf`` file when ``gguf_file`` is None and it has no ``config.json``), a ``.gguf``
        file, or a hub name; checked by :func:`resolve_model_path` before anything loads.
    mogu_path: a MoGU folder in this project's format or a published release root
        (``mogu.load`` detects which); None = the plain model.
    dtype: torch dtype or "float32"/"bfloat16"/"float16"/"auto"/None (fp32 on CPU, bf16 on CUDA).
    device: "cpu", "cuda", ... (None: cuda if available else cpu).

    Returns (model, tokenizer): the model in eval mode on ``device``; with MoGU its
    ``generate`` follows ``protocol``. The tokenizer pads on the left and has a pad token
    (eos when it had none) so batched prompts work.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model_path, gguf_file = resolve_model_path(model_path, gguf_file)
    check_hub_model(model_path, gguf_file)
    if mogu_path is not None and not os.path.exists(os.fspath(mogu_path)):      # before the model loads
        raise FileNotFoundError(f"mogu: MoGU folder not found: {os.path.normpath(os.fspath(mogu_path))}")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model_path, **extra)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype, **extra)
    model.to(device).eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if getattr(model.generation_config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if mogu_path is not None:
        load_mogu(model, mogu_path)
        install_generate(model, protocol)
    return model, tokenizer
