"""Training data for MoGU: the published formats, validation, tokenisation, batching.

Formats (``.json``: one JSON list; ``.jsonl``/``.ndjson``: one JSON value per line):

* rows: objects with string fields ``"instruction"`` and ``"output"`` (other fields are
  ignored; a stage-2 row may carry its label as ``"label"`` instead of a labels file);
* stage 1 (experts): two files of rows aligned by position, the compliant answers
  (``affirm``) and the refusing answers (``reject``) to the same instructions, e.g. the
  published ``unsafety_{affirm,reject}.json`` (glad) and ``safety_{affirm,reject}.json`` (unwill);
* stage 2 (routers): a file of rows plus a labels file, a list of 0/1 aligned with it
  (1 = malicious: route to unwill; 0 = benign: route to glad).

Every problem is found before training starts and raised as :class:`DataError`, whose
message names the file and the row (rows are counted from 0 in a JSON list; JSONL
problems also give the 1-based line).

Tokenisation: prompt = ``mogu.prompting.prompt_ids`` (the tokenizer's chat template with
one user turn, an optional system turn and the generation prompt; or, for tokenizers
without one, the Llama-2 template ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{instruction}
[/INST]``, without the ``<<SYS>>`` block when there is no system prompt), the same
prompt generation uses; response = ``output`` + eos. Labels
are -100 on the prompt, so the loss covers the response tokens (and eos) only. Sequences
longer than ``max_length`` are cut at the end; a row whose prompt leaves no response
token within ``max_length`` is a :class:`DataError`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .. import prompting as _prompting

IGNORE_INDEX = -100
FIELDS = ("instruction", "output")


class DataError(ValueError):
    """Bad training data. ``path`` and ``row`` (0-based, or None for whole-file problems)
    name where; the message says what."""

    def __init__(self, path: str, row: Optional[int], message: str):
        self.path, self.row = path, row
        where = f"{path}" if row is None else f"{path}, row {row}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Example:
    """One validated row: its instruction and output text and, for stage 2, its label."""
    instruction: str
    output: str
    label: Optional[int] = None
    path: str = ""          # where the row came from, for errors raised after loading
    row: int = 0


# ------------------------------------------------------------------- reading
def _is_jsonl(path: str) -> bool:
    return path.lower().endswith((".jsonl", ".ndjson"))


def read_json_values(path) -> List[Any]:
    """The values of a JSON list file or a JSONL file (blank lines skipped).

    Raises DataError (naming the file, and the line for JSONL) for a missing or empty
    file, invalid JSON or a JSON file whose top level is not a list.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, None, "file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise DataError(path, None, "file is empty")
    if _is_jsonl(path):
        values = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(path, len(values), f"line {lineno} is not valid JSON: {exc.msg}") from exc
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(path, None, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                                        f"use a .jsonl extension for one JSON value per line") from exc
        if not isinstance(values, list):
            raise DataError(path, None, f"expected a JSON list at the top level, got {type(values).__name__}")
    if not values:
        raise DataError(path, None, "no rows (empty list)")
    return values


def _check_row(path: str, i: int, row: Any) -> Example:
    if not isinstance(row, dict):
        raise DataError(path, i, f"expected an object with {list(FIELDS)}, got {type(row).__name__}")
    for field in FIELDS:
        if field not in row:
            raise DataError(path, i, f"missing field {field!r}")
        if not isinstance(row[field], str):
            raise DataError(path, i, f"field {field!r} must be a string, got {type(row[field]).__name__}")
        if not row[field].strip():
            raise DataError(path, i, f"field {field!r} is empty")
    return Example(row["instruction"], row["output"], path=path, row=i)


def load_rows(path) -> List[Example]:
    """Validated ``{"instruction", "output"}`` rows of a JSON list or JSONL file."""
    path = os.fspath(path)
    return [_check_row(path, i, row) for i, row in enumerate(read_json_values(path))]


def _check_label(path: str, i: int, value: Any) -> int:
    # bool is an int subclass in Python; JSON true/false is not a 0/1 label.
    if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1):
        raise DataError(path, i, f"label must be 0 or 1, got {json.dumps(value)}")
    return int(value)


def load_pairs(affirm, reject) -> List[Tuple[Example, Example]]:
    """Stage 1: (affirm, reject) example pairs of two aligned files.

    Raises DataError for a bad row (naming its file and row), files of different
    lengths, or a row whose instructions differ between the two files.
    """
    affirm, reject = os.fspath(affirm), os.fspath(reject)
    a_rows, r_rows = load_rows(affirm), load_rows(reject)
    if len(a_rows) != len(r_rows):
        raise DataError(reject, min(len(a_rows), len(r_rows)),
                        f"misaligned files: {affirm} has {len(a_rows)} rows but {reject} has {len(r_rows)} "
                        f"(stage 1 needs one refusing answer per compliant answer, same order)")
    for i, (a, r) in enumerate(zip(a_rows, r_rows)):
        if a.instruction.strip() != r.instruction.strip():
            raise DataError(reject, i, f"misaligned files: instruction differs from {affirm}, row {i} "
                                       f"({_clip(r.instruction)!r} vs {_clip(a.instruction)!r})")
    return list(zip(a_rows, r_rows))


