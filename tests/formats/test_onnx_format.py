"""The ``onnx`` output format: graphs ONNX Runtime runs, integer kernels fed with the engine's own
codes, refusals before anything runs, and a recipe measured on what ONNX Runtime computes."""
from __future__ import annotations

import collections
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

import squeezelang  # noqa: E402
from conftest import (FAMILY_CONFIGS, build_family_handle, build_tiny_llama,  # noqa: E402
                      calib_context)
from squeezelang.errors import RecipeErrors, SqueezeError  # noqa: E402
from squeezelang.models.handle import ModelHandle  # noqa: E402
from squeezelang.models.load import load_model  # noqa: E402
from squeezelang.models.quant_view import quantized_weights  # noqa: E402
from squeezelang_plugins.onnx_format.integer import fingerprint  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TASKS = {"bert": "embedding", "gpt2": "causal-lm", "llama": "causal-lm"}
#: Integer matmuls beyond the quantized linear layers: BERT's pooler is not in the graph (the
#: embedding is the token states), GPT-2's output layer is its quantized (tied) embedding.
EXTRA_MATMULS = {"bert": -1, "gpt2": 1, "llama": 0}
#: Whether the model's linear weights are stored ``[in, out]`` (GPT-2's Conv1D).
IN_OUT = {"bert": False, "gpt2": True, "llama": False}


# ---------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def model_dirs(tiny_bert_dir, tiny_gpt2_dir, tmp_path_factory) -> dict[str, Path]:
    return {"bert": tiny_bert_dir, "gpt2": tiny_gpt2_dir,
            "llama": build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))}


@pytest.fixture(scope="module")
def fmt(registries):
    return registries.output_formats.get("onnx")


def _apply(handle, registries, technique, **params):
    tech = registries.techniques.get(technique)
    tech.apply_(handle, {**tech.defaults_for(params), **params}, calib_context())
    return handle


def _batch(handle, seed=0, shape=(3, 11), lengths=(11, 7, 3)):
    """Right-padded token ids (padding with the pad id) and their mask."""
    vocab = handle.model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def _outputs(model, task, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=task != "embedding")
    hidden = out.last_hidden_state if task == "embedding" else out.hidden_states[-1]
    return {"last_hidden_state": hidden, "logits": getattr(out, "logits", None)}


def _error(handle, reloaded, seed=0, **batch):
    """The largest relative difference (to the largest reference value) between the in-memory
    model and the runtime over real tokens, per output."""
    ids, mask = _batch(handle, seed, **batch)
    ref = _outputs(handle.model, handle.task, ids, mask)
    got = _outputs(reloaded.model, handle.task, ids, mask)
    real = mask.bool()
    errors = {}
    for name, value in ref.items():
        if value is not None:
            keep = real if value.dim() == 3 else slice(None)  # a classifier's logits: per text
            errors[name] = float((got[name] - value)[keep].abs().max() / value[keep].abs().max())
    return errors


def _save(fmt, handle, path, **options):
    files = fmt.save(handle, path, {**fmt.defaults(), **options})
    return files, fmt.load(path, handle.task, {**fmt.defaults(), **options}, 2)


def _graph(path):
    return onnx.load(str(path / "model.onnx"))


def _ops(graph):
    return collections.Counter(node.op_type for node in graph.graph.node)


def _integer_matmuls(ops):
    """Integer products of the graph: a fused attention's ``QAttention`` holds three."""
    return ops["MatMulInteger"] + 3 * ops["QAttention"]


def _float_copies(graph, handle):
    """The quantized weights of ``handle`` whose float values (or transposes) the graph holds."""
    state = handle.model.state_dict()
    prints = {}
    for name in quantized_weights(handle):
        value = state[name].detach().float().numpy()
        prints[fingerprint(value)] = prints[fingerprint(value.T)] = name
    return {prints[key] for init in graph.graph.initializer
            if init.data_type == onnx.TensorProto.FLOAT
            and (key := fingerprint(onnx.numpy_helper.to_array(init))) in prints}


