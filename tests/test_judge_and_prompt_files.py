"""The keyword judge on hand-written responses, and the prompt-file readers."""
import json

import pytest

from mogu.evaluation.judge import DEFAULT_REFUSAL_PHRASES, KeywordJudge
from mogu.evaluation.prompt_files import read_prompt_file


@pytest.mark.parametrize("response,refused", [
    ("I'm sorry, but I can't help with making weapons.", True),
    ("I\u2019m sorry, I cannot do that.", True),                  # curly apostrophe
    ("As an AI language model, I must decline.", True),
    ("I CANNOT assist with that request.", True),                   # case-insensitive
    ("It is not appropriate to discuss how to hurt people.", True),
    ("Sure! Here is a poem about the ocean:\nWaves rise...", False),
    ("Step 1: Gather the following items.", False),
    ("Sorry to hear you're stressed. Here are some tips: ...", False),  # bare 'Sorry' is not a refusal
    ("To bake banana bread, mash three bananas...", False),
])
def test_keyword_judge(response, refused):
    assert KeywordJudge()(response).refused is refused


def test_keyword_judge_edges():
    judge = KeywordJudge()
    empty = judge("")
    assert empty.empty and not empty.refused
    assert judge("   \n").empty
    assert judge("I won't do that.").matched == "I won't"
    custom = KeywordJudge(["nope"])
    assert custom("Nope.").refused and not custom("I'm sorry").refused
    with pytest.raises(ValueError):
        KeywordJudge([])
    with pytest.raises(ValueError):
        judge(None)
    assert "I'm sorry" in DEFAULT_REFUSAL_PHRASES


def test_prompt_file_layouts(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "x1", "label": "malicious"}, {"goal": "x2"}, "x3"]))
    (tmp_path / "b.jsonl").write_text('{"prompt": "y1", "label": 0}\n\n{"instruction": "y2", "label": 1}\n')
    (tmp_path / "c.csv").write_text("goal,target\nz1,Sure here is\n\"z2, with comma\",Sure\n")
    (tmp_path / "d.txt").write_text("w1\n\nw2\n")
    a = read_prompt_file(tmp_path / "a.json", label="benign")
    assert [r["instruction"] for r in a] == ["x1", "x2", "x3"]
    assert [r["label"] for r in a] == ["malicious", "benign", "benign"]
    assert [r["label"] for r in read_prompt_file(tmp_path / "b.jsonl")] == ["benign", "malicious"]
    assert [r["instruction"] for r in read_prompt_file(tmp_path / "c.csv", "malicious")] == ["z1", "z2, with comma"]
    assert [r["instruction"] for r in read_prompt_file(tmp_path / "d.txt")] == ["w1", "w2"]


@pytest.mark.parametrize("name,content,needle", [
    ("e.json", '[{"instruction": "ok"}, {"text": "no field"}]', "row 1"),
    ("f.json", '{"instruction": "not a list"}', "JSON list"),
    ("g.jsonl", '{"instruction": "ok"}\n{broken\n', "row 1"),
    ("h.csv", "question\nq1\n", "goal"),
    ("i.json", '[{"instruction": "ok", "label": "maybe"}]', "row 0"),
    ("j.json", '[{"instruction": "  "}]', "row 0"),
    ("k.json", "[]", "no prompts"),
    ("l.yaml", "- a", "unknown prompt file type"),
])
def test_malformed_prompt_files_name_file_and_row(tmp_path, name, content, needle):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=needle) as info:
        read_prompt_file(tmp_path / name)
    assert name in str(info.value)
    with pytest.raises(FileNotFoundError):
        read_prompt_file(tmp_path / "missing.json")


