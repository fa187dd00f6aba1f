"""W8A8 models (``quantize`` scheme ``w8a8``) in the ``onnx`` format: static ``QuantizeLinear`` and
``MatMulIntegerToFloat`` with the engine's own codes and activation grids, computing what the
torch model computes."""
from __future__ import annotations

import collections

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

import squeezelang  # noqa: E402
from conftest import (FAMILY_CONFIGS, build_family_handle,  # noqa: E402
                      calib_context)
from squeezelang.models.layers import W8A8Linear  # noqa: E402
from squeezelang.models.load import load_model  # noqa: E402
from squeezelang.models.quant_view import quantized_weights  # noqa: E402
from squeezelang_plugins.onnx_format.integer import fingerprint  # noqa: E402
from test_onnx_format import fmt, model_dirs  # noqa: E402,F401  (the fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TASKS = {"bert": "embedding", "gpt2": "causal-lm", "llama": "causal-lm"}
#: Layers of the torch model missing from the graph: BERT's pooler (the embedding is the states).
ABSENT = {"bert": 1, "gpt2": 0, "llama": 0}


def _w8a8(handle, registries, **params):
    tech = registries.techniques.get("quantize")
    params = {"scheme": "w8a8", "data": "calib", **params}
    tech.apply_(handle, {**tech.defaults_for(params), **params}, calib_context())
    return handle


def _save(fmt, handle, path, **options):
    fmt.save(handle, path, {**fmt.defaults(), **options})
    return onnx.load(str(path / "model.onnx")), fmt.load(path, handle.task,
                                                        {**fmt.defaults(), **options}, 2)


def _errors(handle, reloaded, seed=0):
    """The largest difference over real tokens, relative to the largest value, per output."""
    vocab = handle.model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (3, 11), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(11)[None, :] < torch.tensor([11, 7, 3])[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    real = mask.bool()
    errors = {}
    for name, model in (("ref", handle.model), ("got", reloaded.model)):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask,
                        output_hidden_states=handle.task != "embedding")
        hidden = out.last_hidden_state if handle.task == "embedding" else out.hidden_states[-1]
        errors[name] = {"hidden": hidden[real], "logits": getattr(out, "logits", None)}
    out = {}
    for key, ref in errors["ref"].items():
        if ref is not None:
            ref = ref if key == "hidden" else ref[real]
            got = errors["got"][key] if key == "hidden" else errors["got"][key][real]
            out[key] = float((got - ref).abs().max() / ref.abs().max())
    return out


def _ops(graph):
    return collections.Counter(node.op_type for node in graph.graph.node)


def _initializer(graph, name):
    return next(onnx.numpy_helper.to_array(i) for i in graph.graph.initializer if i.name == name)


def _float_copies(graph, handle):
    state = handle.model.state_dict()
    prints = {}
    for name in quantized_weights(handle):
        value = state[name].detach().float().numpy()
        prints[fingerprint(value)] = prints[fingerprint(value.T)] = name
    return {prints[key] for init in graph.graph.initializer
            if init.data_type == onnx.TensorProto.FLOAT
            and (key := fingerprint(onnx.numpy_helper.to_array(init))) in prints}


def _layers(handle):
    return {n: m for n, m in handle.model.named_modules() if isinstance(m, W8A8Linear)}