def load_labelled(data, labels=None) -> List[Example]:
    """Stage 2: rows with 0/1 labels, from a labels file (JSON list / JSONL of 0/1 aligned
    with ``data``) or, when ``labels`` is None, from each row's ``"label"`` field.

    Raises DataError for a bad row, a label other than 0/1, a labels file whose length
    differs from the data, or (labels=None) a row without a ``"label"`` field.
    """
    data = os.fspath(data)
    raw = read_json_values(data)
    rows = [_check_row(data, i, row) for i, row in enumerate(raw)]
    if labels is None:
        values = []
        for i, row in enumerate(raw):
            if "label" not in row:
                raise DataError(data, i, "missing field 'label' (pass a labels file, or give every row a 0/1 'label')")
            values.append(_check_label(data, i, row["label"]))
    else:
        labels = os.fspath(labels)
        raw_labels = read_json_values(labels)
        values = [_check_label(labels, i, v) for i, v in enumerate(raw_labels)]
        if len(values) != len(rows):
            raise DataError(labels, min(len(values), len(rows)),
                            f"misaligned labels: {labels} has {len(values)} labels but {data} has {len(rows)} rows")
    return [Example(e.instruction, e.output, v, e.path, e.row) for e, v in zip(rows, values)]


def file_fingerprint(path) -> str:
    """sha256 of a file's bytes (recorded with a run, checked when resuming)."""
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _clip(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


# -------------------------------------------------------------- tokenising
def prompt_ids(tokenizer, instruction: str, system: Optional[str] = None) -> List[int]:
    """Token ids of the prompt for ``instruction`` (ends where the answer starts).

    Delegates to :func:`mogu.prompting.prompt_ids`, the one template rule shared with
    generation and evaluation (chat template, else Llama-2 ``[INST]`` with bos).
    """
    return _prompting.prompt_ids(tokenizer, instruction, system)


def response_ids(tokenizer, output: str) -> List[int]:
    """Token ids of an answer: ``output`` then eos (when the tokenizer has one)."""
    ids = list(tokenizer(output, add_special_tokens=False)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids + ([eos] if eos is not None else [])


def tokenize_example(tokenizer, example: Example, max_length: int,
                     system: Optional[str] = None) -> Dict[str, List[int]]:
    """{"input_ids": prompt + response, "labels": -100 on the prompt, ids on the response}.

    Both lists have the same length <= max_length (cut at the end). Raises DataError
    naming the row when no response token fits within max_length.
    """
    p = prompt_ids(tokenizer, example.instruction, system)
    r = response_ids(tokenizer, example.output)
    if len(p) >= max_length:
        raise DataError(example.path, example.row,
                        f"the prompt is {len(p)} tokens, so no response token fits in max_length={max_length}")
    ids = (p + r)[:max_length]
    labels = ([IGNORE_INDEX] * len(p) + r)[:max_length]
    feature = {"input_ids": ids, "labels": labels}
    if example.label is not None:
        feature["label"] = example.label
    return feature


def tokenize_pairs(tokenizer, pairs: Sequence[Tuple[Example, Example]], max_length: int,
                   system: Optional[str] = None) -> List[Dict[str, Dict[str, List[int]]]]:
    """Stage 1 features: [{"affirm": feature, "reject": feature}, ...]."""
    return [{"affirm": tokenize_example(tokenizer, a, max_length, system),
             "reject": tokenize_example(tokenizer, r, max_length, system)} for a, r in pairs]


def tokenize_labelled(tokenizer, examples: Sequence[Example], max_length: int,
                      system: Optional[str] = None) -> List[Dict[str, Any]]:
    """Stage 2 features: [{"input_ids", "labels", "label"}, ...]."""
    return [tokenize_example(tokenizer, e, max_length, system) for e in examples]


# ---------------------------------------------------------------- batching
def pad_features(features: Sequence[Dict[str, List[int]]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad to the longest sequence.

    Returns input_ids (B, T) int64 (pad_id on padding), attention_mask (B, T) int64
    (1 = real token), labels (B, T) int64 (-100 on prompt and padding).
    """
    T = max(len(f["input_ids"]) for f in features)
    B = len(features)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(f["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PairCollator:
    """Stage 1 collate: B pairs -> ONE padded batch of 2B rows, rows [0, B) the compliant
    (affirm) answers and rows [B, 2B) the refusing (reject) answers of the same pairs."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[Dict[str, Dict[str, List[int]]]]) -> Dict[str, torch.Tensor]:
        return pad_features([p["affirm"] for p in batch] + [p["reject"] for p in batch], self.pad_id)


class LabelledCollator:
    """Stage 2 collate: B rows -> padded batch plus ``label`` (B,) int64 (1 malicious, 0 benign)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        out = pad_features(batch, self.pad_id)
        out["label"] = torch.tensor([f["label"] for f in batch], dtype=torch.long)
        return out
