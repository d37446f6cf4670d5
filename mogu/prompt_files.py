"""Read evaluation prompt files into rows {"instruction": str, "label": "benign"|"malicious"|None}.

Accepted layouts (by extension):
  .json   a list of objects with "instruction" (or "prompt", "goal"), or a list of strings
  .jsonl  one such object (or string) per line
  .csv    a header with "goal" (AdvBench/HarmBench) or "instruction"/"prompt"
  .txt    one prompt per non-blank line
An optional per-row "label" ("benign"/"malicious", or 0/1 with 1 = malicious) overrides
the file-level ``label``. Malformed input raises ValueError naming the file and row.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Dict, List, Optional

TEXT_FIELDS = ("instruction", "prompt", "goal")
LABELS = {"benign": "benign", "malicious": "malicious", "harmful": "malicious", "harmless": "benign",
          "0": "benign", "1": "malicious", 0: "benign", 1: "malicious"}


def _label(value, path: str, row: int) -> Optional[str]:
    if value is None or value == "":
        return None
    key = value.lower() if isinstance(value, str) else value
    if isinstance(key, bool) or key not in LABELS:
        raise ValueError(f"{path}: row {row}: label {value!r} is not benign/malicious or 0/1")
    return LABELS[key]


def _row(obj, path: str, row: int, default_label: Optional[str]) -> Dict:
    if isinstance(obj, str):
        text, label = obj, None
    elif isinstance(obj, dict):
        field = next((f for f in TEXT_FIELDS if f in obj), None)
        if field is None:
            raise ValueError(f"{path}: row {row}: no {' / '.join(TEXT_FIELDS)} field (keys: {sorted(obj)})")
        text, label = obj[field], _label(obj.get("label"), path, row)
    else:
        raise ValueError(f"{path}: row {row}: expected an object or a string, got {type(obj).__name__}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{path}: row {row}: the prompt is empty or not a string")
    return {"instruction": text.strip(), "label": label or default_label}


def read_prompt_file(path, label: Optional[str] = None) -> List[Dict]:
    """Rows of a prompt file; ``label`` ("benign"/"malicious"/None) applies to unlabelled rows."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    default = _label(label, path, 0) if label is not None else None
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8", newline="") as f:
        if ext == ".json":
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON: {exc}") from exc
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of prompts, got {type(data).__name__}")
            rows = [_row(o, path, i, default) for i, o in enumerate(data)]
        elif ext == ".jsonl":
            rows = []
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}: row {i}: not valid JSON: {exc}") from exc
                    rows.append(_row(obj, path, i, default))
        elif ext == ".csv":
            reader = csv.DictReader(f)
            field = next((c for c in ("goal",) + TEXT_FIELDS if c in (reader.fieldnames or [])), None)
            if field is None:
                raise ValueError(f"{path}: no goal / instruction / prompt column (columns: {reader.fieldnames})")
            rows = [_row({"instruction": r[field], "label": r.get("label")}, path, i, default)
                    for i, r in enumerate(reader)]
        elif ext == ".txt":
            rows = [_row(line, path, i, default) for i, line in enumerate(f) if line.strip()]
        else:
            raise ValueError(f"{path}: unknown prompt file type {ext!r} (use .json, .jsonl, .csv or .txt)")
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows
