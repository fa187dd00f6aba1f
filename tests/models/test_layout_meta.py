"""Meta-data computed from a config and its family's layout (``layout_meta``) equals the meta-data of
the transformers model built from it, config by config and task by task, for every built-in family;
first plans of those families import no torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from squeezelang.models import hf, layout_meta
from squeezelang.models.meta import meta_from_model

BERT = {"model_type": "bert", "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 48, "max_position_embeddings": 40}
GPT2 = {"model_type": "gpt2", "vocab_size": 77, "n_embd": 32, "n_layer": 3, "n_head": 4,
        "n_positions": 50}
#: Decoders: grouped-query attention (4 query heads over 2 key/value groups) unless said otherwise.
DECODER = {"vocab_size": 90, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 40, "max_position_embeddings": 64}
KNOWN = [
    ("bert", BERT),
    ("bert-defaults", {"model_type": "bert", "num_hidden_layers": 1}),
    ("bert-untied-3-labels", {**BERT, "tie_word_embeddings": False, "type_vocab_size": 1,
                              "id2label": {"0": "a", "1": "b", "2": "c"}}),
    ("bert-float32", {**BERT, "torch_dtype": "float32", "transformers_version": "4.8.2"}),
    ("bert-float16", {**BERT, "torch_dtype": "float16"}),
    ("roberta", {**BERT, "model_type": "roberta"}),
    ("roberta-untied", {**BERT, "model_type": "roberta", "tie_word_embeddings": False,
                        "num_labels": 3}),
    ("xlm-roberta", {**BERT, "model_type": "xlm-roberta"}),
    ("xlm-roberta-untied", {**BERT, "model_type": "xlm-roberta", "tie_word_embeddings": False}),
    ("gpt2", GPT2),
    ("gpt2-inner-untied", {**GPT2, "n_inner": 40, "tie_word_embeddings": False, "num_labels": 5}),
    ("gpt2-defaults", {"model_type": "gpt2", "n_layer": 1}),
    ("llama", {**DECODER, "model_type": "llama"}),
    ("llama-tied-biases", {**DECODER, "model_type": "llama", "tie_word_embeddings": True,
                           "attention_bias": True, "mlp_bias": True}),
    ("llama-head-dim-mha", {**DECODER, "model_type": "llama", "head_dim": 24,
                            "num_key_value_heads": 4}),
    ("llama-no-kv-key", {k: v for k, v in {**DECODER, "model_type": "llama"}.items()
                         if k != "num_key_value_heads"}),
    ("llama-bfloat16", {**DECODER, "model_type": "llama", "torch_dtype": "bfloat16"}),
    ("llama-defaults", {"model_type": "llama", "num_hidden_layers": 1}),
    ("mistral", {**DECODER, "model_type": "mistral", "sliding_window": 16}),
    ("mistral-head-dim-tied", {**DECODER, "model_type": "mistral", "head_dim": 12,
                               "tie_word_embeddings": True, "dtype": "bfloat16"}),
    ("qwen2", {**DECODER, "model_type": "qwen2"}),
    ("qwen2-tied", {**DECODER, "model_type": "qwen2", "tie_word_embeddings": True,
                    "num_key_value_heads": 1}),
    ("qwen3", {**DECODER, "model_type": "qwen3", "head_dim": 16}),
    ("qwen3-bias-head-dim", {**DECODER, "model_type": "qwen3", "head_dim": 24,
                             "attention_bias": True, "tie_word_embeddings": True}),
    ("qwen3-default-head-dim", {**DECODER, "model_type": "qwen3"}),
    ("phi3", {**DECODER, "model_type": "phi3", "pad_token_id": 0}),
    ("phi3-mha-tied", {**DECODER, "model_type": "phi3", "pad_token_id": 0,
                       "num_key_value_heads": 4, "tie_word_embeddings": True}),
    ("gemma2", {**DECODER, "model_type": "gemma2", "head_dim": 16, "query_pre_attn_scalar": 16}),
    ("gemma2-untied-bias", {**DECODER, "model_type": "gemma2", "head_dim": 24,
                            "tie_word_embeddings": False, "attention_bias": True}),
    ("gemma3_text", {**DECODER, "model_type": "gemma3_text", "head_dim": 16,
                     "query_pre_attn_scalar": 16}),
    ("gemma3_text-untied-bias", {**DECODER, "model_type": "gemma3_text", "head_dim": 24,
                                 "tie_word_embeddings": False, "attention_bias": True,
                                 "torch_dtype": "bfloat16"}),
]
TASKS = ["embedding", "causal-lm", "masked-lm", "classification"]
UNKNOWN = [
    ("no family", {**BERT, "model_type": "t5"}, "embedding"),
    ("relative positions", {**BERT, "position_embedding_type": "relative_key"}, "embedding"),
    ("cross-attention", {**BERT, "is_decoder": True, "add_cross_attention": True}, "causal-lm"),
    ("float64", {**BERT, "torch_dtype": "float64"}, "embedding"),
    ("gpt2 masked-lm", GPT2, "masked-lm"),
    ("llama masked-lm", {**DECODER, "model_type": "llama"}, "masked-lm"),
    ("size not a number", {**BERT, "hidden_size": "32"}, "embedding"),
    ("size zero", {**BERT, "num_attention_heads": 0}, "embedding"),
    ("heads do not divide", {**BERT, "num_attention_heads": 5}, "embedding"),
    ("groups do not divide", {**DECODER, "model_type": "llama", "num_key_value_heads": 3},
     "causal-lm"),
    ("mistral's 8 default groups", {k: v for k, v in {**DECODER, "model_type": "mistral"}.items()
                                    if k != "num_key_value_heads"}, "causal-lm"),
    ("padding outside the vocabulary", {**DECODER, "model_type": "phi3"}, "causal-lm"),
    ("bias flag not a boolean", {**DECODER, "model_type": "llama", "attention_bias": "yes"},
     "causal-lm"),
]


def _built(config: dict, task: str):
    try:
        model = hf.from_config(dict(config), task, meta=True)
    except (ValueError, KeyError):  # transformers has no such head for the family
        return None
    return meta_from_model(model, task)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name,config", KNOWN, ids=[k for k, _ in KNOWN])
def test_computed_meta_equals_the_built_model(name, config, task):
    built = _built(config, task)
    computed = layout_meta.meta_of(config, task)
    if built is None:
        assert computed is None
        return
    assert computed is not None, f"{name}/{task}: expected a computed layout"
    assert [(m.name, m.kind, m.tensors) for m in computed.modules.values()] == \
        [(m.name, m.kind, m.tensors) for m in built.modules.values()]
    assert computed.tensors == built.tensors
    assert computed.size_bytes() == built.size_bytes()
    for key in ("model_type", "vocab_size", "tie_word_embeddings", "num_hidden_layers",
                "num_attention_heads", "hidden_size", "intermediate_size", "n_layer", "n_head",
                "n_embd", "n_inner", "attention_bias", "mlp_bias", "pad_token_id", "bos_token_id",
                "eos_token_id"):
        if key in built.config:
            assert computed.config.get(key) == built.config[key], key


@pytest.mark.parametrize("name,config,task", UNKNOWN, ids=[u[0] for u in UNKNOWN])
def test_what_it_does_not_know_is_left_to_transformers(name, config, task):
    assert layout_meta.meta_of(config, task) is None


def test_the_real_minilm_config(minilm_dir):
    config = hf.read_config(minilm_dir)
    computed = layout_meta.meta_of(config, "embedding")
    assert computed is not None and computed.params() == 22_713_216
    assert computed.tensors == _built(config, "embedding").tensors


RECIPE = '''recipe "known"
model = hf("{model}", task = "{task}")
data calib = text("{data}")
stage mlp: prune {{ method = "activation", target = "mlp", ratio = 0.5, data = calib }}
stage depth: prune {{ method = "depth", ratio = 0.5, data = calib }}
stage q: quantize {{ scheme = "int8" }}
'''


def _plan(recipe: Path, computed: bool) -> tuple[dict, list[str]]:
    """``squeeze plan --json`` in a fresh process with the cache off (with or without
    ``layout_meta``), and the heavy modules the process imported."""
    code = ("import sys, json\n"
            "from squeezelang import cli\n"
            "from squeezelang.models import layout_meta\n"
            f"if not {computed}: layout_meta.meta_of = lambda config, task, family=None: None\n"
            "code = cli.main(['plan', sys.argv[1], '--json'])\n"
            "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
            "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
            "sys.exit(code)\n")
    env = {**os.environ, "SQUEEZE_CACHE_DIR": "off"}
    done = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    heavy = [line for line in done.stderr.splitlines() if line.startswith("HEAVY=")][-1]
    return json.loads(done.stdout), [m for m in heavy.removeprefix("HEAVY=").split(",") if m]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama (grouped-query attention, untied head) with a character-level tokenizer."""
    from conftest import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.mark.parametrize("model,task", [("tiny_bert_dir", "embedding"),
                                        ("tiny_gpt2_dir", "causal-lm"),
                                        ("tiny_llama_dir", "causal-lm")])
def test_a_first_plan_of_a_known_family_imports_no_torch_and_predicts_the_same(
        model, task, request, tmp_path, sentences_file):
    recipe = tmp_path / "known.squeeze"
    recipe.write_text(RECIPE.format(model=request.getfixturevalue(model), task=task,
                                    data=sentences_file), encoding="utf-8")
    computed, heavy = _plan(recipe, computed=True)
    assert heavy == []
    built, heavy_built = _plan(recipe, computed=False)
    assert "torch" in heavy_built
    assert computed == built


def test_another_default_dtype_is_left_to_transformers():
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert layout_meta.meta_of(BERT, "embedding") is None
    finally:
        torch.set_default_dtype(previous)
    assert layout_meta.meta_of(BERT, "embedding") is not None
