"""Model families as data: every built-in family's roles name real modules, and the structured
techniques give standard, reloadable, correctly sized models on tiny random models of each.

Each model is built from its transformers config class (GQA with 4 query heads over 2 key/value
groups where the family has them), saved with ``save_model``, reloaded with plain
``AutoModelForCausalLM.from_pretrained`` and compared: logits, greedy ``generate``, estimated size.
"""
from __future__ import annotations

import pytest
import torch

import squeezelang
from squeezelang.errors import PluginError, SqueezeError
from squeezelang.hooks.family import Layout, ModelFamily, TaskLayout
from squeezelang.hooks.manager import build_registries, plugin_manager
from squeezelang.models import surgery
from squeezelang.models.handle import ModelHandle
from squeezelang.models.meta import meta_from_model
from squeezelang.models.save import save_model
from squeezelang.models.size import artifact_bytes

from conftest import FAMILY_CONFIGS, build_family_handle, calib_context

FAMILIES = list(FAMILY_CONFIGS)
IDS = torch.tensor([[5, 40, 41, 42, 70, 71, 12]])



def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _generate(model):
    with torch.no_grad():
        return model.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0)


def _check_saved(handle: ModelHandle, estimate, tmp_path) -> None:
    """Saved directory: plain transformers loads it; same logits and greedy tokens; size estimate."""
    import transformers

    save_model(handle, tmp_path)
    assert not (tmp_path / "squeeze.json").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    assert torch.allclose(_logits(back), _logits(handle.model), atol=1e-4)
    assert torch.equal(_generate(back), _generate(handle.model))
    real = artifact_bytes(tmp_path)
    assert abs(estimate.size_bytes() - real) / real < 0.01
    assert estimate.params() == sum(p.numel() for p in back.parameters())


def test_every_role_names_a_module(registries):
    for name in FAMILIES:
        model = build_family_handle(name).model
        fam = registries.families.for_config(model.config)
        assert fam is not None and fam.name == name
        base = model.base_model
        for emb in fam.embeddings:
            assert surgery.get_path(base, emb) is not None
        if fam.final_norm:
            assert surgery.get_path(base, fam.final_norm) is not None
        for block in surgery.layer_modules(model):
            roles = [fam.q, fam.k, fam.v, fam.qkv, fam.o, fam.mlp_out, fam.mlp_fused, *fam.mlp_in,
                     *fam.norms, *fam.head_norms]
            for role in filter(None, roles):
                assert surgery.get_path(block, role) is not None, (name, role)


# ---------------------------------------------------------------------------- techniques
STAGES = [
    ("prune", {"method": "activation", "target": "heads", "ratio": 0.5}),
    ("prune", {"method": "activation", "target": "mlp", "ratio": 0.5}),
    ("prune", {"method": "activation", "target": "embedding", "ratio": 0.25}),
    ("prune", {"method": "depth", "ratio": 0.34}),
    ("shrink", {"layers": 2, "heads": 2, "intermediate": 48, "hidden": 48}),
]


@pytest.mark.parametrize("technique,params", STAGES, ids=lambda v: v if isinstance(v, str) else
                         "-".join(str(x) for x in v.values() if not isinstance(x, float)))
