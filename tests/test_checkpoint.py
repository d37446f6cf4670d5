"""Published release, own format and peft export: round trips and every bad input."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import mogu
from tiny_models import VOCAB, random_release, rel_err, tiny_falcon, tiny_llama, write_published


def _ids(seed=0):
    return torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def released(tmp_path):
    base = tiny_llama()
    rel = random_release(base)
    paths = write_published(rel, str(tmp_path / "release"))
    model = mogu.load_official(copy.deepcopy(base), **paths)
    return base, model, paths


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("folded", [False, True])
def test_own_format_round_trip(released, tmp_path, folded):
    base, model, _ = released
    ids = _ids()
    expected = _logits(model, ids)
    out = tmp_path / "own"
    mogu.save_pretrained(model, out, folded=folded)
    meta = json.loads((out / "mogu_config.json").read_text())
    assert meta["folded"] is folded and meta["config"]["r"] == 4
    keys = load_file(str(out / "mogu_model.safetensors")).keys()
    assert any(k.endswith("router_weight") for k in keys) is folded
    loaded = mogu.from_pretrained(copy.deepcopy(base), out)
    assert rel_err(_logits(loaded, ids), expected) < 1e-5
    layer = loaded.model.layers[0].self_attn.o_proj
    assert layer.is_folded is folded
    if folded:
        assert not any("alpha_" in k for k in loaded.state_dict())   # heads really dropped


def test_folded_file_is_much_smaller(released, tmp_path):
    _, model, _ = released
    mogu.save_pretrained(model, tmp_path / "full")
    mogu.save_pretrained(model, tmp_path / "folded", folded=True)
    full = os.path.getsize(tmp_path / "full" / "mogu_model.safetensors")
    folded = os.path.getsize(tmp_path / "folded" / "mogu_model.safetensors")
    assert folded * 5 < full


def test_from_pretrained_into_already_patched_model(released, tmp_path):
    base, model, _ = released
    mogu.save_pretrained(model, tmp_path / "own")
    other = mogu.patch_model(copy.deepcopy(base))                      # r=8 default, file has r=4
    mogu.from_pretrained(other, tmp_path / "own")
    assert rel_err(_logits(other, _ids()), _logits(model, _ids())) < 1e-5


def test_fold_routers_keeps_outputs(released):
    _, model, _ = released
    ids = _ids(4)
    expected = _logits(model, ids)
    mogu.fold_routers(model)
    assert model.model.layers[0].self_attn.o_proj.is_folded
    assert rel_err(_logits(model, ids), expected) < 1e-5


@pytest.mark.parametrize("expert", ["glad", "unwill"])
def test_export_peft_loads_in_peft(released, tmp_path, expert):
    from peft import PeftModel

    base, model, _ = released
    mogu.export_peft(model, tmp_path / expert, expert=expert)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / expert)).eval()
    ids = _ids(5)
    with mogu.mode(model, expert):
        expected = _logits(model, ids)
    assert rel_err(_logits(peft_model, ids), expected) < 1e-5
    assert rel_err(expected, _logits(base, ids)) > 1e-3


def test_exported_pair_loads_as_release(released, tmp_path):
    base, model, paths = released
    for e in ("glad", "unwill"):
        mogu.export_peft(model, tmp_path / e, expert=e)
    again = mogu.load_official(copy.deepcopy(base), glad=tmp_path / "glad", unwill=tmp_path / "unwill",
                               router=paths["router"])
    assert rel_err(_logits(again, _ids()), _logits(model, _ids())) < 1e-5


# ------------------------------------------------------------ bad inputs
def _assert_untouched(model, before_logits):
    assert not mogu.is_patched(model)
    assert torch.equal(_logits(model, _ids()), before_logits)


def _corrupt_adapter(folder, fn):
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = dict(load_file(path))
    fn(tensors)
    save_file(tensors, path)


def test_missing_paths_raise_file_not_found(tmp_path):
    base = tiny_llama()
    paths = write_published(random_release(base), str(tmp_path))
    before = _logits(base, _ids())
    for key in ("glad", "unwill", "router"):
        bad = dict(paths, **{key: str(tmp_path / f"missing_{key}")})
        with pytest.raises(FileNotFoundError, match=f"missing_{key}"):
            mogu.load_official(base, **bad)
        _assert_untouched(base, before)
    os.remove(os.path.join(paths["glad"], "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="adapter_model"):
        mogu.load_official(base, **paths)
    _assert_untouched(base, before)


@pytest.mark.parametrize("case", ["wrong_shape", "unknown_key", "missing_key"])
def test_bad_adapter_names_the_key(tmp_path, case):
    base = tiny_llama()
    paths = write_published(random_release(base), str(tmp_path))
    key = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"

    def corrupt(t):
        if case == "wrong_shape":
            t[key] = torch.randn(39, 4)
        elif case == "unknown_key":
            t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.randn(4, 40)
        else:
            del t[key]
    _corrupt_adapter(paths["unwill"], corrupt)
    before = _logits(base, _ids())
    needle = "up_proj" if case == "unknown_key" else "layers.1.self_attn.o_proj.lora_B"
    with pytest.raises(ValueError, match=needle):
        mogu.load_official(base, **paths)
    _assert_untouched(base, before)


@pytest.mark.parametrize("case", ["wrong_shape", "unknown_key", "missing_key", "extra_layer"])
def test_bad_router_names_the_key(tmp_path, case):
    base = tiny_llama()
    paths = write_published(random_release(base), str(tmp_path))
    state = torch.load(paths["router"], weights_only=True)
    if case == "wrong_shape":
        state["model.routers.1.beta_.linear_1.bias"] = torch.randn(41)
        needle = "routers.1.beta_.linear_1.bias"
    elif case == "unknown_key":
        state["model.routers.0.gamma_.linear_0.weight"] = torch.randn(24, 40)
        needle = "gamma_"
    elif case == "missing_key":
        del state["model.routers.0.alpha_.linear_2.bias"]
        needle = "routers.0.alpha_.linear_2.bias"
    else:
        for k in [k for k in state if ".1." in k]:
            state[k.replace("routers.1.", "routers.2.")] = state[k].clone()
        needle = "routers.2.*layer count"
    torch.save(state, paths["router"])
    before = _logits(base, _ids())
    with pytest.raises(ValueError, match=needle):
        mogu.load_official(base, **paths)
    _assert_untouched(base, before)


def test_release_for_more_layers_than_model(tmp_path):
    bigger = tiny_llama(layers=3)
    paths = write_published(random_release(bigger), str(tmp_path))
    small = tiny_llama(layers=2)
    before = _logits(small, _ids())
    with pytest.raises(ValueError, match="layers.2.self_attn.o_proj"):
        mogu.load_official(small, **paths)
    _assert_untouched(small, before)


def test_falcon_release_into_llama_is_rejected(tmp_path):
    falcon = tiny_falcon()
    paths = write_published(random_release(falcon), str(tmp_path), model_type="falcon")
    llama = tiny_llama()
    before = _logits(llama, _ids())
    with pytest.raises(ValueError, match="self_attention.dense"):
        mogu.load_official(llama, **paths)
    _assert_untouched(llama, before)


def test_bad_own_format(released, tmp_path):
    base, model, _ = released
    out = tmp_path / "own"
    mogu.save_pretrained(model, out)
    path = str(out / "mogu_model.safetensors")
    tensors = dict(load_file(path))
    tensors["model.layers.0.self_attn.o_proj.lora_A"] = torch.randn(2, 4, 39)
    save_file(tensors, path)
    fresh = copy.deepcopy(base)
    before = _logits(fresh, _ids())
    with pytest.raises(ValueError, match="mogu_model.safetensors does not match its recorded sha256"):
        mogu.from_pretrained(fresh, out)
    _assert_untouched(fresh, before)
    meta = json.loads((out / "mogu_config.json").read_text())
    del meta["sha256"]                                   # as a folder written before checksums
    (out / "mogu_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model.layers.0.self_attn.o_proj.lora_A"):
        mogu.from_pretrained(fresh, out)
    _assert_untouched(fresh, before)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        mogu.from_pretrained(fresh, tmp_path / "nowhere")


def test_untrusted_pickle_is_refused(tmp_path):
    base = tiny_llama()
    paths = write_published(random_release(base), str(tmp_path))

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    torch.save({"model.routers.0.alpha_.linear_0.weight": Evil()}, paths["router"])
    with pytest.raises(ValueError, match="weights-only"):
        mogu.load_official(base, **paths)
    assert not mogu.is_patched(base)


def test_load_detects_the_format(released, tmp_path):
    base, model, paths = released
    root = str(tmp_path / "release")                 # resp_glad/100_lora, resp_unwill/100_lora, router_layer/
    from_release = mogu.load(copy.deepcopy(base), root)
    mogu.save_pretrained(model, tmp_path / "own", folded=True)
    from_own = mogu.load(copy.deepcopy(base), tmp_path / "own")
    expected = _logits(model, _ids())
    assert rel_err(_logits(from_release, _ids()), expected) < 1e-5
    assert rel_err(_logits(from_own, _ids()), expected) < 1e-5
    with pytest.raises(FileNotFoundError, match="router_layer"):
        mogu.load(copy.deepcopy(base), tmp_path)
