"""Faults that lose nothing (issue 15): kills, corrupted files, non-finite inputs.

* Training (both stages), build-data and eval run in a separate process (tests/fault_worker.py)
  that is killed with SIGKILL mid-run, then resumed here: the outputs are bitwise those of
  an uninterrupted run. A kill in the middle of a checkpoint save leaves the previous
  checkpoint loadable. A killed run's folder is refused by the loaders.
* The loaders are fuzzed (hypothesis, a bounded, derandomised number of cases) with byte
  flips, truncations, overwrites and appended garbage of every file of the published and
  own formats: each is an error naming the file, with the model untouched, or (for a byte
  that does not matter, e.g. JSON whitespace, or the editable dial) the clean load. Wrong
  dtypes, NaN/inf weights, absurd shapes and configs that disagree with the tensors are
  named errors too.
* The op and a patched model given NaN/inf or large fp16 inputs behave as documented in
  docs/design.md section 2.
"""
import copy
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import mogu
from mogu.checkpoint import CheckpointError, read_adapter_config
from mogu.training import train_expert, train_router
from tiny_models import VOCAB, random_release, tiny_llama, write_published
from tiny_tokenizer import tiny_tokenizer, words

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BENIGN = ["w10 w11 w12", "w13 w14", "w15 w16 w17 w18", "w19", "w20 w21 w22"]
MALICIOUS = ["w40 w41", "w42 w43 w44 w45 w46", "w47", "w48 w49 w50", "w51 w52"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def one_thread():
    """The worker runs with one torch thread; so do the in-process runs it is compared with."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_killed(spec, timeout=180):
    """Run tests/fault_worker.py with ``spec``; it must die of SIGKILL."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fault_worker.py"), json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def dump(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def pair_files(tmp_path, n=6):
    affirm = [{"instruction": words([10 + i, 20 + 2 * i, 30]), "output": words([60 + i % 3, 61, 62])}
              for i in range(n)]
    reject = [{"instruction": r["instruction"], "output": words([80, 81 + i % 2])} for i, r in enumerate(affirm)]
    return dump(tmp_path / "affirm.json", affirm), dump(tmp_path / "reject.json", reject)


def same_tensors(a_path, b_path):
    a, b = load_file(str(a_path)), load_file(str(b_path))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def log_losses(path):
    return [json.loads(line)["loss"] for line in open(path)]


def assert_no_debris(out):
    leftovers = [e for e in os.listdir(out) if e.startswith(".")]
    leftovers += [e for e in os.listdir(os.path.join(out, "checkpoints")) if not e[5:].isdigit()]
    assert leftovers == [] and not os.path.exists(os.path.join(out, "training_incomplete.json"))


# =========================================================== training killed
def test_stage1_killed_during_a_checkpoint_save_resumes_bitwise(tok, tmp_path, one_thread):
    a, r = pair_files(tmp_path)
    kw = dict(expert="glad", affirm=a, reject=r, lr=1e-2, pairs_per_step=2, epochs=2, save_steps=2, progress=False)
    full = train_expert(tiny_llama(), tok, out=str(tmp_path / "full"), **kw)
    assert full.global_step == 6
    part = tmp_path / "part"
    # SIGKILL while the step-4 checkpoint is being written (weights there, optimizer.bin not).
    run_killed({"job": "expert", "kwargs": {**kw, "out": str(part)}, "kill": {"at": "save", "n": 2}})
    assert sorted(os.listdir(part / "checkpoints")) == ["step-00000002", "step-00000004.tmp"]
    assert (part / "checkpoints" / "step-00000004.tmp" / "adapter_model.safetensors").exists()
    assert not (part / "adapter_model.safetensors").exists()
    with pytest.raises(CheckpointError, match="unfinished training run"):      # never taken for a finished one
        read_adapter_config(part)
    from mogu.training.loop import verify_checkpoint
    assert verify_checkpoint(str(part / "checkpoints" / "step-00000002"))["global_step"] == 2   # loadable
    resumed = train_expert(tiny_llama(), tok, out=str(part), resume=True, **kw)
    assert resumed.global_step == 6 and resumed.finished
    assert resumed.losses == full.losses[2:]
    assert same_tensors(part / "adapter_model.safetensors", tmp_path / "full" / "adapter_model.safetensors")
    assert log_losses(part / "training_log.jsonl") == full.losses
    assert_no_debris(str(part))
    assert read_adapter_config(part)["r"] == 8


def test_stage2_killed_mid_run_resumes_bitwise_and_checks_its_checkpoints(tok, tmp_path, one_thread):
    release = write_published(random_release(tiny_llama()), str(tmp_path / "release"))
    rows = [{"instruction": words([10 + i % 4] * (3 + i % 3)) if i % 2 else words([40 + i % 4] * (3 + i % 2)),
             "output": words([60, 61] if i % 2 else [70, 71, 72])} for i in range(8)]
    kw = dict(glad=release["glad"], unwill=release["unwill"], data=dump(tmp_path / "data.json", rows),
              labels=dump(tmp_path / "labels.json", [i % 2 for i in range(8)]), router_hidden=16, lr=1e-2,
              examples_per_step=4, batch_size=2, epochs=2, save_steps=1, progress=False)
    full = train_router(tiny_llama(), tok, out=str(tmp_path / "full"), **kw)
    assert full.global_step == 4
    part = tmp_path / "part"
    run_killed({"job": "router", "kwargs": {**kw, "out": str(part)}, "kill": {"at": "step", "n": 3}})
    ckpts = part / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["step-00000001", "step-00000002"]
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="unfinished training run"):
        mogu.load(model, part)
    assert not mogu.is_patched(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # As if killed while writing the step-3 checkpoint: a partial folder, no state.json.
    (ckpts / "step-00000003.tmp").mkdir()
    data = (ckpts / "step-00000002" / "mogu_model.safetensors").read_bytes()
    (ckpts / "step-00000003.tmp" / "mogu_model.safetensors").write_bytes(data[: len(data) // 2])
    # A corrupted checkpoint file is named on resume (and nothing is trained).
    opt = ckpts / "step-00000002" / "optimizer.bin"
    good = opt.read_bytes()
    opt.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    with pytest.raises(CheckpointError, match="optimizer.bin does not match the sha256"):
        train_router(tiny_llama(), tok, out=str(part), resume=True, **kw)
    state_path = ckpts / "step-00000002" / "state.json"                  # as a checkpoint written before
    state = state_path.read_text()                                         # checksums: still a named error
    state_path.write_text(json.dumps({k: v for k, v in json.loads(state).items() if k != "sha256"}))
    opt.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="cannot read the checkpoint .*step-00000002"):
        train_router(tiny_llama(), tok, out=str(part), resume=True, **kw)
    state_path.write_text(state)
    opt.write_bytes(good)
    resumed = train_router(tiny_llama(), tok, out=str(part), resume=True, **kw)
    assert resumed.global_step == 4 and resumed.losses == full.losses[2:]
    for name in ("mogu_model.safetensors", os.path.join("folded", "mogu_model.safetensors")):
        assert same_tensors(part / name, tmp_path / "full" / name), name
    assert log_losses(part / "training_log.jsonl") == full.losses
    assert_no_debris(str(part))
    mogu.load(tiny_llama(), part / "folded")


# ===================================================== build-data and eval killed
@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "instructions.json"
    path.write_text(json.dumps([{"instruction": t, "label": "benign"} for t in BENIGN]
                               + [{"instruction": t, "label": "malicious"} for t in MALICIOUS]))
    return str(path)


def same_files(a, b, names):
    for name in names:
        got, want = (a / name).read_text().splitlines(), (b / name).read_text().splitlines()
        diff = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), None)
        assert got == want, f"{name}: line {diff}: {got[diff] if diff is not None else len(got)!r} != " \
                            f"{want[diff] if diff is not None else len(want)!r}"


