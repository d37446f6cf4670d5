"""The keyword judge on hand-written responses, and the prompt-file readers."""
import json

import pytest

from mogu.judge import DEFAULT_REFUSAL_PHRASES, KeywordJudge
from mogu.prompt_files import read_prompt_file


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
