"""The shipped safety instruction set and its train / validation / test split.

``mogu/samples/safety/raw/*.jsonl`` holds instructions written for this project (no
answers; never text from public red-team or instruction benchmarks, which are for
evaluation only). Each row: ``{"instruction", "label": "benign"|"malicious", "category":
"benign"|"borderline"|"malicious"|"jailbreak", "topic", "form", "system"?, "core"?}``
(``core``: the bare request inside a jailbreak-wrapped prompt).

:func:`make_splits` writes ``mogu/samples/safety/{train,validation,test}.jsonl``:

* near-duplicates are grouped first (union-find over every pair judged near-duplicate by
  :func:`near_duplicate`, comparing instructions and jailbreak cores), and a group always
  lands in one split, so no split holds a paraphrase of another split's row;
* groups are shuffled with a fixed seed and dealt per category in the ratio 60 / 20 / 20.

Regenerate after editing a raw file with ``python -m mogu.evaluation.safety_data``; the tests check
that the shipped splits are exactly what this produces, and that no pair across splits
is a near-duplicate. Tune every setting on ``validation``; report ``test`` once.
"""
from __future__ import annotations

import json
import os
import random
import re
from typing import Dict, Iterable, List, Sequence, Tuple

from ..checkpoint import atomic_write_text

# The shipped set lives in the package data folder mogu/samples/safety.
SAFETY_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", "safety")
RAW_DIR = os.path.join(SAFETY_DIR, "raw")
RAW_FILES = ("benign.jsonl", "borderline.jsonl", "malicious.jsonl", "jailbreak.jsonl")
TEMPLATES_DIR = os.path.join(SAFETY_DIR, "jailbreak_templates")
SPLITS = ("train", "validation", "test")
RATIOS = (0.6, 0.2, 0.2)
SEED = 20261202
CATEGORIES = {"benign": "benign", "borderline": "benign", "malicious": "malicious", "jailbreak": "malicious"}

SHINGLE_JACCARD = 0.5      # word 3-gram Jaccard at or above this: near-duplicate
WORD_JACCARD = 0.8         # or word-set Jaccard at or above this (texts of >= 3 words)

_WORD = re.compile(r"[a-z0-9']+")


def split_path(split: str) -> str:
    """Path of a shipped split file ("train", "validation" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"mogu.safety_data: unknown split {split!r}; expected one of {list(SPLITS)}")
    return os.path.join(SAFETY_DIR, f"{split}.jsonl")


def read_jsonl(path: str) -> List[Dict]:
    """Rows of a JSONL file; ValueError naming the file and line for a bad row."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {i}: not valid JSON: {exc}") from exc
            text = row.get("instruction") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}: line {i}: expected an object with a non-empty 'instruction'")
            category = row.get("category")
            if CATEGORIES.get(category) != row.get("label"):
                raise ValueError(f"{path}: line {i}: category {category!r} with label {row.get('label')!r} (expected "
                                 f"one of {CATEGORIES})")
            rows.append(row)
    return rows


def load_split(split: str) -> List[Dict]:
    """The rows of a shipped split."""
    return read_jsonl(split_path(split))


def words(text: str) -> List[str]:
    return _WORD.findall(text.lower())


def shingles(text: str, n: int = 3) -> frozenset:
    w = words(text)
    return frozenset(tuple(w[i:i + n]) for i in range(max(1, len(w) - n + 1)))


def _jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if (a or b) else 1.0


class _Text:
    """Pre-computed comparison keys of one text."""
    __slots__ = ("shingles", "words")

    def __init__(self, text: str):
        self.shingles = shingles(text)
        self.words = frozenset(words(text))


def near_duplicate(a, b) -> bool:
    """Whether two texts (str or pre-computed) are near-duplicates (thresholds above)."""
    a = a if isinstance(a, _Text) else _Text(a)
    b = b if isinstance(b, _Text) else _Text(b)
    if _jaccard(a.shingles, b.shingles) >= SHINGLE_JACCARD:
        return True
    return min(len(a.words), len(b.words)) >= 3 and _jaccard(a.words, b.words) >= WORD_JACCARD