def test_build_data_killed_mid_run_resumes_to_the_same_files(tok, tmp_path, labelled, one_thread):
    from mogu.evaluation.data_building import CACHE_FILE, FILES, REPORT_FILE

    kw = dict(instructions=labelled, max_new_tokens=6, batch_size=2, progress=False)
    mogu.build_data(tiny_llama(), tok, out=str(tmp_path / "full"), **kw)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(tmp_path / "full" / REPORT_FILE, part / REPORT_FILE)          # an earlier run's marker
    run_killed({"job": "build", "kwargs": {**kw, "out": str(part)}, "kill": {"at": "generate", "n": 3}})
    assert not (part / REPORT_FILE).exists()                                    # not finished
    assert (part / CACHE_FILE).read_text().endswith('"half a li')
    mogu.build_data(tiny_llama(), tok, out=str(part), **kw)
    same_files(part, tmp_path / "full", list(FILES.values()) + [CACHE_FILE, REPORT_FILE])
    assert sorted(os.listdir(part)) == sorted(os.listdir(tmp_path / "full"))


def test_eval_killed_mid_run_resumes_to_the_same_files(tok, tmp_path, labelled, one_thread):
    from mogu.evaluation.evaluator import CONFIG_FILE, RESPONSES_FILE, SUMMARY_FILE

    release = tmp_path / "release"
    write_published(random_release(tiny_llama()), str(release))
    kw = dict(prompt_files=[labelled], max_new_tokens=6, batch_size=2, progress=False, print_summary=False,
              plots=False)
    mogu.evaluate(mogu.load(tiny_llama(), str(release)), tok, out=str(tmp_path / "full"), **kw)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(tmp_path / "full" / SUMMARY_FILE, part / SUMMARY_FILE)         # an earlier run's marker
    run_killed({"job": "eval", "release": str(release), "kwargs": {**kw, "out": str(part)},
                "kill": {"at": "generate", "n": 4}})
    assert not (part / SUMMARY_FILE).exists()
    assert (part / RESPONSES_FILE).read_text().endswith('"half a li')
    mogu.evaluate(mogu.load(tiny_llama(), str(release)), tok, out=str(part), **kw)
    same_files(part, tmp_path / "full", [RESPONSES_FILE, SUMMARY_FILE, CONFIG_FILE])
    assert sorted(os.listdir(part)) == sorted(os.listdir(tmp_path / "full"))


