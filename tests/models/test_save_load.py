"""Saving and loading model directories: plain checkpoints, codecs, tied weights, copied files."""
from __future__ import annotations

import json
import os

import pytest
import torch

from squeezelang.errors import SqueezeError
from squeezelang.models import codec
from squeezelang.models.load import load_model, task_from_config
from squeezelang.models.save import save_model
from squeezelang.models.size import artifact_bytes

IDS = torch.tensor([[2, 10, 11, 12, 13, 3]])


def _out(model):
    with torch.no_grad():
        return model(input_ids=IDS)[0]


def test_plain_save_loads_with_transformers(tiny_bert_dir, tmp_path):
    from transformers import AutoModel

    handle = load_model(tiny_bert_dir)
    assert handle.task == "embedding" and handle.tokenizer is not None
    written = save_model(handle, tmp_path / "out")
    assert "model.safetensors" in written and "config.json" in written
    assert "squeeze.json" not in written
    plain = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(_out(plain), _out(handle.model))


def test_aux_files_are_copied_and_weights_are_not(tiny_bert_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in tiny_bert_dir.rglob("*"):
        if p.is_file():
            (src / p.relative_to(tiny_bert_dir)).parent.mkdir(parents=True, exist_ok=True)
            (src / p.relative_to(tiny_bert_dir)).write_bytes(p.read_bytes())
    (src / "README.md").write_text("# model card")
    (src / "pytorch_model.bin").write_bytes(b"not for copying")
    (src / "report.json").write_text("{}")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    os.symlink(secret, src / "leak.txt")
    os.symlink(tmp_path, src / "leakdir")
    handle = load_model(src)
    written = save_model(handle, tmp_path / "out")
    for name in ("README.md", "modules.json", "1_Pooling/config.json", "vocab.txt",
                 "tokenizer_config.json"):
        assert name in written and (tmp_path / "out" / name).is_file()
    for name in ("pytorch_model.bin", "leak.txt", "report.json"):
        assert not (tmp_path / "out" / name).exists()
    assert not (tmp_path / "out" / "leakdir").exists()
    assert json.loads((tmp_path / "out" / "1_Pooling" / "config.json").read_text())[
        "pooling_mode_mean_tokens"] is True


def test_changed_tokenizer_is_saved_not_copied(tiny_bert_dir, tmp_path):
    handle = load_model(tiny_bert_dir)
    handle.tokenizer.add_tokens(["zebra"])
    handle.tokenizer_changed = True
    save_model(handle, tmp_path / "out")
    assert "zebra" in (tmp_path / "out" / "tokenizer.json").read_text()
    assert (tmp_path / "out" / "modules.json").is_file()


def test_sparse_codec_shrinks_and_reloads_exactly(tiny_bert_dir, tmp_path, registries):
    handle = load_model(tiny_bert_dir)
    name = "encoder.layer.0.intermediate.dense.weight"
    with torch.no_grad():
        w = handle.model.get_parameter(name)
        w.mul_(torch.rand_like(w) < 0.3)
    handle.codecs[name] = {"sparse": True}
    handle.states.add("sparse")
    save_model(handle, tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "squeeze.json").read_text())
    assert doc["format"] == "squeezelang" and doc["version"] == 1
    assert doc["codecs"] == {name: {"sparse": True}} and doc["states"] == ["sparse"]
    assert artifact_bytes(tmp_path / "out") < artifact_bytes(tiny_bert_dir)
    back = load_model(tmp_path / "out", registries)
    assert back.codecs == handle.codecs and back.states == {"sparse"} and back.task == "embedding"
    assert torch.equal(back.model.get_parameter(name), w)
    assert torch.equal(_out(back.model), _out(handle.model))
    save_model(back, tmp_path / "again")  # a loaded model saves again identically
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        tmp_path / "out" / "model.safetensors").read_bytes()


@pytest.mark.skipif(not os.path.isfile("/proc/self/maps"), reason="Linux-only: /proc/self/maps")
def test_a_loaded_model_keeps_no_part_of_its_weight_file_mapped(tiny_bert_dir, tmp_path,
                                                                registries):
    """Decoded weights are memory of their own, and so are the dense ones the model keeps as
    stored (norms, biases): one tensor mapped from the file would keep the whole file mapped,
    and each page read resident, for as long as the model lives."""
    import gc

    handle = load_model(tiny_bert_dir)
    name = "encoder.layer.0.intermediate.dense.weight"
    codec.quantize_weight_(handle.model.get_parameter(name).data, 8, 0)
    handle.codecs[name] = {"quant": {"bits": 8, "axis": 0}}
    save_model(handle, tmp_path / "out")
    weights = str((tmp_path / "out" / "model.safetensors").resolve())
    back = load_model(tmp_path / "out", registries)
    gc.collect()
    with open("/proc/self/maps", encoding="utf-8") as maps:
        mapped = [line for line in maps if line.rstrip().endswith(weights)]
    assert mapped == []
    assert torch.equal(_out(back.model), _out(handle.model))


def test_tied_gpt2_weights_are_stored_once_and_stay_tied(tiny_gpt2_dir, tmp_path, registries):
    from safetensors import safe_open

    handle = load_model(tiny_gpt2_dir)
    assert handle.task == "causal-lm"
    model = handle.model
    assert model.lm_head.weight is model.transformer.wte.weight
    codec.quantize_weight_(model.transformer.wte.weight.data, 8, 0)
    handle.codecs["lm_head.weight"] = {"quant": {"bits": 8, "axis": 0}}  # named by its alias
    handle.states.add("quantized")
    save_model(handle, tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight.__codes" in keys and not any(k.startswith("lm_head") for k in keys)
    back = load_model(tmp_path / "out", registries)
    assert back.model.lm_head.weight is back.model.transformer.wte.weight
    assert back.codecs == {"transformer.wte.weight": {"quant": {"bits": 8, "axis": 0}}}
    assert torch.equal(_out(back.model), _out(model))


def test_states_only_writes_squeeze_json_and_reloads(tiny_gpt2_dir, tmp_path):
    handle = load_model(tiny_gpt2_dir)
    handle.states.add("distilled")
    save_model(handle, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "squeeze.json").read_text())["states"] == ["distilled"]
    back = load_model(tmp_path / "out")
    assert back.states == {"distilled"}
    assert torch.equal(_out(back.model), _out(handle.model))


def test_unknown_codec_name_is_an_error(tiny_bert_dir, tmp_path):
    handle = load_model(tiny_bert_dir)
    handle.codecs["no.such.weight"] = {"sparse": True}
    with pytest.raises(SqueezeError, match="no.such.weight"):
        save_model(handle, tmp_path / "out")


@pytest.fixture()
def squeezed(tiny_bert_dir, tmp_path):
    handle = load_model(tiny_bert_dir)
    handle.codecs["pooler.dense.weight"] = {"sparse": True}
    save_model(handle, tmp_path / "sq")
    return tmp_path / "sq"


def test_corrupt_weights_name_the_file(squeezed):
    (squeezed / "model.safetensors").write_bytes(b"garbage!" * 4)
    with pytest.raises(SqueezeError, match="model.safetensors"):
        load_model(squeezed)


def test_bad_squeeze_json_names_the_file(squeezed):
    (squeezed / "squeeze.json").write_text("{not json")
    with pytest.raises(SqueezeError, match="squeeze.json"):
        load_model(squeezed)
    (squeezed / "squeeze.json").write_text(json.dumps({"format": "squeezelang", "version": 99}))
    with pytest.raises(SqueezeError, match="newer"):
        load_model(squeezed)


def test_unknown_edit_technique(squeezed, registries):
    doc = json.loads((squeezed / "squeeze.json").read_text())
    doc["edits"] = [{"technique": "teleport"}]
    (squeezed / "squeeze.json").write_text(json.dumps(doc))
    with pytest.raises(SqueezeError, match="technique 'teleport'"):
        load_model(squeezed, registries)


def test_missing_and_unexpected_tensors(squeezed):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(squeezed / "model.safetensors"))
    tensors["extra"] = torch.zeros(1)
    del tensors["embeddings.LayerNorm.bias"]
    save_file(tensors, str(squeezed / "model.safetensors"))
    with pytest.raises(SqueezeError, match="missing tensor.*embeddings.LayerNorm.bias"):
        load_model(squeezed)
    tensors["embeddings.LayerNorm.bias"] = torch.zeros(32)
    save_file(tensors, str(squeezed / "model.safetensors"))
    with pytest.raises(SqueezeError, match="unexpected tensor.*extra"):
        load_model(squeezed)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(SqueezeError, match="not a directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(SqueezeError, match="config.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("architectures, task", [
    (["BertModel"], "embedding"), (["GPT2LMHeadModel"], "causal-lm"),
    (["LlamaForCausalLM"], "causal-lm"), (["BertForMaskedLM"], "masked-lm"),
    (["BertForSequenceClassification"], "classification"), (None, "embedding"),
])
def test_task_from_config(architectures, task):
    assert task_from_config({"architectures": architectures}) == task