def test_prompt_rows_carry_category_and_system(tmp_path):
    # Old files: category follows the label (None when unlabelled), no system prompt.
    (tmp_path / "old.jsonl").write_text('{"instruction": "a", "label": "benign"}\n{"instruction": "b", "label": 1}\n'
                                        '{"instruction": "c"}\n')
    assert read_prompt_file(tmp_path / "old.jsonl") == [
        {"instruction": "a", "label": "benign", "category": "benign", "system": None},
        {"instruction": "b", "label": "malicious", "category": "malicious", "system": None},
        {"instruction": "c", "label": None, "category": None, "system": None}]
    # The shipped layout: category implies the label; topic/form pass through, other keys are ignored.
    (tmp_path / "new.jsonl").write_text("\n".join(json.dumps(o) for o in [
        {"instruction": "kill a python process", "label": "benign", "category": "borderline", "topic": "computing",
         "form": "question", "system": "You are a shell expert.", "core": "kill process"},
        {"instruction": "wrapped request", "category": "jailbreak", "topic": "weapons"},
        {"instruction": "plain bad", "category": "Malicious", "system": "   "},
        {"instruction": "edge", "category": "borderline"},
    ]) + "\n")
    rows = read_prompt_file(tmp_path / "new.jsonl")
    assert rows[0] == {"instruction": "kill a python process", "label": "benign", "category": "borderline",
                       "system": "You are a shell expert.", "topic": "computing", "form": "question"}
    assert rows[1] == {"instruction": "wrapped request", "label": "malicious", "category": "jailbreak",
                       "system": None, "topic": "weapons"}
    assert (rows[2]["label"], rows[2]["category"], rows[2]["system"]) == ("malicious", "malicious", None)
    assert (rows[3]["label"], rows[3]["category"]) == ("benign", "borderline")
    # CSV columns work the same way (an empty cell is absent).
    (tmp_path / "c.csv").write_text("goal,category,system\ng1,jailbreak,\ng2,,sys two\ng3,,\n")
    rows = read_prompt_file(tmp_path / "c.csv", label="malicious")
    assert [(r["label"], r["category"], r["system"]) for r in rows] == [
        ("malicious", "jailbreak", None), ("malicious", "malicious", "sys two"), ("malicious", "malicious", None)]


def test_file_level_category_and_row_precedence(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps(["plain", {"instruction": "own label", "label": "benign"},
                                                 {"instruction": "bad one", "label": "malicious"},
                                                 {"instruction": "wrapped", "category": "jailbreak"}]))
    rows = read_prompt_file(tmp_path / "b.json", label="benign", category="borderline")
    assert [(r["label"], r["category"]) for r in rows] == [
        ("benign", "borderline"), ("benign", "borderline"), ("malicious", "malicious"), ("malicious", "jailbreak")]
    # The category alone implies the label; a plain benign file leaves rows benign.
    assert read_prompt_file(tmp_path / "b.json", category="borderline")[0]["label"] == "benign"
    assert read_prompt_file(tmp_path / "b.json", label="benign")[0]["category"] == "benign"
    with pytest.raises(ValueError, match=r"b\.json: label 'malicious' contradicts category 'borderline'"):
        read_prompt_file(tmp_path / "b.json", label="malicious", category="borderline")


@pytest.mark.parametrize("name,content,needle", [
    ("m.json", '[{"instruction": "ok"}, {"instruction": "x", "label": "malicious", "category": "borderline"}]',
     r"row 1: label 'malicious' contradicts category 'borderline'"),
    ("n.jsonl", '{"instruction": "x", "label": 0, "category": "jailbreak"}\n',
     r"row 0: label 'benign' contradicts category 'jailbreak'"),
    ("o.json", '[{"instruction": "x", "label": "harmless", "category": "malicious"}]', r"row 0: label 'benign' contra"),
    ("p.json", '[{"instruction": "x"}, {"instruction": "y"}, {"instruction": "z", "category": "harmfulish"}]',
     r"row 2: category 'harmfulish' is not one of benign, borderline, malicious, jailbreak"),
    ("q.json", '[{"instruction": "x", "category": 1}]', r"row 0: category 1 is not one of"),
    ("r.json", '[{"instruction": "x", "system": ["not", "a", "string"]}]', r"row 0: system must be a string"),
    ("s.csv", "goal,label,category\nok,,\nx,benign,jailbreak\n", r"row 1: label 'benign' contradicts"),
])
def test_category_errors_name_file_and_row(tmp_path, name, content, needle):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=needle) as info:
        read_prompt_file(tmp_path / name)
    assert name in str(info.value)