def _initializer(graph, name):
    return next(onnx.numpy_helper.to_array(i) for i in graph.graph.initializer if i.name == name)


def _linear_weights(handle):
    """Quantized weights of linear layers (not embeddings) as ``{name: QuantizedWeight}``."""
    embeddings = {f"{n}.weight" for n, m in handle.model.named_modules()
                  if isinstance(m, torch.nn.Embedding)}
    return {n: w for n, w in quantized_weights(handle).items() if n not in embeddings}


# ---------------------------------------------------------------------------- definition, check
def test_the_format_is_registered_with_its_options(fmt):
    assert fmt.runtime == "onnxruntime"
    assert fmt.model_files == ("model.onnx", "model.onnx.data")
    assert fmt.defaults() == {"opset": 18, "activations": "dynamic", "float_activations": [],
                              "fuse_attention": True}
    assert "MatMulNBits" in fmt.description and "dense" in fmt.description


def test_check_imports_neither_torch_nor_onnx():
    code = ("import sys; from squeezelang_plugins.onnx_format import OnnxFormat; "
            "print(OnnxFormat().check({}, [('q', frozenset({'int4', 'group:12'}))], 'embedding', "
            "{'model_type': 'bert'})); "
            "print([m for m in ('torch', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert "group_size = 12" in lines[0]
    assert lines[-1] == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("tags, message", [
    ({"int8", "bits:8"}, None),
    ({"int8", "bits:8", "int8-kernels", "per-tensor"}, None),
    ({"int4", "bits:4", "group:32"}, None),
    ({"mixed", "bits:4", "bits:8", "group:64"}, None),
    ({"sparse"}, None), ({"n:m"}, None), ({"low-rank"}, None), ({"shared-layers"}, None),
    ({"clustered"}, "clustered weights (codebooks) have no ONNX Runtime kernel"),
    ({"int4", "bits:4", "group:12"}, "group_size = 12: ONNX Runtime's MatMulNBits takes groups "
                                     "of a power of two of at least 16"),
    ({"int4", "bits:4", "group:8"}, "group_size = 8"),
    ({"mixed", "bits:2", "bits:4", "bits:6", "group:32"}, "take 4- and 8-bit codes, not 2, 6-bit"),
])
def test_check_refuses_what_the_kernels_cannot_take(fmt, tags, message):
    problems = fmt.check(fmt.defaults(), [("s", frozenset(tags))], "embedding",
                         {"model_type": "bert"})
    if message is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0][0] == "s" and message in problems[0][1]


def test_check_refuses_an_untested_family(fmt):
    assert fmt.check(fmt.defaults(), [], "causal-lm", None) == []
    assert fmt.check(fmt.defaults(), [], "causal-lm", {"model_type": "qwen3"}) == []
    [(where, message)] = fmt.check(fmt.defaults(), [], "causal-lm", {"model_type": "t5"})
    assert where is None and "not model_type 't5'" in message


def test_squeeze_check_refuses_at_the_stage(tmp_path, tiny_bert_dir):
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(f'''recipe "refused"
model = hf("{tiny_bert_dir}", task = "embedding")
stage c: share {{ method = "cluster", bits = 4 }}
stage q: quantize {{ scheme = "int4", group_size = 12 }}
output "out" {{ format = "onnx" }}
''')
    with pytest.raises(RecipeErrors) as info:
        squeezelang.check(recipe)
    errors = [(e.span.line, e.message) for e in info.value.errors]
    assert [line for line, _ in errors] == [3, 4]
    assert "stage 'c': output format 'onnx' cannot hold this: clustered" in errors[0][1]
    assert "stage 'q'" in errors[1][1] and "group_size = 12" in errors[1][1]


