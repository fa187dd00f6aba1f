"""A model family that a ``--plugin`` module registers (not an installed entry point) is the one
the planner and the structured techniques use: ``families_in_use`` carries the run's registries.

The architecture is a renamed Llama: a config subclass with its own ``model_type``, registered with
transformers' ``AutoConfig``/``AutoModelForCausalLM`` inside the test, and a plugin module whose
family is a renamed copy of the built-in ``llama`` family.
"""
from __future__ import annotations

import types

import pytest

import squeezelang
from squeezelang.errors import RecipeErrors, SqueezeError
from squeezelang.hooks.family import ModelFamily, families_in_use, family_of, registries_in_use
from squeezelang.hooks.manager import build_registries, default_registries, plugin_manager
from squeezelang.models import layout_meta

from conftest import build_tiny_llama

MODEL_TYPE = "squeeze-test-tinyllama"


@pytest.fixture(scope="module")
def tinyllama():
    """``MODEL_TYPE`` registered with transformers for the module's tests, then removed."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    class TinyLlamaConfig(LlamaConfig):
        model_type = MODEL_TYPE

    class TinyLlamaForCausalLM(LlamaForCausalLM):
        config_class = TinyLlamaConfig

    AutoConfig.register(MODEL_TYPE, TinyLlamaConfig)
    AutoModelForCausalLM.register(TinyLlamaConfig, TinyLlamaForCausalLM)
    yield TinyLlamaConfig, TinyLlamaForCausalLM
    transformers.CONFIG_MAPPING._extra_content.pop(MODEL_TYPE, None)
    AutoModelForCausalLM._model_mapping._extra_content.pop(TinyLlamaConfig, None)


@pytest.fixture(scope="module")
def plugin_module():
    """A plugin module registering a renamed copy of the ``llama`` family (layout included)."""
    llama = default_registries().families.get("llama")
    family = ModelFamily(**{**llama.__dict__, "name": "tinyllama", "model_types": (MODEL_TYPE,)})
    module = types.ModuleType("squeeze_test_tinyllama_family")

    @squeezelang.hookimpl
    def register_model_families(registry):
        registry.add(family)

    module.register_model_families = register_model_families
    return module


@pytest.fixture(scope="module")
def model_dir(tinyllama, tmp_path_factory):
    config_cls, model_cls = tinyllama
    return build_tiny_llama(tmp_path_factory.mktemp("tinyllama"), layers=4, config_cls=config_cls,
                            model_cls=model_cls)


RECIPE = '''recipe "plugin family"
model = hf("{model}", task = "causal-lm")
data calib = text("{data}")
stage depth: prune {{ method = "depth", ratio = 0.5, data = calib, samples = 8 }}
'''


def test_a_plugin_family_works_end_to_end(model_dir, plugin_module, sentences_file, tmp_path):
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(RECIPE.format(model=model_dir, data=sentences_file), encoding="utf-8")
    with pytest.raises(SqueezeError, match=f"not '{MODEL_TYPE}'"):
        squeezelang.plan(recipe)  # the installed plugins alone do not know it

    planned = squeezelang.plan(recipe, plugins=[plugin_module])
    result = squeezelang.run(recipe, tmp_path / "out", plugins=[plugin_module])
    assert result.model.config.model_type == MODEL_TYPE
    assert result.model.config.num_hidden_layers == 2
    assert len(result.model.model.layers) == 2
    predicted = planned.prediction.stages[-1]
    assert predicted.params_count == sum(p.numel() for p in result.model.parameters())


def test_families_in_use_is_scoped(plugin_module):
    regs = build_registries(plugin_manager([plugin_module]))
    config = {"model_type": MODEL_TYPE, "vocab_size": 50, "hidden_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
    assert layout_meta.meta_of(config, "causal-lm") is None  # unknown outside the scope
    with families_in_use(regs):
        assert registries_in_use() is regs
        assert family_of(config).name == "tinyllama"
        meta = layout_meta.meta_of(config, "causal-lm")
        assert meta is not None and "model.layers.1.mlp.down_proj.weight" in meta.tensors
    assert registries_in_use() is default_registries()
    with pytest.raises(SqueezeError, match="structured pruning supports model types"):
        family_of(config)


def test_what_a_family_cannot_do_is_refused_by_check_at_the_stage(model_dir, sentences_file,
                                                                   tmp_path):
    """A family's ``unsupported`` entries stop ``squeeze check`` itself, at the stage that needs
    them, naming the family — before any plan or run, and without torch."""
    llama = default_registries().families.get("llama")
    limited = ModelFamily(**{**llama.__dict__, "name": "tinyllama", "model_types": (MODEL_TYPE,),
                             "unsupported": (("prune:heads", "no grouped heads here"),)})
    module = types.ModuleType("squeeze_test_limited_family")

    @squeezelang.hookimpl
    def register_model_families(registry):
        registry.add(limited)

    module.register_model_families = register_model_families
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(RECIPE.format(model=model_dir, data=sentences_file)
                      + 'stage heads: prune { method = "activation", target = "heads", ratio = 0.5, '
                        'data = calib }\n', encoding="utf-8")
    with pytest.raises(RecipeErrors) as info:
        squeezelang.check(recipe, plugins=[module])
    errors = [(e.span.line, e.span.column, e.message) for e in info.value.errors]
    assert errors == [(5, 14, "stage 'heads': prune:heads is not supported on model family "
                              "'tinyllama' yet: no grouped heads here")]
    recipe.write_text(recipe.read_text(encoding="utf-8").replace('"heads"', '"mlp"'), encoding="utf-8")
    assert squeezelang.check(recipe, plugins=[module]).stages[-1].params["target"] == "mlp"
