"""The published decoding protocol ("exact") on a vLLM engine, offline, as two phases.

vLLM's model forward sees one flat batch of tokens from many requests and no per-request
field a model plugin can read, so MoGU cannot be switched per request inside a running
server: the server (``vllm serve``) runs protocol ``always`` (MoGU on every token). An
offline ``vllm.LLM`` can run the published protocol with one copy of the weights:

1. MoGU on: every prompt generates its first ``mogu_tokens`` (m) tokens;
2. every MoGU layer switched to the plain base layer on every worker
   (``MoGUWorkerExtension.mogu_set_base_mode`` through ``llm.collective_rpc``; a tensor
   flag the fused op reads as ``base_rows``, so CUDA graphs see it), the prefix
   cache dropped (its blocks were computed by MoGU), and each unfinished request
   continues as a new request from prompt + its m tokens, re-reading that prefix as base;
3. MoGU switched back on and the prefix cache dropped again.

With greedy sampling the tokens equal ``mogu.generate(..., protocol="exact")``. The two
phases are engine-wide: do not share the engine with other traffic while it runs.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from .worker import WORKER_EXTENSION


def _set_mode(llm, base: bool) -> None:
    try:
        counts = llm.collective_rpc("mogu_set_base_mode", args=(bool(base),))
    except AttributeError as exc:
        raise ValueError(f"mogu (vLLM): protocol exact needs the engine built with "
                         f"vllm.LLM(..., worker_extension_cls={WORKER_EXTENSION!r}) ({exc})") from exc
    if not any(counts):
        raise ValueError("mogu (vLLM): the engine's model has no MoGU layer (serve a folder written by "
                         "`mogu export-vllm`)")
    llm.reset_prefix_cache()


def served_mogu_tokens(llm) -> int:
    """``mogu_tokens`` of the served folder's config (its ``"mogu"`` section)."""
    from .common import read_section

    return int(read_section(llm.llm_engine.model_config.hf_config)["config"].mogu_tokens)


def generate_exact(llm, prompts: Sequence[Any], sampling_params, mogu_tokens: Optional[int] = None,
                   use_tqdm: bool = False) -> List[Dict[str, Any]]:
    """Generate with protocol "exact" on ``llm``: a ``vllm.LLM`` serving a MoGU folder, built
    with ``worker_extension_cls=mogu.vllm_plugin.WORKER_EXTENSION``.

    prompts: what ``llm.generate`` accepts (strings, ``{"prompt_token_ids": [...]}``, ...).
    sampling_params: one ``vllm.SamplingParams`` (n = 1) for every prompt.
    mogu_tokens: m (None: the folder's ``mogu_tokens``).
    Returns one dict per prompt: ``token_ids`` (all new tokens), ``text`` (decoded, or None
    without a tokenizer), ``finish_reason`` and ``mogu_token_count`` (how many MoGU chose).
    """
    if getattr(sampling_params, "n", 1) != 1:
        raise ValueError("mogu (vLLM): protocol exact supports n = 1 per prompt")
    m = served_mogu_tokens(llm) if mogu_tokens is None else int(mogu_tokens)
    if m < 0:
        raise ValueError(f"mogu (vLLM): mogu_tokens must be >= 0, got {m}")
    total = sampling_params.max_tokens
    results: List[Dict[str, Any]] = []
    first: List[Any] = [None] * len(prompts)
    if m > 0:
        phase1 = sampling_params.clone()
        phase1.max_tokens = m if total is None else min(m, total)
        first = llm.generate(list(prompts), phase1, use_tqdm=use_tqdm)
    todo, params2 = [], []
    for i, out in enumerate(first):
        if out is None:
            results.append({"token_ids": [], "finish_reason": None, "mogu_token_count": 0, "prompt": prompts[i]})
            todo.append(i)
            continue
        gen = out.outputs[0]
        ids = list(gen.token_ids)
        results.append({"token_ids": ids, "finish_reason": gen.finish_reason, "mogu_token_count": len(ids),
                        "prompt_token_ids": list(out.prompt_token_ids)})
        if gen.finish_reason == "length" and (total is None or len(ids) < total):
            todo.append(i)
    if todo:
        inputs = []
        for i in todo:
            r = results[i]
            if "prompt_token_ids" in r:
                inputs.append({"prompt_token_ids": r["prompt_token_ids"] + r["token_ids"]})
            else:
                inputs.append(r.pop("prompt"))
            p = sampling_params.clone()
            done = len(r["token_ids"])
            if total is not None:
                p.max_tokens = total - done
            p.min_tokens = max(0, (sampling_params.min_tokens or 0) - done)
            params2.append(p)
        _set_mode(llm, base=True)
        try:
            second = llm.generate(inputs, params2, use_tqdm=use_tqdm)
        finally:
            _set_mode(llm, base=False)
        for i, out in zip(todo, second):
            gen = out.outputs[0]
            results[i]["token_ids"] = results[i]["token_ids"] + list(gen.token_ids)
            results[i]["finish_reason"] = gen.finish_reason
    tokenizer = None
    try:
        tokenizer = llm.get_tokenizer()
    except Exception:                       # skip_tokenizer_init
        pass
    for r in results:
        r.pop("prompt", None)
        r.pop("prompt_token_ids", None)
        r["text"] = tokenizer.decode(r["token_ids"], skip_special_tokens=True) if tokenizer is not None else None
    return results