@pytest.mark.parametrize("name", list(TASKS))
def test_w8a8_layers_run_static_integer_kernels(fmt, registries, model_dirs, tmp_path, name):
    handle = _w8a8(load_model(model_dirs[name], task=TASKS[name]), registries)
    graph, reloaded = _save(fmt, handle, tmp_path / name)
    layers = _layers(handle)
    ops = _ops(graph)
    kernels = [n for n in graph.graph.node if n.op_type == "MatMulIntegerToFloat"]
    # an encoder's query, key and value run in one QAttention on their shared static grid
    fused = 3 * ops["QAttention"]
    assert ops["QAttention"] == (handle.model.config.num_hidden_layers if name == "bert" else 0)
    assert len(kernels) + fused == len(layers) - ABSENT[name]
    biased = {f"{n}.weight.codes" for n, m in layers.items() if m.bias is not None}
    assert all(n.domain == "com.microsoft" and len(n.input) == 6 + (n.input[1] in biased)
               for n in kernels)  # the bias is taken into the kernel
    # one activation grid for the layers reading one input (q, k, v; GPT-2 fuses them already)
    assert 0 < ops["QuantizeLinear"] < len(kernels) + fused or name == "gpt2"
    # no per-call quantization for a W8A8 layer: only GPT-2's head, tied to its int8 embedding
    # and so weight-only in torch, reads dynamically quantized activations by default
    assert ops["DynamicQuantizeLinear"] == ops["MatMulInteger"] == (1 if name == "gpt2" else 0)
    assert _float_copies(graph, handle) == set()
    module_name, module = next((n, m) for n, m in layers.items() if "attention.self" not in n)
    assert _initializer(graph, f"{module_name}.input_scale") == float(module.input_scale)
    assert _initializer(graph, f"{module_name}.input_zero_point") == int(module.input_zero_point)
    weight = quantized_weights(handle)[f"{module_name}.weight"]
    codes = weight.codes.numpy()
    assert (_initializer(graph, f"{module_name}.weight.codes")
            == (codes if name == "gpt2" else codes.T)).all()  # [K, N], the engine's codes
    errors = _errors(handle, reloaded)
    assert errors["hidden"] < 1e-5, errors  # the same static rounding in torch and the runtime
    assert errors.get("logits", 0) < (0.02 if name == "gpt2" else 1e-5), errors


def test_a_tied_head_may_multiply_float_activations(fmt, registries, model_dirs, tmp_path):
    handle = _w8a8(load_model(model_dirs["gpt2"], task="causal-lm"), registries)
    graph, reloaded = _save(fmt, handle, tmp_path / "gpt2", float_activations=["transformer.wte"])
    assert _ops(graph)["DynamicQuantizeLinear"] == 0
    assert max(_errors(handle, reloaded).values()) < 1e-5


def test_float_activations_leave_w8a8_layers_static(fmt, registries, model_dirs, tmp_path):
    """A W8A8 layer quantizes its input in torch: the graph does too, whatever the options."""
    handle = _w8a8(load_model(model_dirs["llama"], task="causal-lm"), registries)
    graph, reloaded = _save(fmt, handle, tmp_path / "float", activations="float",
                            float_activations=["model.layers.*"])
    assert _ops(graph)["MatMulIntegerToFloat"] == len(_layers(handle))
    assert max(_errors(handle, reloaded).values()) < 1e-5


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_llama_style_families(fmt, registries, tmp_path, family):
    handle = _w8a8(build_family_handle(family), registries)
    graph, reloaded = _save(fmt, handle, tmp_path / family)
    tied = not isinstance(handle.model.lm_head, W8A8Linear)  # int8 codes of the embedding
    assert _ops(graph)["DynamicQuantizeLinear"] == int(tied)
    assert _ops(graph)["MatMulIntegerToFloat"] == len(_layers(handle))
    assert _float_copies(graph, handle) == set()
    errors = _errors(handle, reloaded)
    assert errors["hidden"] < 1e-4 and errors["logits"] < (0.02 if tied else 1e-4), errors


def test_a_saved_w8a8_model_exports_alike(fmt, registries, model_dirs, tmp_path):
    """Loaded back from the squeeze format, the layers carry their grids into the graph."""
    from squeezelang.models.save import save_model

    handle = _w8a8(load_model(model_dirs["bert"]), registries)
    save_model(handle, tmp_path / "squeeze")
    back = load_model(tmp_path / "squeeze", registries)
    first, _ = _save(fmt, handle, tmp_path / "a")
    second, reloaded = _save(fmt, back, tmp_path / "b")
    assert first.graph.node == second.graph.node
    assert max(_errors(handle, reloaded).values()) < 1e-5


