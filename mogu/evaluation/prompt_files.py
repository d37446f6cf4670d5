"""Read evaluation prompt files into rows.

A row is ``{"instruction": str, "label": "benign"|"malicious"|None, "category":
"benign"|"borderline"|"malicious"|"jailbreak"|None, "system": str|None}``, plus ``"topic"``
and ``"form"`` when the input row has them (passed through unchanged).

Accepted layouts (by extension):
  .json   a list of objects with "instruction" (or "prompt", "goal"), or a list of strings
  .jsonl  one such object (or string) per line
  .csv    a header with "goal" (AdvBench/HarmBench) or "instruction"/"prompt"; optional
          label, category, system, topic, form columns (an empty cell = absent)
  .txt    one prompt per non-blank line
Optional per-row fields (objects and CSV columns); other keys are ignored:
  label     "benign"/"malicious" (or "harmless"/"harmful", or 0/1 with 1 = malicious)
  category  "benign", "borderline" (benign but looks risky: over-refusal probes; implies
            label benign), "malicious", "jailbreak" (a malicious request in a jailbreak
            wrapper; implies label malicious). A row whose label contradicts its category
            is an error.
  system    a system prompt for this row (evaluation uses it instead of the global one;
            an empty string counts as absent)
A row's own label/category win over the file-level ``label``/``category``. Without its own
category a row's category is the file-level category when that agrees with the row's label,
else the label (benign/malicious), else None (unlabelled). Malformed input raises ValueError
naming the file and row.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Dict, List, Optional

TEXT_FIELDS = ("instruction", "prompt", "goal")
LABELS = {"benign": "benign", "malicious": "malicious", "harmful": "malicious", "harmless": "benign",
          "0": "benign", "1": "malicious", 0: "benign", 1: "malicious"}
CATEGORIES = ("benign", "borderline", "malicious", "jailbreak")
CATEGORY_LABEL = {"benign": "benign", "borderline": "benign", "malicious": "malicious", "jailbreak": "malicious"}
PASS_THROUGH = ("topic", "form")
CSV_FIELDS = ("label", "category", "system") + PASS_THROUGH


def _where(path: str, row: Optional[int]) -> str:
    return f"{path}: row {row}" if row is not None else path


def _label(value, path: str, row: Optional[int]) -> Optional[str]:
    if value is None or value == "":
        return None
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, bool) or key not in LABELS:
        raise ValueError(f"{_where(path, row)}: label {value!r} is not benign/malicious or 0/1")
    return LABELS[key]


def _category(value, path: str, row: Optional[int]) -> Optional[str]:
    if value is None or value == "":
        return None
    key = value.strip().lower() if isinstance(value, str) else None
    if key not in CATEGORIES:
        raise ValueError(f"{_where(path, row)}: category {value!r} is not one of {', '.join(CATEGORIES)}")
    return key


def _settle(label: Optional[str], category: Optional[str], path: str, row: Optional[int]):
    """(label, category) of one row (or of the file when ``row`` is None) from what it says;
    a category implies its label, a contradiction is a ValueError."""
    if category is not None:
        implied = CATEGORY_LABEL[category]
        if label is not None and label != implied:
            raise ValueError(f"{_where(path, row)}: label {label!r} contradicts category {category!r} (a "
                             f"{category} prompt is {implied})")
        return implied, category
    return label, label


def _row(obj, path: str, row: int, default_label: Optional[str], default_category: Optional[str]) -> Dict:
    extra = {}
    if isinstance(obj, str):
        text, label, category, system = obj, None, None, None
    elif isinstance(obj, dict):
        field = next((f for f in TEXT_FIELDS if f in obj), None)
        if field is None:
            raise ValueError(f"{path}: row {row}: no {' / '.join(TEXT_FIELDS)} field (keys: {sorted(obj)})")
        text = obj[field]
        label = _label(obj.get("label"), path, row)
        category = _category(obj.get("category"), path, row)
        system = obj.get("system")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"{path}: row {row}: system must be a string, got {type(system).__name__}")
        system = system.strip() if system and system.strip() else None
        extra = {k: obj[k] for k in PASS_THROUGH if obj.get(k) not in (None, "")}
    else:
        raise ValueError(f"{path}: row {row}: expected an object or a string, got {type(obj).__name__}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{path}: row {row}: the prompt is empty or not a string")
    label, category = _settle(label, category, path, row)
    if label is None:                                    # nothing of its own: the file's
        label, category = default_label, default_category
    elif category == label and default_category is not None and CATEGORY_LABEL[default_category] == label:
        category = default_category                      # e.g. a row labelled benign in a borderline file
    return {"instruction": text.strip(), "label": label, "category": category, "system": system, **extra}


def read_prompt_file(path, label: Optional[str] = None, category: Optional[str] = None) -> List[Dict]:
    """Rows of a prompt file (see the module docstring for the layouts and row fields).

    label ("benign"/"malicious"/None) and category (one of ``CATEGORIES`` or None) apply to
    rows that carry neither; a category implies its label (borderline -> benign, jailbreak ->
    malicious). Raises FileNotFoundError for a missing file, ValueError naming the file (and
    row) for a malformed one or contradicting label/category."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    default_label, default_category = _settle(_label(label, path, None), _category(category, path, None), path, None)
    ext = os.path.splitext(path)[1].lower()
    row = lambda obj, i: _row(obj, path, i, default_label, default_category)   # noqa: E731
    with open(path, encoding="utf-8", newline="") as f:
        if ext == ".json":
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON: {exc}") from exc
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of prompts, got {type(data).__name__}")
            rows = [row(o, i) for i, o in enumerate(data)]
        elif ext == ".jsonl":
            rows = []
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}: row {i}: not valid JSON: {exc}") from exc
                    rows.append(row(obj, i))
        elif ext == ".csv":
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            field = next((c for c in ("goal",) + TEXT_FIELDS if c in columns), None)
            if field is None:
                raise ValueError(f"{path}: no goal / instruction / prompt column (columns: {reader.fieldnames})")
            rows = [row({"instruction": r[field], **{k: r[k] for k in CSV_FIELDS if k in columns}}, i)
                    for i, r in enumerate(reader)]
        elif ext == ".txt":
            rows = [row(line, i) for i, line in enumerate(f) if line.strip()]
        else:
            raise ValueError(f"{path}: unknown prompt file type {ext!r} (use .json, .jsonl, .csv or .txt)")
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows
