"""The ``mogu`` commands on bad input: one line ``mogu CMD: error: ...`` naming the file, key
or argument, a non-zero exit, no traceback (unless ``--debug`` / ``MOGU_DEBUG=1``), and every
path checked before the model loads. Also local-first model loading (a missing folder is
never a hub lookup, offline mode fails at once, a folder's only .gguf file is found),
``mogu --version`` and the help texts. All in-process through ``mogu.cli.main``; the
transformers loaders are replaced so that a load is recorded (and no test downloads)."""
from __future__ import annotations

import json
import os
from importlib import metadata

import pytest
import transformers
from tiny_models import tiny_llama
from tiny_tokenizer import tiny_tokenizer

import mogu
from mogu.cli import common as cli_common
from mogu.cli import build_parser, main
from mogu.generation import is_hub_name, resolve_model_path

COMMANDS = ("generate", "chat", "build-data", "eval", "calibrate", "probe", "train-expert", "train-router")


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def loads(monkeypatch):
    """Replace the transformers loaders: every call is recorded, and it fails."""
    calls = []

    def refuse(kind):
        def load(*args, **kwargs):
            calls.append((kind, args, kwargs))
            raise AssertionError(f"{kind}.from_pretrained called: the model must not load")
        return load
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse("model"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse("tokenizer"))
    return calls


@pytest.fixture
def tiny_loads(monkeypatch):
    """Replace the transformers loaders by the tiny test model and tokenizer, recording the calls."""
    calls = []

    def model(*args, **kwargs):
        calls.append(("model", args, kwargs))
        return tiny_llama()

    def tokenizer(*args, **kwargs):
        calls.append(("tokenizer", args, kwargs))
        return tiny_tokenizer()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    return calls


@pytest.fixture
def files(tmp_path):
    """A valid-looking input of every kind, so each case breaks exactly one thing."""
    f = type("Files", (), {})()
    f.root = tmp_path
    f.model = tmp_path / "model"                       # a Hugging Face folder (config.json is what is checked)
    f.model.mkdir()
    (f.model / "config.json").write_text("{}")
    f.prompts = tmp_path / "prompts.jsonl"
    f.prompts.write_text(json.dumps({"instruction": "w10 w11", "label": "benign"}) + "\n"
                         + json.dumps({"instruction": "w12 w13", "label": "malicious"}) + "\n")
    rows = [{"instruction": f"w{10 + i}", "output": f"w{20 + i}"} for i in range(4)]
    f.affirm = tmp_path / "affirm.json"
    f.affirm.write_text(json.dumps(rows))
    f.reject = tmp_path / "reject.json"
    f.reject.write_text(json.dumps([{**r, "output": "w30"} for r in rows]))
    f.labels = tmp_path / "labels.json"
    f.labels.write_text(json.dumps([1, 0, 1, 0]))
    for expert in ("glad", "unwill"):
        d = tmp_path / expert
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
        (d / "adapter_model.safetensors").write_bytes(b"")
        setattr(f, expert, d)
    f.mogu = tmp_path / "moguf"
    f.mogu.mkdir()
    (f.mogu / "mogu_config.json").write_text("{}")
    (f.mogu / "mogu_model.safetensors").write_bytes(b"")
    f.bad_json = tmp_path / "bad.json"
    f.bad_json.write_text("[{\"instruction\": ")
    f.not_a_folder = tmp_path / "plain.txt"
    f.not_a_folder.write_text("x")
    f.out = tmp_path / "out"
    return f


def one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"mogu {command}: error: "), err
    assert "Traceback" not in err and "mogu: " not in lines[0], err         # no doubled prefix
    return lines[0]