def test_squeeze_check_accepts_w8a8_for_onnx(tmp_path, tiny_bert_dir, sentences_file):
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(f'''recipe "w8a8-onnx"
model = hf("{tiny_bert_dir}", task = "embedding")
data calib = text("{sentences_file}")
stage q: quantize {{ scheme = "w8a8", data = calib }}
output "out" {{ format = "onnx" }}
''')
    squeezelang.check(recipe)  # raises on a refusal


def test_per_tensor_weight_scales(fmt, registries, model_dirs, tmp_path):
    handle = _w8a8(load_model(model_dirs["bert"]), registries, granularity="tensor")
    graph, reloaded = _save(fmt, handle, tmp_path / "tensor")
    kernels = [n for n in graph.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert kernels and all(len(n.input) == 7 for n in kernels)
    assert _initializer(graph, kernels[0].input[3]).shape == ()  # one weight scale
    assert max(_errors(handle, reloaded).values()) < 1e-5


@pytest.mark.slow
@pytest.mark.shared
def test_minilm_w8a8_keeps_int8_dynamic_quality(fmt, registries, minilm_dir, shared_data,
                                               tmp_path):
    """all-MiniLM-L6-v2 on ONNX Runtime, calibrated on STS-B train: STS-B dev Spearman (the first
    400 pairs here; the whole dev set: float 86.72, int8-dynamic 86.63, w8a8 86.60)."""
    import csv

    from scipy.stats import spearmanr

    from squeezelang.hooks.context import Context, DataStore
    from squeezelang.plugin import encode

    with open(shared_data / "stsb-en-train.csv", encoding="utf-8") as f:
        train = list(csv.reader(f))[:64]
    with open(shared_data / "stsb-en-dev.csv", encoding="utf-8") as f:
        dev = list(csv.reader(f))[:400]
    data = DataStore()
    data.add("calib", [{"text": t} for row in train for t in row[:2]])
    tech = registries.techniques.get("quantize")
    scores = {}
    for scheme in ("int8-dynamic", "w8a8"):
        handle = load_model(minilm_dir)
        params = {"scheme": scheme, **({"data": "calib"} if scheme == "w8a8" else {})}
        tech.apply_(handle, {**tech.defaults_for(params), **params},
                    Context(data=data, quiet=True))
        _, reloaded = _save(fmt, handle, tmp_path / scheme)
        a, b = encode(reloaded, [r[0] for r in dev]), encode(reloaded, [r[1] for r in dev])
        cosine = torch.nn.functional.cosine_similarity(a, b).numpy()
        scores[scheme] = 100 * spearmanr(cosine, [float(r[2]) for r in dev]).correlation
        if scheme == "w8a8":
            # the runtime's own LayerNorm, GELU and softmax move a few inputs across a rounding
            # boundary: one step of a per-tensor grid, the same distance to float either way
            mine = encode(handle, [r[0] for r in dev[:32]])
            assert float(torch.nn.functional.cosine_similarity(mine, a[:32]).mean()) > 0.999
    assert abs(scores["w8a8"] - scores["int8-dynamic"]) < 0.5, scores


def test_an_encoders_attention_quantizes_its_input_on_the_static_grid(fmt, registries, model_dirs,
                                                                      tmp_path):
    handle = _w8a8(load_model(model_dirs["bert"]), registries)
    graph, reloaded = _save(fmt, handle, tmp_path / "fused")
    producers = {out: n for n in graph.graph.node for out in n.output}
    nodes = [n for n in graph.graph.node if n.op_type == "QAttention"]
    assert len(nodes) == handle.model.config.num_hidden_layers
    for index, node in enumerate(nodes):
        query = handle.model.encoder.layer[index].attention.self.query
        assert producers[node.input[0]].op_type == "QuantizeLinear"  # not per call
        assert _initializer(graph, node.input[3]) == float(query.input_scale)
        assert _initializer(graph, node.input[6]) == int(query.input_zero_point)
    plain, _ = _save(fmt, handle, tmp_path / "plain", fuse_attention=False)
    assert _ops(plain)["QAttention"] == 0
    assert max(_errors(handle, reloaded).values()) < 1e-5