@pytest.mark.parametrize("name", FAMILIES)
def test_structured_techniques(name, technique, params, registries, tmp_path):
    handle = build_family_handle(name)
    before = surgery.sizes(handle.config)
    tech = registries.techniques.get(technique)
    params = {**params, "data": "calib", "samples": 8}
    params = tech.resolve_defaults(params) if hasattr(tech, "resolve_defaults") else {
        **tech.defaults(), **params}
    assert tech.check(params) == []
    meta = meta_from_model(handle.model, handle.task)
    estimate = tech.estimate(meta, params)
    tech.apply_(handle, params, calib_context())
    after = surgery.sizes(handle.config)
    assert after["head_dim"] == before["head_dim"]            # rotary pairs and q/k norms intact
    if params.get("target") == "heads":
        assert (after["heads"], after["kv_heads"], after["hidden"]) == (2, 2, 64)
    if params.get("target") == "embedding":
        assert after["hidden"] == 48 and after["heads"] == 4
    logits = _logits(handle.model)
    assert logits.shape == (1, IDS.shape[1], handle.config.vocab_size)
    _check_saved(handle, estimate, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_removing_silent_units_is_exact(name):
    """Neurons whose output weights are zero, and a key/value group whose output columns are zero,
    are removed without changing the function; so are layers dropped at the same time as nothing."""
    handle = build_family_handle(name)
    model, fam = handle.model, surgery.family_of(handle.config)
    cur = surgery.sizes(model.config)
    d = cur["head_dim"]
    with torch.no_grad():
        for block in surgery.layer_modules(model):
            surgery.get_path(block, fam.mlp_out).weight[:, :32].zero_()        # neurons 0..31
            surgery.get_path(block, fam.o).weight[:, 2 * d:].zero_()           # group 1: heads 2, 3
    before = _logits(model)
    n = cur["layers"]
    surgery.reshape_(model, mlp={i: range(32, cur["inner"]) for i in range(n)},
                     heads={i: [0, 1] for i in range(n)})
    new = surgery.sizes(model.config)
    assert (new["inner"], new["heads"], new["kv_heads"]) == (cur["inner"] - 32, 2, 1)
    assert torch.allclose(_logits(model), before, atol=1e-5)


def test_per_layer_lists_and_layer_index_follow_dropped_layers():
    handle = build_family_handle("gemma2")
    types = list(handle.config.layer_types)
    surgery.drop_layers_(handle.model, [0, 2])
    assert handle.config.layer_types == [types[0], types[2]]
    assert [b.self_attn.layer_idx for b in surgery.layer_modules(handle.model)] == [0, 1]


def test_heads_must_form_a_standard_layout():
    model = build_family_handle("llama").model
    with pytest.raises(SqueezeError, match="same number of query heads"):
        surgery.prune_heads_(model, {i: [0, 1, 2] for i in range(3)})
    assert surgery.nearest_heads(model.config, 3) == 4 and surgery.nearest_heads(model.config, 1) == 1


# ---------------------------------------------------------------------------- registration
def _plugin(*families):
    class P:
        @squeezelang.hookimpl
        def register_model_families(self, registry):
            for fam in families:
                registry.add(fam)
    return P()


def test_register_model_families_third_party_and_refusals():
    mine = ModelFamily(name="tinyformer", model_types=("tinyformer",), blocks="blocks",
                       q="attn.q", k="attn.k", v="attn.v", o="attn.o", mlp_in=("ff.up",),
                       mlp_out="ff.down", embeddings=("tok",), layers_key="n_layers",
                       hidden_key="d_model", heads_key="n_heads", inner_key="d_ff")
    regs = build_registries(plugin_manager([_plugin(mine)]))
    assert regs.families.for_config({"model_type": "tinyformer"}) is mine
    with pytest.raises(PluginError, match="model type 'llama'.*builtin_families"):
        build_registries(plugin_manager([_plugin(ModelFamily(**{**mine.__dict__, "name": "x",
                                                                 "model_types": ("llama",)}))]))
    with pytest.raises(PluginError, match="either q, k and v, or qkv"):
        build_registries(plugin_manager([_plugin(ModelFamily(**{**mine.__dict__, "qkv": "attn.qkv"}))],
                                        entry_points=False))


@pytest.mark.parametrize("layout,message", [
    (dict(block=("attn.q", "attn.x")), "layout.block names modules that are not roles: attn.x"),
    (dict(base=("tok", "pos")), "layout.base lists the blocks path"),
    (dict(base=("tok", "blocks", "norm")), "not norm"),
    (dict(rows={}), "no row-count key for pos"),
    (dict(tasks={"translation": TaskLayout()}), "unknown task translation"),
], ids=["block", "no blocks", "base", "rows", "task"])
def test_a_layout_is_checked_at_registration(layout, message):
    good = dict(prefix="model", base=("tok", "pos", "blocks"), block=("attn.q", "attn.k", "attn.v"),
                rows={"pos": "n_positions"}, tasks={"embedding": TaskLayout()})
    mine = ModelFamily(name="tinyformer", model_types=("tinyformer",), blocks="blocks",
                       q="attn.q", k="attn.k", v="attn.v", o="attn.o", mlp_in=("ff.up",),
                       mlp_out="ff.down", embeddings=("tok", "pos"), layers_key="n_layers",
                       hidden_key="d_model", heads_key="n_heads", inner_key="d_ff")
    build_registries(plugin_manager([_plugin(ModelFamily(**{**mine.__dict__,
                                                            "layout": Layout(**good)}))],
                                    entry_points=False))
    bad = ModelFamily(**{**mine.__dict__, "layout": Layout(**{**good, **layout})})
    with pytest.raises(PluginError, match=f"model family 'tinyformer': .*{message}"):
        build_registries(plugin_manager([_plugin(bad)], entry_points=False))


def test_every_built_in_family_has_a_layout_and_its_token_defaults(registries):
    """What ``layout_meta`` and ``vocab_count`` read from a family (no per-family tables there)."""
    import transformers

    for fam in registries.families:
        if registries.families.owner(fam.name) != "builtin_families":
            continue
        assert fam.layout is not None, fam.name
        for model_type in fam.model_types:
            defaults = transformers.CONFIG_MAPPING[model_type]().to_dict()
            for key, value in fam.config_defaults.items():
                assert defaults.get(key) == value, (model_type, key)
            for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
                assert key in fam.config_defaults, (model_type, key)


def test_unsupported_is_refused_at_plan_time(registries):
    from transformers import T5Config

    with pytest.raises(SqueezeError, match="supports model types .*llama.*not 't5'"):
        surgery.family(T5Config())
    fam = ModelFamily(**{**registries.families.get("llama").__dict__,
                         "unsupported": (("shrink", "no reason"),)})
    with pytest.raises(SqueezeError, match="shrink is not supported on model family 'llama'"):
        fam.require("shrink")


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("target, ratio", [("embedding", 0.01), ("embedding", 0.1), ("heads", 0.25),
                                           (["heads", "embedding"], 0.3)])
def test_pruned_sizes_are_ones_the_config_class_accepts(name, target, ratio):
    """Llama's and Gemma's config classes refuse a hidden size that the head count does not divide,
    even with an explicit head_dim: the sizes a ratio rounds to must be ones they accept."""
    import transformers

    from squeezelang_plugins.prune.activation import new_sizes

    from squeezelang.models.surgery import shrunk_config

    config = build_family_handle(name).model.config.to_dict()
    sizes = new_sizes(config, [target] if isinstance(target, str) else target, ratio)
    shrunk = shrunk_config(config, heads=sizes["heads"], hidden=sizes["hidden"], inner=sizes["inner"])
    transformers.AutoConfig.for_model(**shrunk)  # the family's config class takes it


def test_shrink_to_a_hidden_size_the_heads_do_not_divide_is_refused_clearly():
    from squeezelang.errors import SqueezeError
    from squeezelang.models.surgery import shrunk_config

    config = build_family_handle("llama").model.config.to_dict()
    with pytest.raises(SqueezeError, match=r"hidden size \(62\) must be a multiple .* llama"):
        shrunk_config(config, hidden=62)
