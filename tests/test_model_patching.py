"""mogu.patch_model on tiny random Llama and Falcon models, against the published math."""
import copy

import pytest
import torch

import mogu
from tiny_models import (VOCAB, published_reference_hooks, random_release, rel_err, target_names, tiny_falcon,
                         tiny_llama, write_published)

BUILDERS = {"llama": tiny_llama, "falcon": tiny_falcon}


def _ids(seed=0, batch=2, length=9):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "falcon"])
def test_published_release_matches_published_layer_math(family, tmp_path):
    base = BUILDERS[family]()
    rel = random_release(base)
    paths = write_published(rel, str(tmp_path), model_type=family)
    ids = _ids()
    with torch.no_grad():
        base_logits = base(ids).logits
        reference = copy.deepcopy(base)
        ref_gates = {}
        handles = published_reference_hooks(reference, rel, ref_gates)
        ref_logits = reference(ids).logits
        for h in handles:
            h.remove()

        model = mogu.load_official(copy.deepcopy(base), glad=paths["glad"], unwill=paths["unwill"],
                                   router=paths["router"])
        with mogu.capture_gates(model) as gates:
            logits = model(ids).logits
    assert rel_err(logits, ref_logits) < 1e-4
    assert rel_err(logits, base_logits) > 1e-2            # the release visibly changes the model
    assert list(gates) == target_names(base)
    for name, g in gates.items():
        assert g.shape == (*ids.shape, 2)
        assert rel_err(g, ref_gates[name]) < 1e-5           # [unwill=alpha, glad=beta]
    with torch.no_grad(), mogu.mode(model, "base"):
        assert torch.equal(model(ids).logits, base_logits)  # bitwise the unpatched model


def test_adapter_bin_files_load_too(tmp_path):
    base = tiny_llama()
    rel = random_release(base)
    paths = write_published(rel, str(tmp_path), binary=True)
    model = mogu.load_official(copy.deepcopy(base), **paths)
    ref = copy.deepcopy(base)
    published_reference_hooks(ref, rel)
    ids = _ids(1)
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref(ids).logits) < 1e-4


def test_patch_defaults_and_structure():
    model = tiny_llama()
    weight = model.model.layers[0].self_attn.o_proj.weight
    mogu.patch_model(model)
    layer = model.model.layers[0].self_attn.o_proj
    assert isinstance(layer, mogu.MoGULinear)
    assert layer.weight is weight                                      # wrapped, not copied
    assert (layer.r, layer.lora_alpha, layer.scaling) == (8, 16.0, 2.0)
    assert layer.alpha_.linear_0.weight.shape == (512, 40)
    assert layer.alpha_.linear_1.weight.shape == (40, 512) and layer.alpha_.linear_2.weight.shape == (1, 40)
    assert len(mogu.patched_modules(model)) == 2
    keys = model.state_dict().keys()
    assert "model.layers.0.self_attn.o_proj.weight" in keys           # base keys unchanged
    assert "model.layers.0.self_attn.o_proj.alpha_.linear_1.bias" in keys
    assert mogu.get_mode(model) == "mogu"


def test_patch_twice_is_noop_or_error_never_double_wrap():
    model = tiny_llama()
    mogu.patch_model(model)
    mogu.patch_model(model)
    mogu.patch_model(model, mogu.MoGUConfig())
    assert not isinstance(model.model.layers[0].self_attn.o_proj.original_module, mogu.MoGULinear)
    with pytest.raises(ValueError, match="already patched"):
        mogu.patch_model(model, mogu.MoGUConfig(r=4))


def test_unpatch_restores_original():
    model = tiny_llama()
    original = model.model.layers[1].self_attn.o_proj
    ids = _ids(2)
    with torch.no_grad():
        before = model(ids).logits
    mogu.patch_model(model)
    mogu.unpatch(model)
    assert model.model.layers[1].self_attn.o_proj is original
    assert not mogu.is_patched(model) and not hasattr(model, "mogu_config")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_no_matching_module_lists_targets():
    model = tiny_llama()
    with pytest.raises(ValueError, match="nonexistent_proj"):
        mogu.patch_model(model, mogu.MoGUConfig(target_modules=["nonexistent_proj"]))
    assert not mogu.is_patched(model)


def test_unknown_family_needs_target_modules():
    model = tiny_llama()
    model.config.model_type = "some_new_family"
    with pytest.raises(ValueError, match="model_type='some_new_family'"):
        mogu.patch_model(model)
    mogu.patch_model(model, mogu.MoGUConfig(target_modules=["o_proj"]))
    assert len(mogu.patched_modules(model)) == 2


def test_target_modules_override():
    model = tiny_llama()
    mogu.patch_model(model, mogu.MoGUConfig(target_modules=["self_attn.v_proj"], r=4))
    assert list(mogu.patched_modules(model)) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]