# ------------------------------------------------------------------ one line, exit 1, model not loaded
def _cases(f):
    m, s = ["--model", str(f.model)], str
    busy = f.root / "busy"
    busy.mkdir()
    (busy / "generations.jsonl").write_text("")
    (busy / "responses.jsonl").write_text("")
    trained = f.root / "trained"
    trained.mkdir()
    (trained / "training_log.jsonl").write_text("")
    two = f.root / "two_gguf"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"GGUF")
    (two / "b.gguf").write_bytes(b"GGUF")
    neither = f.root / "neither"
    neither.mkdir()
    no_weights = f.root / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    expert = ["--expert", "glad", "--affirm", s(f.affirm), "--reject", s(f.reject), "--out", s(f.out)]
    router = ["--glad", s(f.glad), "--unwill", s(f.unwill), "--data", s(f.affirm), "--labels", s(f.labels),
              "--out", s(f.out)]
    return [
        # generate / chat: model folder, GGUF file, MoGU folder, arguments
        ("generate", ["--model", s(f.root / "nope-model"), "--prompt", "hi"],
         f"model folder not found: {f.root / 'nope-model'}"),
        ("generate", ["--model", s(two), "--prompt", "hi"], "several GGUF files (a.gguf, b.gguf)"),
        ("generate", ["--model", s(two), "--gguf-file", "c.gguf", "--prompt", "hi"],
         f"GGUF file not found: {two / 'c.gguf'} (it holds a.gguf, b.gguf)"),
        ("generate", ["--model", s(neither), "--prompt", "hi"], "neither config.json nor a .gguf file"),
        ("generate", ["--model", s(f.not_a_folder), "--prompt", "hi"], "must be a folder"),
        ("generate", m + ["--mogu", s(f.root / "no-mogu"), "--prompt", "hi"],
         f"MoGU folder not found: {f.root / 'no-mogu'} (--mogu)"),
        ("generate", m + ["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
        ("chat", m + ["--mogu", s(neither)], "holds neither mogu_config.json nor a published release"),
        ("chat", ["--model", s(f.root / "nope-model")], "model folder not found"),
        # build-data: prompt files, refusals, output conflicts
        ("build-data", m + ["--benign", s(f.root / "missing.jsonl"), "--malicious", s(f.prompts), "--out", s(f.out)],
         "prompt file not found"),
        ("build-data", m + ["--instructions", s(f.bad_json), "--out", s(f.out)], "bad.json"),
        ("build-data", m + ["--instructions", s(f.prompts), "--refusals", s(f.root / "nope.txt"), "--out", s(f.out)],
         "refusal templates file not found"),
        ("build-data", m + ["--instructions", s(f.prompts), "--out", s(busy), "--no-resume"],
         "already holds generations.jsonl"),
        ("build-data", m + ["--instructions", s(f.prompts), "--out", s(f.not_a_folder)], "is not a folder"),
        ("build-data", ["--model", s(f.root / "nope-model"), "--instructions", s(f.prompts), "--out", s(f.out)],
         "model folder not found"),
        # eval: MoGU folder, prompts, templates, phrases, output
        ("eval", m + ["--mogu", s(f.root / "no-mogu"), "--prompts", s(f.prompts), "--out", s(f.out)],
         "MoGU folder not found"),
        ("eval", m + ["--prompts", s(f.prompts), "--templates", s(f.root / "no-templates"), "--out", s(f.out)],
         "no-templates"),
        ("eval", m + ["--prompts", s(f.prompts), "--refusal-phrases", s(f.root / "none.txt"), "--out", s(f.out)],
         "none.txt"),
        ("eval", m + ["--prompts", s(f.prompts), "--out", s(busy), "--no-resume"], "already holds responses.jsonl"),
        ("eval", m + ["--prompts", s(f.prompts), "--out", os.path.join(os.path.dirname(mogu.__file__), "x")],
         "inside the mogu package folder"),
        ("eval", m + ["--prompts", s(f.prompts), "--judge-url", "http://x", "--out", s(f.out)],
         "--judge-url needs --judge-model"),
        # calibrate / probe
        ("calibrate", m + ["--mogu", s(f.root / "no-mogu"), "--prompts", s(f.prompts), "--out", s(f.out)],
         "MoGU folder not found"),
        ("calibrate", m + ["--mogu", s(neither), "--prompts", s(f.prompts), "--out", s(f.out)],
         "MoGU folder config not found"),
        ("calibrate", m + ["--mogu", s(f.mogu), "--prompts", s(f.bad_json), "--out", s(f.out)], "bad.json"),
        ("probe", m + ["--train", s(f.prompts), "--heldout", s(f.root / "missing.jsonl"), "--out", s(f.out)],
         "prompt file not found"),
        ("probe", m + ["--train", s(f.prompts), "--heldout", s(f.prompts), "--out", s(f.not_a_folder)],
         "is not a folder"),
        # train-expert: data files, output folder, resume, tokenizer, model
        ("train-expert", m + ["--expert", "glad", "--affirm", s(f.root / "nope.json"), "--reject", s(f.reject),
                              "--out", s(f.out)], "nope.json: file not found"),
        ("train-expert", m + ["--expert", "glad", "--affirm", s(f.bad_json), "--reject", s(f.reject),
                              "--out", s(f.out)], "bad.json: not valid JSON"),
        ("train-expert", m + ["--expert", "glad", "--affirm", s(f.affirm), "--reject", s(f.reject),
                              "--out", s(trained)], "exists and is not empty"),
        ("train-expert", m + expert + ["--resume"], "no checkpoint"),
        ("train-expert", m + expert + ["--tokenizer", s(f.root / "nope-tok")], "tokenizer folder not found"),
        ("train-expert", ["--model", s(f.root / "nope-model")] + expert, "model folder not found"),
        ("train-expert", m + ["--expert", "glad", "--affirm", s(f.affirm), "--reject", s(f.reject),
                              "--out", os.path.dirname(mogu.__file__) + "/"], "inside the mogu package folder"),
        ("train-expert", m + expert + ["--pairs-per-step", "3", "--batch-size", "2"],
         "--pairs-per-step 3 must be a multiple of --batch-size 2"),
        ("train-expert", m + expert + ["--epochs", "0"], "--epochs must be positive"),
        ("eval", m + ["--prompts", s(f.prompts), "--batch-size", "0", "--out", s(f.out)],
         "--batch-size must be positive"),
        ("calibrate", m + ["--mogu", s(f.mogu), "--prompts", s(f.prompts), "--target", "2", "--out", s(f.out)],
         "--target must be in [0, 1]"),
        ("calibrate", m + ["--mogu", s(f.mogu), "--prompts", s(f.prompts), "--offsets", "1", "0", "--out",
                           s(f.out)], "--offsets must be ascending"),
        # train-router: adapter folders, data and labels, router file, model
        ("train-router", m + ["--glad", s(f.root / "no-glad")] + router[2:], "glad adapter folder not found"),
        ("train-router", m + router[:2] + ["--unwill", s(no_weights)] + router[4:],
         "unwill adapter weights not found"),
        ("train-router", m + router[:2] + ["--unwill", s(neither)] + router[4:], "unwill adapter config not found"),
        ("train-router", m + router[:4] + ["--data", s(f.affirm), "--labels", s(f.bad_json), "--out", s(f.out)],
         "bad.json"),
        ("train-router", m + router + ["--router", s(f.root / "no_router.pth")], "router file (--router) not found"),
        ("train-router", ["--model", s(f.root / "nope-model")] + router, "model folder not found"),
    ]


def test_every_command_fails_with_one_line_before_the_model_loads(files, loads, capsys):
    cases = _cases(files)
    assert {c[0] for c in cases} == set(COMMANDS)                      # every command is exercised
    for command, argv, expected in cases:
        code = main([command] + argv)
        err = capsys.readouterr().err
        line = one_error_line(err, command)
        assert code == 1, (command, argv, err)
        assert expected in line, (command, argv, line)
        assert not loads, (command, argv, loads)                       # checked before anything loaded
    assert not files.out.exists()                                      # and nothing was written


def test_bad_options_are_one_line_with_exit_2(capsys):
    for argv, expected in ((["generate", "--prompt", "hi"], "required: --model"),
                           (["train-expert", "--model", "m", "--expert", "nobody"], "invalid choice"),
                           (["eval", "--model", "m", "--batch-size", "x"], "invalid int value")):
        assert main(argv) == 2
        line = one_error_line(capsys.readouterr().err, argv[0])
        assert expected in line and f"(see mogu {argv[0]} --help)" in line


def test_trailing_slash_is_not_doubled(files, loads, capsys):
    assert main(["generate", "--model", str(files.root / "nope") + "/", "--prompt", "hi"]) == 1
    line = one_error_line(capsys.readouterr().err, "generate")
    assert line.endswith(f"model folder not found: {files.root / 'nope'}")
    assert main(["eval", "--model", str(files.model), "--mogu", str(files.root / "gone") + "//", "--prompts",
                 str(files.prompts), "--out", str(files.out) + "/"]) == 1
    line = one_error_line(capsys.readouterr().err, "eval")
    assert "//" not in line and f"{files.root / 'gone'} (--mogu)" in line


# ------------------------------------------------------------------ --debug / MOGU_DEBUG
@pytest.mark.parametrize("how", ["top", "sub", "env"])
def test_debug_shows_the_traceback(files, loads, capsys, monkeypatch, how):
    argv = ["generate", "--model", str(files.root / "nope"), "--prompt", "hi"]
    monkeypatch.delenv(cli_common.DEBUG_ENV, raising=False)
    assert main(argv) == 1
    assert "Traceback" not in capsys.readouterr().err
    if how == "top":
        argv = ["--debug"] + argv
    elif how == "sub":
        argv = argv + ["--debug"]
    else:
        monkeypatch.setenv(cli_common.DEBUG_ENV, "1")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "resolve_model_path" in err
    assert err.strip().splitlines()[-1] == f"mogu generate: error: model folder not found: {files.root / 'nope'}"


def test_unexpected_errors_are_named_and_point_at_debug(files, monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    assert main(["generate", "--model", str(files.model), "--prompt", "hi"]) == 1
    line = one_error_line(capsys.readouterr().err, "generate")
    assert line == "mogu generate: error: RuntimeError: boom second line (--debug or MOGU_DEBUG=1 shows the traceback)"


# ------------------------------------------------------------------ local-first model loading
def test_hub_names_only_when_they_cannot_be_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("gpt2", "meta-llama/Llama-2-7b-chat-hf", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert is_hub_name(name), name
    for name in ("/abs/model", "./model", "../model", "~/model", "runs/model", "a/b/c", "model/", "x.gguf",
                 "bad name", "a--b"):
        assert not is_hub_name(name), name
    for name in ("/abs/model", "./model", "runs/model", "model/"):
        with pytest.raises(FileNotFoundError, match="model folder not found"):
            resolve_model_path(name)
    # A hub name is passed on (no lookup here) when not offline.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert resolve_model_path("nope-org/nope-model") == ("nope-org/nope-model", None)


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_mode_fails_at_once_for_an_uncached_hub_name(tmp_path, monkeypatch, loads, capsys, var):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))          # an empty cache
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv(var, "1")
    assert main(["generate", "--model", "nope-org/nope-model", "--prompt", "hi"]) == 1
    line = one_error_line(capsys.readouterr().err, "generate")
    assert "nope-org/nope-model" in line and f"offline mode ({var}=1)" in line and "not in the local" in line
    assert not loads
    assert main(["train-expert", "--model", "nope-org/nope-model", "--expert", "glad", "--affirm", "a", "--reject",
                 "b", "--out", str(tmp_path / "o")]) == 1         # data first: a missing file is named
    assert "a: file not found" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="offline mode"):
        mogu.load_for_inference("nope-org/nope-model")               # the API too
    assert not loads


def test_a_folder_with_one_gguf_file_is_used_without_gguf_file(tmp_path, tiny_loads, capsys):
    folder = tmp_path / "smol"
    folder.mkdir()
    (folder / "tiny.Q4_1.gguf").write_bytes(b"GGUF")                 # never read: the loaders are replaced
    assert main(["generate", "--model", str(folder), "--prompt", "w10 w11", "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert f"using the GGUF file {folder / 'tiny.Q4_1.gguf'}" in captured.err
    assert [(kind, kw.get("gguf_file")) for kind, _, kw in tiny_loads] == [("tokenizer", "tiny.Q4_1.gguf"),
                                                                           ("model", "tiny.Q4_1.gguf")]
    assert all(args[0] == str(folder) for _, args, _ in tiny_loads)
    # ... the .gguf file itself works as --model, and so does the API.
    tiny_loads.clear()
    assert main(["generate", "--model", str(folder / "tiny.Q4_1.gguf"), "--prompt", "w10", "--max-new-tokens",
                 "1"]) == 0
    assert [kw.get("gguf_file") for _, _, kw in tiny_loads] == ["tiny.Q4_1.gguf"] * 2
    tiny_loads.clear()
    mogu.load_for_inference(str(folder), device="cpu")
    assert [kw.get("gguf_file") for _, _, kw in tiny_loads] == ["tiny.Q4_1.gguf"] * 2
    # A Hugging Face folder (config.json) is loaded as such even with a .gguf beside it.
    (folder / "config.json").write_text("{}")
    assert resolve_model_path(str(folder)) == (str(folder), None)
    assert resolve_model_path(str(folder), "tiny.Q4_1.gguf") == (str(folder), "tiny.Q4_1.gguf")


def test_train_expert_loads_the_auto_detected_gguf(tmp_path, tiny_loads, files, capsys):
    folder = tmp_path / "smol"
    folder.mkdir()
    (folder / "only.gguf").write_bytes(b"GGUF")
    assert main(["train-expert", "--model", str(folder), "--expert", "glad", "--affirm", str(files.affirm),
                 "--reject", str(files.reject), "--out", str(tmp_path / "runs" / "glad"), "--max-steps", "1",
                 "--pairs-per-step", "2", "--batch-size", "2", "--no-progress", "--save-steps", "1"]) == 0
    assert {kw.get("gguf_file") for _, _, kw in tiny_loads} == {"only.gguf"}


# ------------------------------------------------------------------ --version and help
def test_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"mogu {metadata.version('mogu-kernels')} (torch ")


def test_help_is_consistent_and_shows_defaults(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(COMMANDS) <= set(sub.choices)
    for command in COMMANDS:
        p = sub.choices[command]
        text = p.format_help()
        assert "$SMOL" not in text and "--out mogu" not in text and "--debug" in text, command
        for action in p._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help and ("default" in action.help or action.required), (command, action.dest)
            if action.dest == "model":
                assert action.help == cli_common.MODEL_HELP, command            # one text everywhere
            if action.dest == "gguf_file":
                assert action.help == cli_common.GGUF_HELP, command
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: 256)" in out and "(default: exact)" in out and "(default: 0.0)" in out


def test_one_error_helper_shared_by_every_command_module():
    import importlib

    from mogu.cli import COMMAND_MODULES
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        assert not hasattr(module, "_fail"), name
        assert ": error:" not in open(module.__file__, encoding="utf-8").read(), name     # cli_common writes it
    for exc, line in ((FileNotFoundError("mogu: MoGU folder not found: x"), "MoGU folder not found: x"),
                      (ValueError("mogu.calibrate: bad"), "bad"), (ValueError("mogu export-vllm: bad"), "bad"),
                      (ValueError("mogul: kept"), "mogul: kept")):
        assert cli_common.error_message(exc) == line


def _not_offline(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_a_hub_name_is_looked_up_once_without_retries(tmp_path, monkeypatch, loads, capsys):
    """Online, a hub name costs one quick look-up: a missing model or no connection is one
    line at once (not transformers' download retries); a found one goes on to load."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from mogu import generation
    _not_offline(monkeypatch)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(generation, "_HUB_SEEN", set())
    missing = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
    Exception.__init__(missing, "404 Client Error")
    answers = {"nope-org/missing": missing, "nope-org/unreachable": ConnectionError("Name or service not known")}
    asked = []

    def model_info(self, name, **kwargs):
        asked.append(name)
        if name in answers:
            raise answers[name]
        return object()
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    assert main(["generate", "--model", "nope-org/missing", "--prompt", "hi"]) == 1
    line = one_error_line(capsys.readouterr().err, "generate")
    assert "model folder not found: nope-org/missing, and the Hugging Face hub has no model of that name" in line
    assert main(["generate", "--model", "nope-org/unreachable", "--prompt", "hi"]) == 1
    line = one_error_line(capsys.readouterr().err, "generate")
    assert "cannot be looked up (ConnectionError: Name or service not known)" in line and "HF_HUB_OFFLINE=1" in line
    assert not loads and asked == ["nope-org/missing", "nope-org/unreachable"]
    # A model the hub has is handed to transformers (here the replaced loader records it).
    assert main(["generate", "--model", "some-org/some-model", "--prompt", "hi"]) == 1
    assert [args[0] for _, args, _ in loads] == ["some-org/some-model"]


def test_readme_commands_parse_and_write_outside_the_package():
    """Every ``mogu ...`` line of the README parses, and none writes into the package folder."""
    import re
    import shlex
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        lines += [line for line in block.replace("\\\n", " ").splitlines() if line.startswith("mogu ")]
    assert len(lines) >= 8
    parser = build_parser()
    seen = set()
    for line in lines:
        args = parser.parse_args(shlex.split(line)[1:])
        seen.add(args.command)
        assert not os.path.normpath(getattr(args, "out", "x")).startswith("mogu"), line
    assert seen == set(COMMANDS), seen
