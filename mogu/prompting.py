"""Prompt formatting shared by generation, training and evaluation.

One rule everywhere: the prompt is the tokenizer's chat template when it has one, else
the Llama-2 chat format (the format of the published MoGU models)::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{instruction} [/INST]      (with a system prompt)
    <s>[INST] {instruction} [/INST]                                         (without)

The text returned by :func:`format_prompt` / :func:`format_chat` is complete: it already
holds its special tokens (the chat template's own, or the tokenizer's bos for the Llama-2
format), so encode it with ``add_special_tokens=False`` (:func:`encode_prompt` does).
The prompt ends exactly where the answer starts.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

LLAMA2_SYSTEM_BLOCK = "<<SYS>>\n{system}\n<</SYS>>\n\n"
LLAMA2_TURN = "[INST] {system_block}{instruction} [/INST]"

ROLES = ("system", "user", "assistant")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _special(tokenizer, name: str) -> str:
    token = getattr(tokenizer, name, None)
    return token if isinstance(token, str) else ""


def _check_messages(messages: Sequence[Dict[str, str]]) -> List[Dict[str, str]]:
    """Validate a conversation: optional leading system turn, then user/assistant turns
    alternating, ending with a user turn. Returns a plain list copy."""
    msgs = [dict(m) for m in messages]
    if not msgs:
        raise ValueError("mogu.prompting: the conversation is empty")
    for i, m in enumerate(msgs):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"mogu.prompting: message {i} must be {{'role': one of {list(ROLES)}, "
                             f"'content': str}}, got {m!r}")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"mogu.prompting: a system message may only come first (message {i})")
    turns = msgs[1:] if msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"mogu.prompting: turns must alternate user/assistant starting with user; "
                             f"got {m['role']!r} where {expected!r} was expected")
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("mogu.prompting: the conversation must end with a user message")
    return msgs


def format_chat(tokenizer, messages: Sequence[Dict[str, str]]) -> str:
    """Prompt text for a conversation ending with a user turn, ready for the assistant's answer.

    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...], an optional
    system message first, then user/assistant alternating, the last one from the user.
    Chat template (with ``add_generation_prompt=True``) when the tokenizer has one, else
    the Llama-2 multi-turn format ``<s>[INST] ... [/INST] answer </s><s>[INST] ... [/INST]``
    with the system block inside the first user turn.
    """
    msgs = _check_messages(messages)
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    bos, eos = _special(tokenizer, "bos_token"), _special(tokenizer, "eos_token")
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    turns = msgs[1:] if system is not None else msgs
    parts = []
    for i in range(0, len(turns), 2):
        block = LLAMA2_SYSTEM_BLOCK.format(system=system) if (i == 0 and system) else ""
        text = bos + LLAMA2_TURN.format(system_block=block, instruction=turns[i]["content"])
        if i + 1 < len(turns):
            text += f" {turns[i + 1]['content']} {eos}"
        parts.append(text)
    return "".join(parts)


def format_prompt(tokenizer, instruction: str, system: Optional[str] = None) -> str:
    """Prompt text for one instruction (and an optional system prompt); see :func:`format_chat`."""
    if not isinstance(instruction, str):
        raise ValueError(f"mogu.format_prompt: instruction must be a string, got {type(instruction).__name__}")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": instruction}]
    return format_chat(tokenizer, messages)


def encode_prompt(tokenizer, text: str) -> List[int]:
    """Token ids of a prompt text from :func:`format_prompt`/:func:`format_chat` (no extra specials)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer, instruction: str, system: Optional[str] = None) -> List[int]:
    """Token ids of the prompt for ``instruction``: ``encode_prompt(format_prompt(...))``."""
    return encode_prompt(tokenizer, format_prompt(tokenizer, instruction, system))


def pad_id_of(tokenizer) -> int:
    """The id used for padding: pad, else eos, else 0 (padded positions are masked anyway)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0