# ============================================================ loaders fuzzed
@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """Clean copies of every format for one tiny model: the published release (no
    checksums), project-written peft adapters (export_peft: checksummed) and the own format
    full and folded (checksummed), each with the model it loads to."""
    root = tmp_path_factory.mktemp("formats")
    base = tiny_llama()
    release = write_published(random_release(base, r=4), str(root / "release"))
    loaded = mogu.load_official(copy.deepcopy(base), **release)
    for e in ("glad", "unwill"):
        mogu.export_peft(loaded, root / "exported" / e, expert=e)
    mogu.save_pretrained(loaded, root / "own")
    mogu.save_pretrained(loaded, root / "folded", folded=True)
    other = mogu.load_official(copy.deepcopy(base), **write_published(random_release(base, seed=7),
                                                                       str(root / "other")))
    return dict(root=root, base=base, release=release, loaded=loaded, other=other)


def _load_fn(kind, root):
    if kind in ("release", "router"):
        return lambda m: mogu.load(m, str(root / "release"))
    if kind == "exported":
        return lambda m: mogu.load_official(m, glad=str(root / "exported" / "glad"),
                                            unwill=str(root / "exported" / "unwill"),
                                            router=str(root / "release" / "router_layer" / "100_router.pth"))
    return lambda m: mogu.load(m, str(root / kind))


FILES = {   # kind -> files a corruption may hit (relative to the kind's copy)
    "release": ["resp_glad/100_lora/adapter_model.safetensors", "resp_unwill/100_lora/adapter_config.json"],
    "router": ["router_layer/100_router.pth"],                       # the release's torch.save file
    "exported": ["glad/adapter_model.safetensors", "glad/adapter_config.json", "unwill/mogu_checksums.json",
                 "unwill/adapter_model.safetensors"],
    "own": ["mogu_model.safetensors", "mogu_config.json"],
    "folded": ["mogu_model.safetensors", "mogu_config.json"],
}
CHECKSUMMED = {"exported", "own", "folded"}


