"""``mogu generate`` and ``mogu chat``: MoGU text generation from the command line.

    mogu generate --model M [--gguf-file F] [--mogu DIR] --prompt TEXT [options]
    mogu chat     --model M [--gguf-file F] [--mogu DIR] [options]

``--model`` is a local Hugging Face model folder, a folder holding one GGUF file (or
several, with ``--gguf-file``), or a hub name (see ``mogu.cli.common``); ``--mogu`` a MoGU
folder in this project's format or a published release root (without it the plain base
model runs, for comparison). Both are checked before the model loads. The prompt is
formatted with the tokenizer's chat template, or the Llama-2 ``[INST]`` template when it
has none (``--raw`` sends the text as is). The answer is streamed to stdout; greedy
unless ``--temperature`` > 0.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List

from .common import EXPLAIN_M, add_model_args, check_model, check_mogu_folder, load_inference_model
from ..generation import PROTOCOLS


def _add_model_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, mogu="optional")
    d = p.add_argument_group("decoding")
    d.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    d.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer (default: %(default)s)")
    d.add_argument("--protocol", choices=PROTOCOLS, default="exact",
                   help="exact: published protocol (MoGU for the first --mogu-tokens tokens, then the base "
                        "model), token-exact; cached: switch to base keeping the cache; always: MoGU throughout "
                        "(default: %(default)s)")
    d.add_argument("--mogu-tokens", type=int, default=None, help="tokens decided by MoGU (default: the config's, 5)")
    d.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy; > 0 samples (default: %(default)s)")
    d.add_argument("--top-p", type=float, default=None, help="nucleus sampling with --temperature (default: off)")
    d.add_argument("--top-k", type=int, default=None, help="top-k sampling with --temperature (default: off)")
    d.add_argument("--seed", type=int, default=None, help="torch.manual_seed before generating (default: none)")
    d.add_argument("--raw", action="store_true", help="send the prompt text as is (default: the chat template)")


def register(subparsers) -> None:
    gen = subparsers.add_parser(
        "generate", help="generate one answer (streamed to stdout)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate an answer to one prompt with a MoGU model (or the plain base model without --mogu).",
        epilog=f"Example: mogu generate --model M --mogu runs/router/folded --prompt 'How do I pick a lock?'\n"
               f"{EXPLAIN_M}")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True, help="the instruction ('-' reads it from stdin) (required)")
    gen.set_defaults(func=run_generate)

    chat = subparsers.add_parser(
        "chat", help="interactive chat (streamed)", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Chat with a MoGU model. Commands: /reset (forget the conversation), /exit (or end of input).",
        epilog=f"Example: mogu chat --model M --mogu runs/router/folded\n{EXPLAIN_M}")
    _add_model_args(chat)
    chat.set_defaults(func=run_chat)


def _check_args(args) -> None:
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.mogu_tokens is not None and args.mogu_tokens < 0:
        raise ValueError(f"--mogu-tokens must be >= 0, got {args.mogu_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k <= 0:
        raise ValueError(f"--top-k must be positive, got {args.top_k}")


def _decoding_kwargs(args, tokenizer) -> Dict:
    kw = {"max_new_tokens": args.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if args.temperature > 0:
        kw.update(do_sample=True, temperature=args.temperature)
        if args.top_p is not None:
            kw["top_p"] = args.top_p
        if args.top_k is not None:
            kw["top_k"] = args.top_k
    else:
        # Greedy, whatever sampling defaults the model's generation_config carries.
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def _load(args, command: str):
    """Check --mogu and --model (before anything loads), then load."""
    _check_args(args)
    if args.mogu is not None:
        args.mogu = check_mogu_folder(args.mogu)
    check_model(args, command)
    return load_inference_model(args, mogu_path=args.mogu, protocol=args.protocol)


def _answer(model, tokenizer, prompt_text: str, args) -> List[int]:
    """Stream the answer to ``prompt_text`` to stdout; returns the new token ids."""
    import torch
    from transformers import TextStreamer

    from .. import generation
    from ..prompting import encode_prompt
    from ..patching import is_patched

    ids = encode_prompt(tokenizer, prompt_text)
    if not ids:
        raise ValueError("the prompt is empty")
    input_ids = torch.tensor([ids], device=model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    kw = _decoding_kwargs(args, tokenizer)
    if is_patched(model):
        out = generation.generate(model, input_ids, attention_mask=torch.ones_like(input_ids),
                                  mogu_tokens=args.mogu_tokens, protocol=args.protocol, streamer=streamer, **kw)
    else:
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kw)
    return out[0, input_ids.shape[1]:].tolist()


def run_generate(args) -> int:
    from ..prompting import format_prompt
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise ValueError("the prompt is empty (--prompt)")
    model, tokenizer = _load(args, "generate")
    text = prompt if args.raw else format_prompt(tokenizer, prompt, system=args.system)
    _answer(model, tokenizer, text, args)
    return 0


def run_chat(args) -> int:
    from .common import fail
    from ..prompting import format_chat
    model, tokenizer = _load(args, "chat")
    mode = "MoGU" if args.mogu else "base model"
    print(f"[mogu chat: {mode}, protocol {args.protocol}; /reset forgets, /exit quits]", file=sys.stderr)
    history: List[Dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:                       # end of input
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        turn = history + [{"role": "user", "content": text}]
        prompt = text if args.raw else format_chat(tokenizer, turn)
        try:
            new_ids = _answer(model, tokenizer, prompt, args)
        except ValueError as exc:          # one bad turn does not end the chat
            fail("chat", exc)
            continue
        reply = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        history = turn + [{"role": "assistant", "content": reply}]