def _fill_random(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mogu.patched_modules(model).values():
            for p in layer.parameters():
                if p is not layer.weight and p is not layer.bias:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("expert", ["glad", "unwill"])
def test_single_expert_modes(expert):
    model = tiny_llama()
    mogu.patch_model(model)
    _fill_random(model)
    e = mogu.EXPERTS.index(expert)
    x = torch.randn(3, 5, 40)
    layer = model.model.layers[0].self_attn.o_proj
    with torch.no_grad(), mogu.mode(model, expert):
        y = layer(x)
    expected = x.double() @ layer.weight.double().T + layer.scaling * (
        x.double() @ layer.lora_A[e].double().T @ layer.lora_B[e].double().T)
    assert rel_err(y, expected) < 1e-5
    assert mogu.get_mode(model) == "mogu"                   # restored after the block


def test_mode_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="not MoGU-patched"):
        mogu.set_mode(model, "base")
    mogu.patch_model(model)
    with pytest.raises(ValueError, match="unknown mode"):
        mogu.set_mode(model, "safe")


def test_router_fold_cache_refreshes_and_training_grads_reach_heads():
    model = tiny_llama()
    mogu.patch_model(model, mogu.MoGUConfig(lora_dropout=0.0))
    _fill_random(model)
    layer = model.model.layers[0].self_attn.o_proj
    x = torch.randn(2, 4, 40)
    with torch.no_grad():
        y1 = layer(x)
        layer.alpha_.linear_2.bias.add_(1.0)               # in-place update must invalidate the cache
        y2 = layer(x)
    assert rel_err(y1, y2) > 1e-3
    with torch.no_grad():
        w, b = layer.router_vectors()
        h = layer.alpha_(x.double().float())
    assert rel_err(x @ w[0] + b[0], h.squeeze(-1)) < 1e-5   # the fold is the head, exactly
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    for head in (layer.alpha_, layer.beta_):
        for p in head.parameters():
            p.requires_grad_(True)
    layer(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.alpha_.parameters())


def test_dropout_training_path_matches_fused_when_dropout_inactive():
    model = tiny_llama()
    mogu.patch_model(model)
    _fill_random(model)
    layer = model.model.layers[0].self_attn.o_proj
    x = torch.randn(2, 4, 40)
    with torch.no_grad():
        fused = layer(x)
        layer.train()
        layer.lora_dropout.p = 0.0                           # same path, no randomness
        unfused = layer(x)
    assert rel_err(unfused, fused) < 1e-5


@pytest.mark.parametrize("family", ["llama", "falcon"])
def test_dropout_training_path_matches_float64_with_dropped_expert_inputs(family):
    """Active LoRA dropout: the experts see dropout(x), the base layer and the routers see x,
    base rows stay the plain base layer; checked in float64 with the same dropout mask."""
    from op_spec import random_base_rows, spec_mogu_linear

    model = BUILDERS[family]()
    mogu.patch_model(model, mogu.MoGUConfig(lora_dropout=0.3))
    _fill_random(model)
    layer = next(iter(mogu.patched_modules(model).values()))
    layer.train()
    x = torch.randn(2, 4, layer.in_features, generator=torch.Generator().manual_seed(5))
    layer.base_rows = random_base_rows(x, seed=2)
    torch.manual_seed(11)
    with torch.no_grad():
        y = layer(x)
    torch.manual_seed(11)
    dropped = layer.lora_dropout(x)                         # the mask the layer drew
    assert (dropped == 0).any() and not torch.equal(dropped, x)
    w, b = layer.router_vectors()
    # The spec with the experts zeroed gives the gates of x and sum(g(x)) * base(x); the
    # experts' part is added at dropout(x) with those gates.
    y_base, gates = spec_mogu_linear(x, layer.weight, layer.bias, torch.zeros_like(layer.lora_A), layer.lora_B,
                                     w, b, layer.scaling)
    want = y_base
    for e in range(2):
        expert = dropped.double() @ layer.lora_A[e].double().T @ layer.lora_B[e].double().T
        want = want + layer.scaling * gates[..., e, None] * expert
    base64 = x.double() @ layer.weight.double().T + (layer.bias.double() if layer.bias is not None else 0)
    want = torch.where(layer.base_rows.unsqueeze(-1), base64, want)
    assert rel_err(y, want) < 1e-5
    assert rel_err(y[~layer.base_rows], y_base[~layer.base_rows]) > 1e-3     # the experts contribute


def test_foreign_linear_subclasses_are_refused_by_name():
    """A linear subclass whose forward reads other state would be computed wrongly by the
    bitwise base path: patching refuses it, naming the class, until it is registered."""
    import torch.nn as nn
    from mogu.layer import MoGULinear, register_wrappable, wrappable_classes

    class ScaledLinear(nn.Linear):                  # forward reads more than weight and bias
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.scale = 2.0

        def forward(self, x):
            return super().forward(x) * self.scale

    with pytest.raises(ValueError, match="ScaledLinear"):
        MoGULinear(ScaledLinear(8, 6), mogu.MoGUConfig(router_hidden=4))
    model = tiny_llama()
    model.model.layers[0].self_attn.o_proj = ScaledLinear(40, 40)
    with pytest.raises(ValueError, match="register_wrappable"):
        mogu.patch_model(model)
    assert not mogu.is_patched(model)

    class PlainLinear(nn.Linear):
        pass
    try:
        register_wrappable(PlainLinear)
        MoGULinear(PlainLinear(8, 6), mogu.MoGUConfig(router_hidden=4))
    finally:
        from mogu import layer
        layer._WRAPPABLE.discard(PlainLinear)
    assert PlainLinear not in wrappable_classes()