def snapshot(model):
    return (mogu.is_patched(model), {k: v.clone() for k, v in model.state_dict().items()},
            copy.deepcopy(getattr(model, "mogu_config", None)))


def same_snapshot(a, b, ignore_config=()):
    if a[0] != b[0] or a[1].keys() != b[1].keys() or not all(torch.equal(a[1][k], b[1][k]) for k in a[1]):
        return False
    ca, cb = (None if c is None else {k: v for k, v in c.to_dict().items() if k not in ignore_config}
              for c in (a[2], b[2]))
    return ca == cb


def corrupt(data: bytes, how: str, pos: float, value: int, length: int) -> bytes:
    i = min(int(pos * len(data)), len(data) - 1)
    if how == "flip":
        return data[:i] + bytes([data[i] ^ (value or 1)]) + data[i + 1:]
    if how == "truncate":
        return data[:i]
    if how == "overwrite":
        return data[:i] + bytes((value + k * 37) % 256 for k in range(length)) + data[i + length:]
    return data + bytes((value + k * 11) % 256 for k in range(length))          # append


COUNTS = {"cases": 0, "named_error": 0, "clean_load": 0, "unchecked_change": 0, "checksummed": 0}
LOADED = []          # what each corruption that loaded changed (printed by the next test with -s)
_REFERENCE = {}


def reference_load(formats, kind, into):
    """The snapshot of the clean files of ``kind`` loaded into a copy of the ``into`` model."""
    if (kind, into) not in _REFERENCE:
        model = copy.deepcopy(formats["base"] if into == "fresh" else formats["other"])
        _REFERENCE[kind, into] = snapshot(_load_fn(kind, formats["root"])(model))
    return _REFERENCE[kind, into]


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(FILES)), which=st.integers(0, 3),
       how=st.sampled_from(["flip", "flip", "truncate", "overwrite", "append"]),
       pos=st.floats(0, 1, allow_nan=False), value=st.integers(0, 255), length=st.integers(1, 8),
       into=st.sampled_from(["fresh", "patched"]))
def test_fuzzed_files_are_named_errors_and_leave_the_model_untouched(formats, tmp_path_factory, kind, which, how,
                                                                     pos, value, length, into):
    work = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(formats["root"] / "release", work / "release")
    folder = "release" if kind == "router" else kind
    if folder != "release":
        shutil.copytree(formats["root"] / kind, work / kind)
    target = work / folder / FILES[kind][which % len(FILES[kind])]
    target.write_bytes(corrupt(target.read_bytes(), how, pos, value, length))
    model = copy.deepcopy(formats["base"] if into == "fresh" else formats["other"])
    before = snapshot(model)
    COUNTS["cases"] += 1
    COUNTS["checksummed"] += kind in CHECKSUMMED
    try:
        _load_fn(kind, work)(model)
    except (ValueError, FileNotFoundError) as exc:          # CheckpointError is a ValueError
        folder = str(target.parent)
        assert any(os.path.join(folder, f) in str(exc) for f in os.listdir(folder)), str(exc)
        assert same_snapshot(snapshot(model), before), "the model changed on an error"
        COUNTS["named_error"] += 1
        return
    # Loaded: for the checksummed (project-written) files only a byte that changes nothing
    # may do that (JSON whitespace, the editable dial): exactly the clean load. The published
    # release has no checksum: a flipped weight byte can load as another finite value.
    if same_snapshot(snapshot(model), reference_load(formats, kind, into), ignore_config=("router_offset",
                                                                                          "mogu_tokens")):
        COUNTS["clean_load"] += 1
    else:
        assert kind not in CHECKSUMMED, f"{target} ({how}) loaded as something else"
        COUNTS["unchecked_change"] += 1
    i = min(int(pos * len(target.read_bytes())), len(target.read_bytes()) - 1)
    LOADED.append(f"{kind} {target.name} {how} at {i}: {target.read_bytes()[max(0, i - 12):i + 12]!r}")


