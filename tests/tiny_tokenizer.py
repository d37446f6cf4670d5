"""Test helper: an offline word-level tokenizer matching ``tests/tiny_models`` (vocab 97).

Ids: 0 ``[PAD]``, 1 ``<s>`` (bos), 2 ``</s>`` (eos), 3 ``[UNK]``, then the Llama-2 prompt
markers ``[INST] [/INST] <<SYS>> <</SYS>>`` (4..7), then plain words ``w8 .. w96`` (the
word for id i is ``f"w{i}"``). Splits on whitespace only, so a prompt such as
``"[INST] w10 w11 [/INST]"`` tokenises to exactly those ids. It has no chat template,
so it exercises the Llama-2 ``[INST]`` prompt path.
"""
from __future__ import annotations

from typing import List

from tiny_models import VOCAB

SPECIALS = ["[PAD]", "<s>", "</s>", "[UNK]"]
MARKERS = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]
FIRST_WORD = len(SPECIALS) + len(MARKERS)          # id of the first plain word (8)


def word(i: int) -> str:
    """The plain word with token id ``i`` (FIRST_WORD <= i < VOCAB)."""
    if not FIRST_WORD <= i < VOCAB:
        raise ValueError(f"word ids are {FIRST_WORD}..{VOCAB - 1}, got {i}")
    return f"w{i}"


def words(ids: List[int]) -> str:
    return " ".join(word(i) for i in ids)


def tiny_tokenizer(chat_template: str = None):
    """A ``PreTrainedTokenizerFast`` over the fixed vocabulary above (no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + MARKERS)}
    vocab.update({word(i): i for i in range(FIRST_WORD, VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  pad_token="[PAD]", unk_token="[UNK]")
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