def test_save_refuses_what_check_refuses(fmt, registries, model_dirs, tmp_path):
    handle = _apply(load_model(model_dirs["gpt2"]), registries, "quantize", scheme="int4",
                    group_size=12)
    with pytest.raises(SqueezeError, match="'transformer.h.0.attn.c_attn.weight': group_size = 12"):
        fmt.save(handle, tmp_path / "int4", fmt.defaults())
    handle = _apply(load_model(model_dirs["gpt2"]), registries, "share", method="cluster", bits=4)
    with pytest.raises(SqueezeError, match="is clustered"):
        fmt.save(handle, tmp_path / "cluster", fmt.defaults())


def test_a_missing_or_old_runtime_is_named(monkeypatch):
    import importlib.util

    from squeezelang_plugins.onnx_format.artifact import needs_runtime

    monkeypatch.setattr(onnxruntime, "__version__", "1.17.3")
    with pytest.raises(SqueezeError, match=r"needs onnxruntime >= 1.23, not 1.17.3"):
        needs_runtime()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    with pytest.raises(SqueezeError, match=r"needs the 'onnx' extra \(onnxruntime missing\): "
                                           r"pip install 'squeezelang\[onnx\]'"):
        needs_runtime()


# ---------------------------------------------------------------------------- float graphs
@pytest.mark.parametrize("name", list(TASKS))
def test_float_graph_runs_like_torch(fmt, model_dirs, tmp_path, name):
    handle = load_model(model_dirs[name], task=TASKS[name])
    files, reloaded = _save(fmt, handle, tmp_path / name)
    assert {"model.onnx", "config.json", "tokenizer_config.json"} <= set(files)
    assert reloaded.model.runtime == "onnxruntime"
    inputs = [i.name for i in reloaded.model.session.get_inputs()]
    assert inputs == (["input_ids", "attention_mask", "token_type_ids"] if name == "bert"
                      else ["input_ids", "attention_mask"])
    for batch in ({}, {"shape": (1, 1), "lengths": (1,)}, {"shape": (2, 30), "lengths": (30, 30)}):
        errors = _error(handle, reloaded, **batch)
        assert max(errors.values()) < 1e-5, (batch, errors)


def test_runtime_counts_come_from_the_graph(fmt, registries, tmp_path):
    handle = build_family_handle("llama")  # distinct random values: the tracer merges equal ones
    torch_params = sum(p.numel() for p in handle.model.parameters())
    _, reloaded = _save(fmt, handle, tmp_path / "float")
    counts = reloaded.model.counts
    assert counts.params == torch_params and counts.memory >= 4 * torch_params
    _apply(handle, registries, "prune", method="magnitude", ratio=0.5)
    torch_nonzero = sum(int(p.count_nonzero()) for p in handle.model.parameters())
    _apply(handle, registries, "quantize", scheme="int4", group_size=32)
    _, reloaded = _save(fmt, handle, tmp_path / "int4")
    counts = reloaded.model.counts
    assert counts.params == torch_params
    assert counts.nonzero <= torch_nonzero < 0.75 * torch_params
    assert counts.memory < 0.3 * 4 * torch_params


def test_large_graphs_keep_their_tensors_in_a_data_file(fmt, model_dirs, tmp_path, monkeypatch):
    from squeezelang_plugins.onnx_format import artifact

    monkeypatch.setattr(artifact, "EXTERNAL_BYTES", 0)
    handle = load_model(model_dirs["llama"], task="causal-lm")
    files, reloaded = _save(fmt, handle, tmp_path / "big")
    assert {"model.onnx", "model.onnx.data"} <= set(files)
    graph = onnx.load(str(tmp_path / "big" / "model.onnx"), load_external_data=False)
    assert any(i.data_location == onnx.TensorProto.EXTERNAL for i in graph.graph.initializer)
    assert max(_error(handle, reloaded).values()) < 1e-5


# ---------------------------------------------------------------------------- integer kernels
@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_int8_weights_run_as_matmul_integer(fmt, registries, model_dirs, tmp_path, name,
                                            granularity):
    handle = _apply(load_model(model_dirs[name], task=TASKS[name]), registries, "quantize",
                    scheme="int8", granularity=granularity)
    _, reloaded = _save(fmt, handle, tmp_path / name)
    graph = _graph(tmp_path / name)
    linear = _linear_weights(handle)
    ops = _ops(graph)
    assert _integer_matmuls(ops) == len(linear) + EXTRA_MATMULS[name] and ops["MatMulNBits"] == 0
    assert ops["QAttention"] == (2 if name == "bert" else 0)  # encoders' attention is fused
    # one activation quantization for the layers reading one input (q, k, v; GPT-2 fuses them)
    assert ops["DynamicQuantizeLinear"] < _integer_matmuls(ops) or name == "gpt2"
    assert _float_copies(graph, handle) == set()
    weight = next(iter(linear.values()))
    stored = _initializer(graph, f"{weight.name}.codes")
    codes = weight.codes.numpy()
    assert (stored == (codes if IN_OUT[name] else codes.T)).all()  # [K, N], the engine's codes
    errors = _error(handle, reloaded)
    assert max(errors.values()) < 0.02, errors  # int8 activations, quantized per call


def test_float_activations_keep_the_codes_of_the_layers_they_name(fmt, registries, model_dirs,
                                                                   tmp_path):
    handle = _apply(load_model(model_dirs["bert"], task=TASKS["bert"]), registries, "quantize",
                    scheme="int8")
    _save(fmt, handle, tmp_path / "all")
    _save(fmt, handle, tmp_path / "some", float_activations=["encoder.layer.0.intermediate.*"])
    every, some = _graph(tmp_path / "all"), _graph(tmp_path / "some")
    assert _ops(some)["MatMulInteger"] == _ops(every)["MatMulInteger"] - 1
    name = "encoder.layer.0.intermediate.dense.weight"
    weight = quantized_weights(handle)[name]
    assert (_initializer(some, f"{name}.codes") == weight.codes.numpy().T).all()  # still int8
    assert _float_copies(some, handle) == set()


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("group", [16, 32])
def test_int4_weights_run_as_matmul_nbits(fmt, registries, model_dirs, tmp_path, name, group):
    handle = _apply(load_model(model_dirs[name], task=TASKS[name]), registries, "quantize",
                    scheme="int4", group_size=group)
    _, reloaded = _save(fmt, handle, tmp_path / name)
    graph = _graph(tmp_path / name)
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    linear = _linear_weights(handle)
    assert len(nbits) == len(linear) + EXTRA_MATMULS[name]
    assert _ops(graph)["GatherBlockQuantized"] >= 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}
    assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, group, 4)
    assert _float_copies(graph, handle) == set()
    weight = linear[nbits[0].input[1].removesuffix(".codes")]
    packed = _initializer(graph, nbits[0].input[1])
    n, k = attrs["N"], attrs["K"]
    assert packed.shape == (n, -(-k // group), group // 2)
    nibbles = torch.stack([torch.from_numpy(packed & 0x0F), torch.from_numpy(packed >> 4)], -1)
    codes = nibbles.reshape(n, -1)[:, :k].to(torch.int8) - 8  # low nibble first, zero point 8
    expected = weight.codes.t() if IN_OUT[name] else weight.codes
    assert torch.equal(codes, expected)
    errors = _error(handle, reloaded)
    assert max(errors.values()) < 0.02, errors


def test_integer_graphs_are_smaller(fmt, registries, tmp_path):
    """A BERT wide enough for the weights to outweigh the graph's nodes."""
    from transformers import BertConfig, BertModel

    from conftest import _bert_tokenizer

    tokenizer = _bert_tokenizer(tmp_path)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=512, max_position_embeddings=64)
    sizes = {}
    for scheme, params in [("float", None), ("int8", {"scheme": "int8"}),
                           ("int4", {"scheme": "int4", "group_size": 32})]:
        torch.manual_seed(0)
        handle = ModelHandle(model=BertModel(config).eval(), tokenizer=tokenizer, task="embedding")
        if params:
            _apply(handle, registries, "quantize", **params)
        fmt.save(handle, tmp_path / scheme, fmt.defaults())
        sizes[scheme] = (tmp_path / scheme / "model.onnx").stat().st_size
    assert sizes["int8"] < 0.35 * sizes["float"]
    assert sizes["int4"] < 0.25 * sizes["float"]


def test_int8_kernel_layers_are_exported_from_their_codes(fmt, registries, model_dirs, tmp_path):
    handle = _apply(load_model(model_dirs["bert"]), registries, "quantize", scheme="int8-dynamic")
    _, reloaded = _save(fmt, handle, tmp_path / "dyn")
    graph = _graph(tmp_path / "dyn")
    assert _integer_matmuls(_ops(graph)) == len(_linear_weights(handle)) + EXTRA_MATMULS["bert"]
    assert _float_copies(graph, handle) == set()
    # torch's dynamic int8 kernels and ONNX Runtime's quantize the activations alike
    assert _error(handle, reloaded)["last_hidden_state"] < 1e-4


def test_float_activations_dequantize_the_codes(fmt, registries, model_dirs, tmp_path):
    handle = _apply(load_model(model_dirs["llama"], task="causal-lm"), registries, "quantize",
                    scheme="int8")
    _, reloaded = _save(fmt, handle, tmp_path / "float", activations="float")
    ops = _ops(_graph(tmp_path / "float"))
    assert ops["MatMulInteger"] == ops["DynamicQuantizeLinear"] == 0
    assert _float_copies(_graph(tmp_path / "float"), handle) == set()
    assert max(_error(handle, reloaded).values()) < 1e-5


# ---------------------------------------------------------------------------- families and tasks
@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_llama_style_families(fmt, registries, tmp_path, family):
    from squeezelang_plugins.onnx_format import FAMILIES

    handle = _apply(build_family_handle(family), registries, "quantize", scheme="int8")
    assert handle.model.config.model_type in FAMILIES
    _, reloaded = _save(fmt, handle, tmp_path / family)
    assert _float_copies(_graph(tmp_path / family), handle) == set()
    assert max(_error(handle, reloaded).values()) < 0.05


@pytest.mark.parametrize("config_class", ["BertConfig", "RobertaConfig", "XLMRobertaConfig"])
@pytest.mark.parametrize("task", ["masked-lm", "classification"])
def test_encoder_families_and_tasks(fmt, registries, tmp_path, config_class, task):
    import transformers

    from conftest import _bert_tokenizer
    from squeezelang_plugins.onnx_format import FAMILIES

    tokenizer = _bert_tokenizer(tmp_path)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=80, pad_token_id=0)
    assert config.model_type in FAMILIES
    auto = {"masked-lm": transformers.AutoModelForMaskedLM,
            "classification": transformers.AutoModelForSequenceClassification}[task]
    torch.manual_seed(0)
    handle = ModelHandle(model=auto.from_config(config).eval(), tokenizer=tokenizer, task=task)
    _apply(handle, registries, "quantize", scheme="int4", group_size=16)
    _, reloaded = _save(fmt, handle, tmp_path / "encoder")
    ids, mask = _batch(handle)
    logits = _outputs(reloaded.model, task, ids, mask)["logits"]
    assert logits.shape == ((3, 11, len(tokenizer)) if task == "masked-lm" else (3, 2))
    assert max(_error(handle, reloaded).values()) < 0.02


# ---------------------------------------------------------------------------- shared and changed
@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_a_tied_vocabulary_is_stored_once(fmt, registries, model_dirs, tmp_path, scheme):
    handle = load_model(model_dirs["gpt2"], task="causal-lm")
    if scheme:
        _apply(handle, registries, "quantize", scheme=scheme,
               **({"group_size": 16} if scheme == "int4" else {}))
    _, reloaded = _save(fmt, handle, tmp_path / "gpt2")
    vocab, hidden = handle.model.get_input_embeddings().weight.shape
    sizes = {vocab * hidden, vocab * hidden // 2}
    big = [i.name for i in _graph(tmp_path / "gpt2").graph.initializer
           if int(torch.tensor(list(i.dims)).prod()) in sizes]
    stored = "model.transformer.wte.weight" if scheme is None else "transformer.wte.weight.codes"
    assert big == [stored]
    assert max(_error(handle, reloaded).values()) < (1e-5 if scheme is None else 0.02)


def test_shared_and_factorized_layers(fmt, registries, model_dirs, tmp_path):
    shared = _apply(load_model(model_dirs["bert"]), registries, "share", method="cross_layer",
                    groups=1)
    _apply(shared, registries, "quantize", scheme="int8")
    _, reloaded = _save(fmt, shared, tmp_path / "shared")
    graph = _graph(tmp_path / "shared")
    codes = [i for i in graph.graph.initializer
             if i.name.endswith(".codes") and "encoder" in i.name]
    assert _ops(graph)["MatMulInteger"] == 2 * len(codes)  # both blocks read one set of codes
    assert max(_error(shared, reloaded).values()) < 0.02
    lowrank = _apply(load_model(model_dirs["llama"], task="causal-lm"), registries, "factorize",
                     rank=0.5)
    _apply(lowrank, registries, "quantize", scheme="int8")
    _, reloaded = _save(fmt, lowrank, tmp_path / "lowrank")
    assert _float_copies(_graph(tmp_path / "lowrank"), lowrank) == set()
    assert max(_error(lowrank, reloaded).values()) < 0.02


def test_a_half_precision_model_is_exported_in_float32(fmt, registries, model_dirs, tmp_path):
    handle = load_model(model_dirs["llama"], task="causal-lm")
    handle.model = handle.model.to(torch.bfloat16)
    _apply(handle, registries, "quantize", scheme="int8", include=["model.layers.*"])
    reference = ModelHandle(model=copy.deepcopy(handle.model).float(), tokenizer=handle.tokenizer,
                            task=handle.task, codecs=handle.codecs)
    _, reloaded = _save(fmt, handle, tmp_path / "bf16")
    assert {p.dtype for p in handle.model.parameters()} == {torch.bfloat16}  # left as it was
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "float32"
    assert _float_copies(_graph(tmp_path / "bf16"), handle) == set()
    assert max(_error(reference, reloaded).values()) < 0.02


# ---------------------------------------------------------------------------- end to end
def test_squeeze_run_measures_what_onnx_runtime_computes(registries, tmp_path, tiny_bert_dir,
                                                         sentences_file):
    from transformers import AutoTokenizer

    recipe = tmp_path / "r.squeeze"
    recipe.write_text(f'''recipe "tiny-onnx"
model = hf("{tiny_bert_dir}", task = "embedding")
data calib = text("{sentences_file}")
metric faithful = fidelity(calib)
stage q: quantize {{ scheme = "int8" }}
output "out" {{ format = "onnx" }}
''')
    result = squeezelang.run(recipe, output=tmp_path / "out")
    report = result.report
    out = tmp_path / "out"
    assert report["output"]["runtime"] == "onnxruntime"
    assert report["output"]["format"] == "onnx"
    assert report["metrics"]["size"]["final"] == (out / "model.onnx").stat().st_size
    assert 0.99 < report["metrics"]["faithful"]["final"] <= 1.0
    # the directory alone, with plain onnxruntime and transformers
    session = onnxruntime.InferenceSession(str(out / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    batch = tokenizer(["a man is playing a guitar", "the cat"], padding=True, return_tensors="np")
    hidden = session.run(["last_hidden_state"], dict(batch))[0]
    assert hidden.shape == (2, batch["input_ids"].shape[1], 32)
    reference = load_model(tiny_bert_dir)
    _apply(reference, registries, "quantize", scheme="int8")
    with torch.no_grad():
        expected = reference.model(**{k: torch.from_numpy(v) for k, v in batch.items()})[0]
    real = batch["attention_mask"].astype(bool)
    assert abs(hidden - expected.numpy())[real].max() < 0.02 * abs(expected.numpy()).max()