def test_fuzz_counts_reach_the_readme(formats):
    """Run after the fuzz test (file order): every corrupted case was seen."""
    if COUNTS["cases"]:
        assert COUNTS["cases"] == COUNTS["named_error"] + COUNTS["clean_load"] + COUNTS["unchecked_change"]
        loaded_checksummed = sum(1 for line in LOADED if line.split()[0] in CHECKSUMMED)
        print(f"\nfuzz: {COUNTS}, loaded although checksummed: {loaded_checksummed}\n" + "\n".join(LOADED))


def _own_copy(formats, tmp_path, folded=False):
    out = tmp_path / "own"
    shutil.copytree(formats["root"] / ("folded" if folded else "own"), out)
    return out


def _rewrite_weights(folder, fn, keep_checksum=False):
    """Change the weights file; drop its recorded sha256 (as an older folder) unless
    ``keep_checksum``, which leaves the now stale one."""
    path = folder / "mogu_model.safetensors"
    tensors = dict(load_file(str(path)))
    fn(tensors)
    save_file(tensors, str(path))
    if not keep_checksum:
        meta = json.loads((folder / "mogu_config.json").read_text())
        meta["sha256"].pop("mogu_model.safetensors")
        (folder / "mogu_config.json").write_text(json.dumps(meta))


KEY = "model.layers.1.self_attn.o_proj"


@pytest.mark.parametrize("case, needle", [
    ("nan", "NaN/inf"), ("inf", "NaN/inf"), ("int_dtype", "dtype torch.int32"), ("bool_dtype", "dtype torch.bool"),
    ("absurd_shape", "has shape"), ("scalar", "has shape"), ("r16_config", "has shape"),
    ("hidden_config", "has shape"), ("modules_config", "layer count"), ("flipped_checksummed", "sha256"),
    ("edited_lora_alpha", "settings do not match"),
])
def test_bad_values_shapes_and_configs_are_named(formats, tmp_path, case, needle):
    out = _own_copy(formats, tmp_path)
    keep = case == "flipped_checksummed"
    if case in ("nan", "inf"):
        _rewrite_weights(out, lambda t: t[f"{KEY}.lora_B"].view(-1).__setitem__(3, float(case)), keep)
    elif case == "int_dtype":
        _rewrite_weights(out, lambda t: t.__setitem__(f"{KEY}.lora_A", t[f"{KEY}.lora_A"].to(torch.int32)), keep)
    elif case == "bool_dtype":
        _rewrite_weights(out, lambda t: t.__setitem__(f"{KEY}.lora_A", t[f"{KEY}.lora_A"] > 0), keep)
    elif case == "absurd_shape":
        _rewrite_weights(out, lambda t: t.__setitem__(f"{KEY}.lora_A", torch.zeros(2, 4, 40 * 1000)), keep)
    elif case == "scalar":
        _rewrite_weights(out, lambda t: t.__setitem__(f"{KEY}.alpha_.linear_2.bias", torch.tensor(0.5)), keep)
    elif case == "flipped_checksummed":
        _rewrite_weights(out, lambda t: t[f"{KEY}.lora_B"].view(-1).__setitem__(3, 0.125), keep)
    else:
        meta = json.loads((out / "mogu_config.json").read_text())
        meta["sha256"].pop("mogu_config.json")                       # an older folder: nothing recorded
        if case == "r16_config":
            meta["config"]["r"] = 16                                  # over r=4 tensors
        elif case == "hidden_config":
            meta["config"]["router_hidden"] = 48
        elif case == "modules_config":
            meta["modules"] = meta["modules"][:1]
        else:
            meta["config"]["lora_alpha"] = 9.0
            meta["sha256"]["mogu_config.json"] = "0" * 64
        (out / "mogu_config.json").write_text(json.dumps(meta))
    for into in (formats["base"], formats["other"]):
        model = copy.deepcopy(into)
        before = snapshot(model)
        with pytest.raises(ValueError, match=needle) as info:
            mogu.load(model, out)
        assert str(out) in str(info.value)
        assert same_snapshot(snapshot(model), before)