def _texts(row: Dict) -> List[str]:
    return [row["instruction"]] + ([row["core"]] if isinstance(row.get("core"), str) else [])


def near_duplicate_pairs(rows: Sequence[Dict], across: Sequence[int] = None) -> List[Tuple[int, int]]:
    """Index pairs (i < j) of rows that are near-duplicates by any of their texts.

    across: optional group id per row; only pairs in different groups are returned.
    """
    keys = [[_Text(t) for t in _texts(r)] for r in rows]
    # Candidate pairs share at least one word of a text (an inverted index keeps this fast).
    index: Dict[str, set] = {}
    for i, ks in enumerate(keys):
        for k in ks:
            for w in k.words:
                index.setdefault(w, set()).add(i)
    pairs = []
    for i, ks in enumerate(keys):
        candidates = set()
        for k in ks:
            for w in k.words:
                candidates |= index[w]
        for j in sorted(c for c in candidates if c > i):
            if across is not None and across[i] == across[j]:
                continue
            if any(near_duplicate(a, b) for a in ks for b in keys[j]):
                pairs.append((i, j))
    return pairs


def _groups(n: int, pairs: Iterable[Tuple[int, int]]) -> List[int]:
    """Union-find: a group id (its smallest member) per index."""
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, j in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(n)]


def read_raw(raw_dir: str = RAW_DIR) -> List[Dict]:
    """Every raw row, in file order, with an "id" ("<file stem>-<line number>")."""
    rows = []
    for name in RAW_FILES:
        path = os.path.join(raw_dir, name)
        for i, row in enumerate(read_jsonl(path), 1):
            rows.append({"id": f"{os.path.splitext(name)[0]}-{i:04d}", **row})
    seen: Dict[str, str] = {}
    for r in rows:
        key = " ".join(words(r["instruction"]))
        if key in seen:
            raise ValueError(f"mogu.safety_data: {r['id']} repeats {seen[key]}: {r['instruction'][:60]!r}")
        seen[key] = r["id"]
    return rows


def assign_splits(rows: Sequence[Dict], seed: int = SEED, ratios: Sequence[float] = RATIOS) -> List[str]:
    """The split of each row: near-duplicate groups kept whole, dealt per category."""
    group = _groups(len(rows), near_duplicate_pairs(rows))
    members: Dict[int, List[int]] = {}
    for i, g in enumerate(group):
        members.setdefault(g, []).append(i)
    split = [""] * len(rows)
    rng = random.Random(seed)
    by_category: Dict[str, List[int]] = {}
    for g, idx in members.items():           # a group's category: that of its first row
        by_category.setdefault(rows[idx[0]]["category"], []).append(g)
    for category in sorted(by_category):
        gs = sorted(by_category[category])
        rng.shuffle(gs)
        total = sum(len(members[g]) for g in gs)
        bounds = [ratios[0] * total, (ratios[0] + ratios[1]) * total]
        done = 0
        for g in gs:
            name = SPLITS[0] if done < bounds[0] else SPLITS[1] if done < bounds[1] else SPLITS[2]
            for i in members[g]:
                split[i] = name
            done += len(members[g])
    return split


def make_splits(raw_dir: str = RAW_DIR, out_dir: str = SAFETY_DIR, seed: int = SEED) -> Dict[str, List[Dict]]:
    """Read the raw files, split them, write ``<out_dir>/<split>.jsonl``; returns the rows."""
    rows = read_raw(raw_dir)
    names = assign_splits(rows, seed)
    result = {s: [r for r, n in zip(rows, names) if n == s] for s in SPLITS}
    for s, part in result.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        atomic_write_text(os.path.join(out_dir, f"{s}.jsonl"), text)
    return result


def counts(rows: Sequence[Dict]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for r in rows:
        out[r["category"]] = out.get(r["category"], 0) + 1
    return dict(sorted(out.items()))


if __name__ == "__main__":
    for split, part in make_splits().items():
        print(f"{split:>10}: {len(part):4d} rows  {counts(part)}")