@pytest.mark.parametrize("case", ["nan_router", "int_adapter", "bad_r", "bad_alpha", "json_list", "not_utf8"])
def test_bad_release_values_are_named(formats, tmp_path, case):
    root = tmp_path / "release"
    shutil.copytree(formats["root"] / "release", root)
    router = root / "router_layer" / "100_router.pth"
    adapter = root / "resp_glad" / "100_lora"
    if case == "nan_router":
        state = torch.load(router, weights_only=True)
        state["model.routers.0.beta_.linear_1.bias"][0] = float("inf")
        torch.save(state, router)
        named = router
    elif case == "int_adapter":
        t = dict(load_file(str(adapter / "adapter_model.safetensors")))
        key = next(iter(t))
        t[key] = t[key].to(torch.int64)
        save_file(t, str(adapter / "adapter_model.safetensors"))
        named = adapter / "adapter_model.safetensors"
    else:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        text = {"bad_r": json.dumps({**cfg, "r": "4"}), "bad_alpha": json.dumps({**cfg, "lora_alpha": -1}),
                "json_list": "[1, 2]"}.get(case)
        (adapter / "adapter_config.json").write_bytes(text.encode() if text else b"\xff\xfe{}")
        named = adapter / "adapter_config.json"
    model = copy.deepcopy(formats["base"])
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=str(named)):
        mogu.load(model, root)
    assert same_snapshot(snapshot(model), before)


def test_every_missing_path_is_reported(formats, tmp_path):
    model = copy.deepcopy(formats["base"])
    with pytest.raises(FileNotFoundError) as info:
        mogu.load_official(model, glad=tmp_path / "no_glad", unwill=tmp_path / "no_unwill",
                           router=tmp_path / "no_router.pth")
    for name in ("no_glad", "no_unwill", "no_router.pth"):
        assert str(tmp_path / name) in str(info.value)
    empty = tmp_path / "empty_adapter"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        mogu.load_official(model, glad=empty, unwill=formats["release"]["unwill"], router=tmp_path / "no.pth")
    assert all(s in str(info.value) for s in ("adapter_config.json", "adapter_model.safetensors", "no.pth"))
    assert not mogu.is_patched(model)


def test_written_files_carry_checksums_and_older_folders_still_load(formats, tmp_path):
    meta = json.loads((formats["root"] / "own" / "mogu_config.json").read_text())
    assert set(meta["sha256"]) == {"mogu_model.safetensors", "mogu_config.json"}
    sums = json.loads((formats["root"] / "exported" / "glad" / "mogu_checksums.json").read_text())["sha256"]
    assert set(sums) == {"adapter_model.safetensors", "adapter_config.json"}
    out = _own_copy(formats, tmp_path)
    meta.pop("sha256")
    (out / "mogu_config.json").write_text(json.dumps(meta))                  # as written before checksums
    model = mogu.load(copy.deepcopy(formats["base"]), out)
    assert same_snapshot(snapshot(model), snapshot(formats["loaded"]))
    # The dial stays editable (mogu.calibrate writes it): the settings digest leaves it out.
    from mogu.evaluation.calibration import write_mogu_offset
    out2 = _own_copy(formats, tmp_path / "dial")
    write_mogu_offset(out2, 1.5)
    assert mogu.load(copy.deepcopy(formats["base"]), out2).mogu_config.router_offset == 1.5


# ========================================================= non-finite inputs
def _op_args(dtype=torch.float32, K=40, N=24, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(weight=(torch.randn(N, K, generator=g) * 0.1).to(dtype), bias=(torch.randn(N, generator=g) * 0.1)
                .to(dtype), lora_A=(torch.randn(2, r, K, generator=g) * 0.1).to(dtype),
                lora_B=(torch.randn(2, N, r, generator=g) * 0.1).to(dtype),
                router_weight=torch.randn(2, K, generator=g), router_bias=torch.randn(2, generator=g), scaling=2.0)


CPU_BACKENDS = [b for b in ("reference", "cpp") if b in __import__("mogu_kernels").available_backends("cpu")]
BACKENDS = [pytest.param("cpu", b, id=b) for b in CPU_BACKENDS] + [
    pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.gpu) for b in ("triton", "cuda", "reference")]


def _on(device, backend, args):
    from mogu_kernels import available_backends

    if backend not in available_backends(device):
        pytest.skip(f"backend {backend} is not available on {device}")
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_op_non_finite_input_stays_in_its_row(device, backend, bad):
    """Documented: no check, no error; a NaN/inf in a row of x gives non-finite y in that row
    only (NaN propagates), every other row is exactly the clean result."""
    from mogu_kernels import mogu_linear

    args = _on(device, backend, _op_args())
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(1)).to(device)
    y0, g0 = mogu_linear(x, backend=backend, **args)
    xb = x.clone()
    xb[1, 2, 7] = bad
    y, g = mogu_linear(xb, backend=backend, **args)
    row = torch.zeros(3, 5, dtype=torch.bool, device=device)
    row[1, 2] = True
    assert not torch.isfinite(y[row]).all()
    assert torch.equal(y[~row], y0[~row]) and torch.equal(g[~row], g0[~row])
    assert torch.isnan(g[row]).any() or ((g[row] == 0) | (g[row] == 1)).all()    # sigmoid(+-inf) = 1 / 0


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_op_fp16_large_inputs_keep_the_gates_exact(device, backend):
    """Documented: the gate math runs in fp32, so fp16 inputs whose router logits overflow
    fp16 (|logit| > 65504) still give gates in [0, 1] equal to the fp64 sigmoid; y is fp16
    and may overflow to inf like the base layer, never NaN from the gates."""
    from mogu_kernels import mogu_linear

    args = _op_args(torch.float16)
    args["router_weight"] = args["router_weight"] * 100
    args = _on(device, backend, args)
    x = (torch.randn(4, 40, generator=torch.Generator().manual_seed(2)) * 1e4).half().to(device)
    logits = x.double() @ args["router_weight"].double().T + args["router_bias"].double()
    assert logits.abs().max() > 65504                                     # would overflow in fp16
    y, g = mogu_linear(x, backend=backend, **args)
    assert g.dtype == torch.float16 and torch.isfinite(g).all() and ((g >= 0) & (g <= 1)).all()
    torch.testing.assert_close(g.double(), torch.sigmoid(logits), atol=1e-3, rtol=0)
    assert not torch.isnan(y).any()
    # Router logits whose partial sums pass the fp16 maximum but cancel to 0: exact gates.
    xc = torch.full((2, 40), 2e4, device=device).half()
    rw, rb = torch.tensor([4.0, -4.0] * 20, device=device).repeat(2, 1), torch.tensor([-0.5, 0.7], device=device)
    _, gc = mogu_linear(xc, backend=backend, **{**args, "router_weight": rw, "router_bias": rb})
    torch.testing.assert_close(gc.double(), torch.sigmoid(rb.double()).expand(2, 2), atol=1e-3, rtol=0)
    small = (torch.randn(4, 40, generator=torch.Generator().manual_seed(3)) * 10).half().to(device)
    ys, gs = mogu_linear(small, backend=backend, **args)
    assert torch.isfinite(ys).all() and torch.isfinite(gs).all()


def test_patched_model_nan_and_fp16_inputs(formats):
    model = copy.deepcopy(formats["loaded"])
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    emb = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        clean = model(inputs_embeds=emb).logits
    bad = emb.clone()
    bad[0, 3, 5] = float("nan")
    with torch.no_grad():
        out = model(inputs_embeds=bad).logits
    assert torch.equal(out[1], clean[1])                                  # the other sequence: untouched
    assert torch.isnan(out[0, 3:]).all()                                  # NaN propagates, no error
    half = copy.deepcopy(formats["loaded"]).half()
    with torch.no_grad(), mogu.capture_gates(half) as gates:
        half(inputs_embeds=(emb * 2000).half())
    assert gates and all(torch.isfinite(g).all() and ((g >= 0) & (g <= 1)).all() for g in gates.values())
