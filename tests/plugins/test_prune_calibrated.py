"""``prune`` methods ``wanda`` and ``sparsegpt``: calibrated unstructured and N:M pruning, saved
exactly like ``magnitude`` and ``nm`` (same codecs, same bytes, the same estimate), reloaded
faithfully, and less damaging than magnitude at equal size."""
from __future__ import annotations

import csv
import re
import sys

import pytest
import torch

import squeezelang
from squeezelang.errors import RecipeErrors, SqueezeError
from squeezelang.hooks.context import Context
from squeezelang.models.forward import encode
from squeezelang.models.load import load_model
from squeezelang.models.meta import measured_overhead, meta_from_model
from squeezelang.models.save import save_model
from squeezelang.models.select import kind_of
from squeezelang.models.size import artifact_bytes

from conftest import SENTENCES, build_tiny_llama

METHODS = ("wanda", "sparsegpt")
#: pattern -> (the calibrated methods' parameters, the uncalibrated method of the same size)
PATTERNS = {
    "50%": ({"ratio": 0.5}, {"method": "magnitude", "ratio": 0.5}),
    "2:4": ({"n": 2, "m": 4}, {"method": "nm", "n": 2, "m": 4}),
}
CALIB = {"data": "calib", "samples": 16}
#: Texts the calibration never saw (the words of the tiny BERT's vocabulary).
HELD_OUT = ["the dog sleeps under the old tree", "a woman reads a new book in the city",
            "people play music near the river", "the red car is fast and the blue car is slow",
            "a small bird sings on the house", "the man swims in the water with a dog",
            "hello world this is a good song", "the lazy cat eats fish"]
FAMILIES = ("tiny_bert_dir", "tiny_gpt2_dir", "tiny_llama_dir")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _ctx(texts=SENTENCES) -> Context:
    ctx = Context(quiet=True)
    ctx.data.add("calib", [{"text": t} for t in texts])
    return ctx


def _out(handle, texts=HELD_OUT):
    """The model's first output (hidden states or logits) at every non-padding token of ``texts``."""
    with torch.no_grad():
        enc = handle.tokenizer(texts, return_tensors="pt", padding=True)
        return handle.model(**enc)[0][enc["attention_mask"].bool()]


def _stage(src, registries, out_dir, **params):
    """One prune stage on ``src``: (handle, estimated size, saved size, reloaded handle)."""
    handle = load_model(src)
    tech = registries.techniques.get("prune")
    params = {**tech.defaults_for(params), **params}
    assert tech.check(params) == []
    meta = meta_from_model(handle.model, handle.task, handle.codecs, handle.states)
    meta.overhead_bytes = measured_overhead(meta, src)
    estimate = tech.estimate(meta, params)
    tech.apply_(handle, params, _ctx())
    save_model(handle, out_dir)
    return handle, estimate.size_bytes(), artifact_bytes(out_dir), load_model(out_dir, registries)


def _rows(module) -> torch.Tensor:
    """The weight as ``[out, in]`` (GPT-2's ``Conv1D`` stores ``[in, out]``)."""
    w = module.weight.detach()
    return w.t() if kind_of(module) == "Conv1D" else w


@pytest.fixture(scope="module")
def baselines(tmp_path_factory, registries):
    """(family fixture, pattern) -> magnitude's or nm's (handle, estimate, saved size), made once."""
    made = {}

    def get(request, fixture, pattern):
        if (fixture, pattern) not in made:
            out = tmp_path_factory.mktemp("baseline")
            made[fixture, pattern] = _stage(request.getfixturevalue(fixture), registries, out,
                                            **PATTERNS[pattern][1])[:3]
        return made[fixture, pattern]
    return get


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fixture", FAMILIES)
def test_stage_prunes_exactly_and_saves_like_magnitude(request, fixture, method, pattern,
                                                       registries, baselines, tmp_path):
    src = request.getfixturevalue(fixture)
    original = _out(load_model(src))
    row = {"compare": "row"} if method == "wanda" and pattern == "50%" else {}
    handle, estimate, real, back = _stage(src, registries, tmp_path / "out", method=method,
                                          **PATTERNS[pattern][0], **row, **CALIB)
    base, base_estimate, base_real = baselines(request, fixture, pattern)
    assert handle.states == {"sparse"}
    # the same codecs on the same weights, so the same file size and the same prediction
    assert handle.codecs == base.codecs and handle.codecs
    assert (estimate, real) == (base_estimate, base_real)
    assert abs(estimate - real) / real < 0.01
    assert real < artifact_bytes(src)
    for key in handle.codecs:
        module = handle.model.get_submodule(key.removesuffix(".weight"))
        w = _rows(module)
        if pattern == "2:4":
            assert int((w.reshape(-1, 4) != 0).sum(1).max()) <= 2
            assert int((w == 0).sum()) == w.numel() // 2
        else:
            assert int((w == 0).sum()) == round(0.5 * w.numel()), key
            if method == "wanda":  # compared within each output row: each row loses half
                assert ((w == 0).sum(1) == w.shape[1] // 2).all(), key
    after = _out(handle)
    assert not torch.equal(after, original)
    assert not torch.equal(after, _out(base))
    # the other weights are untouched; wanda keeps the kept weights, sparsegpt updates them
    original_state = load_model(src).model.state_dict()
    for name, tensor in handle.model.state_dict().items():
        if name not in handle.codecs:
            assert torch.equal(tensor, original_state[name]), name
        elif method == "wanda":
            kept = tensor != 0
            assert torch.equal(tensor[kept], original_state[name][kept]), name
        else:
            kept = tensor != 0
            assert not torch.equal(tensor[kept], original_state[name][kept]), name
    assert torch.equal(_out(back), after)
    assert back.codecs == handle.codecs
    enc = handle.tokenizer(HELD_OUT[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        public = squeezelang.load(tmp_path / "out")(**enc)[0]
        assert torch.equal(public, handle.model(**enc)[0])


RECIPE = '''
model = hf("{model}", task = "{task}")
data calib = text("{calib}")
metric faithful = fidelity(calib)
stage sparse: prune {{ method = "{method}", {pattern}, data = calib, samples = 16 }}
constraints {{ size <= 95% }}
'''
RUNS = [("tiny_bert_dir", "embedding", "wanda", "ratio = 50%"),
        ("tiny_gpt2_dir", "causal-lm", "wanda", "n = 2, m = 4"),
        ("tiny_llama_dir", "causal-lm", "sparsegpt", "ratio = 50%"),
        ("tiny_bert_dir", "embedding", "sparsegpt", "n = 2, m = 4")]


@pytest.mark.parametrize("fixture, task, method, pattern", RUNS)
def test_recipe_runs_end_to_end(request, fixture, task, method, pattern, sentences_file,
                                registries, tmp_path):
    src = request.getfixturevalue(fixture)
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(RECIPE.format(model=src, task=task, calib=sentences_file, method=method,
                                    pattern=pattern))
    planned = squeezelang.plan(recipe)
    result = squeezelang.run(recipe, output=tmp_path / "out")
    assert result.ok, result.report["constraints"]
    saved = result.report["metrics"]["size"]["final"]
    assert saved == artifact_bytes(tmp_path / "out")
    assert abs(planned.prediction.final_size - saved) / saved < 0.01
    assert 0.5 < result.report["metrics"]["faithful"]["final"] < 1
    log = " ".join(result.report["stages"][0]["log"])
    assert f"prune {method} (" in log and "calibrated on 16 texts" in log
    # the artifact holds what the stage computes in memory on the same calibration texts
    params = dict(p.split(" = ") for p in pattern.split(", "))
    params = {k: 0.5 if v == "50%" else int(v) for k, v in params.items()}
    handle, _, _, _ = _stage(src, registries, tmp_path / "stage", method=method, **params, **CALIB)
    enc = handle.tokenizer(HELD_OUT, return_tensors="pt", padding=True)
    with torch.no_grad():
        reloaded = squeezelang.load(tmp_path / "out")(**enc)[0]
        assert torch.allclose(reloaded, handle.model(**enc)[0], atol=1e-5)


@pytest.mark.parametrize("stage, message", [
    ('prune { method = "wanda" }', "prune method 'wanda' needs calibration data"),
    ('prune { method = "sparsegpt", ratio = 40% }', "prune method 'sparsegpt' needs calibration data"),
    ('prune { method = "sparsegpt", data = calib, n = 2, ratio = 50% }',
     "takes either ratio (unstructured) or n and m"),
    ('prune { method = "wanda", data = calib, n = 4, m = 4 }', "n (4) must be smaller than m (4)"),
    ('prune { method = "wanda", data = calib, m = 65 }', "m"),
    ('prune { method = "wanda", data = calib, m = 8, compare = "layer" }',
     "'compare' applies to unstructured pruning (ratio) only"),
    ('prune { method = "sparsegpt", data = calib, compare = "layer" }',
     "'compare' does not apply to prune method 'sparsegpt'"),
    ('prune { method = "wanda", data = calib, scope = "global" }',
     "'scope' does not apply to prune method 'wanda'"),
])
def test_check_time_errors(stage, message, tiny_bert_dir, sentences_file):
    recipe = (f'model = hf("{tiny_bert_dir}", task = "embedding")\n'
              f'data calib = text("{sentences_file}")\nstage s: {stage}\n')
    with pytest.raises(RecipeErrors) as info:
        squeezelang.check(recipe)
    assert any(message in str(e) for e in info.value.errors), [str(e) for e in info.value.errors]


def test_parameters_follow_the_pattern(registries, tiny_bert_dir):
    tech = registries.techniques.get("prune")
    def resolved(params):
        return {**tech.defaults_for(params), **params}

    assert resolved({"method": "wanda"}) == {"method": "wanda", "ratio": 0.5, "compare": "auto",
                                             "samples": 256, "include": ["*.[0-9]*"], "exclude": []}
    assert resolved({"method": "sparsegpt", "m": 8}) == {"method": "sparsegpt", "n": 2, "m": 8,
                                                         "samples": 256, "include": ["*.[0-9]*"],
                                                         "exclude": []}
    assert tech.stores_for({"method": "sparsegpt", "ratio": 0.3}) == {"sparse"}
    assert tech.stores_for({"method": "wanda", "n": 2, "m": 4}) == {"n:m"}
    assert tech.stores_for({"method": "nm"}) == {"n:m"}
    with pytest.raises(SqueezeError, match="needs calibration data"):
        tech.apply_(load_model(tiny_bert_dir), resolved({"method": "wanda"}), _ctx())
    with pytest.raises(SqueezeError, match="divisible by m=64"):
        tech.apply_(load_model(tiny_bert_dir), {"method": "sparsegpt", "n": 2, "m": 64, **CALIB,
                                                "include": ["*.attention.output.dense"]}, _ctx())


def test_wanda_can_compare_over_the_whole_layer(tiny_llama_dir, registries, tmp_path):
    handle, estimate, real, _ = _stage(tiny_llama_dir, registries, tmp_path / "out", method="wanda",
                                       ratio=0.5, compare="layer", **CALIB)
    _, row_estimate, row_real, _ = _stage(tiny_llama_dir, registries, tmp_path / "row",
                                          method="wanda", ratio=0.5, compare="row", **CALIB)
    assert (estimate, real) == (row_estimate, row_real)
    uneven = 0
    for key in handle.codecs:
        w = handle.model.get_parameter(key)
        assert int((w == 0).sum()) == w.numel() // 2
        uneven += int(((w == 0).sum(1) != w.shape[1] // 2).sum())
    assert uneven > 0  # some rows lose more than half, others less


def _wanda_case(w, x):
    """Wanda's masks of ``w`` (half removed) on inputs ``x``: compare -> (keep-mask, the exact mean
    squared output change per token, measured on ``x``), and what "auto" tallied."""
    from collections import Counter
    from types import SimpleNamespace

    from squeezelang_plugins.prune.wanda import keep_mask

    stats = SimpleNamespace(sq_mean=x.pow(2).mean(0).double(), gram=(x.t() @ x).double() / len(x))
    tally = Counter()
    out = {}
    for compare in ("row", "layer", "auto"):
        mask = keep_mask(w, stats, w.numel() // 2, compare, tally if compare == "auto" else None)
        out[compare] = mask, float((x @ (w * ~mask).t()).pow(2).sum(1).mean())
    return out, tally


# inputs 0 and 1 are the same channel, 2 and 3 independent: H = [[1, 1, 0, 0], [1, 1, 0, 0], I]
TWIN_INPUTS = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]) * 3 ** 0.5


@pytest.mark.parametrize("w, best", [
    # the layer-wise mask drops three weights of the first row and -2 of the second; the row-wise one
    # drops 1 and 1 of the first row (error (1 + 1)²) and -2 and 2 of the second, which cancel on
    # the twin inputs: "row" has the lower output error although its scores are higher
    ([[1.0, 1.0, 1.5, 9.0], [-2.0, 2.0, 8.0, 9.0]], "row"),
    # one row of tiny weights: "layer" drops it all, "row" must drop half of the large row
    ([[0.1, 0.1, 0.1, 0.1], [5.0, 6.0, 7.0, 8.0]], "layer"),
])
def test_wanda_auto_keeps_the_mask_with_the_lower_output_error(w, best):
    out, tally = _wanda_case(torch.tensor(w), TWIN_INPUTS)
    assert not torch.equal(out["row"][0], out["layer"][0])
    other = "layer" if best == "row" else "row"
    assert out[best][1] < out[other][1] - 1.0, out
    assert torch.equal(out["auto"][0], out[best][0]) and tally == {f'compare = "{best}"': 1}
    assert out["auto"][1] <= min(out["row"][1], out["layer"][1])
    assert int((~out["auto"][0]).sum()) == 4


def test_wanda_auto_on_a_random_layer_is_never_worse_than_either():
    from squeezelang_plugins.prune.wanda import output_error

    for seed in range(4):
        w, x = _layer_problem(seed=seed)
        w[: len(w) // 2] *= 4  # rows of unequal scale, so the two masks differ
        out, _ = _wanda_case(w, x)
        assert not torch.equal(out["row"][0], out["layer"][0])
        assert out["auto"][1] <= min(out["row"][1], out["layer"][1]) * (1 + 1e-5), out
        # the chunked trace is the error measured on the inputs themselves
        gram = (x.t() @ x).double() / len(x)
        removed = w * ~out["row"][0]
        assert output_error(removed, gram, chunk=3 * w.shape[1]) == pytest.approx(out["row"][1],
                                                                               rel=1e-4)


def test_wanda_defaults_to_auto_and_logs_its_choices(registries, tiny_llama_dir):
    tech = registries.techniques.get("prune")
    assert tech.defaults_for({"method": "wanda"})["compare"] == "auto"
    assert set(tech.schema["properties"]["compare"]["enum"]) == {"auto", "row", "layer"}
    handle = load_model(tiny_llama_dir)
    ctx = _ctx()
    ctx.stage = "s"
    tech.apply_(handle, {**tech.defaults_for({"method": "wanda"}), **CALIB, "method": "wanda"}, ctx)
    log = ctx.logs["s"][-1]
    counts = re.findall(r'compare = "(row|layer)": (\d+) layer\(s\)', log)
    assert counts and sum(int(n) for _, n in counts) == len(handle.codecs), log
    for key in handle.codecs:
        w = handle.model.get_parameter(key)
        assert int((w == 0).sum()) == round(0.5 * w.numel()), key


def test_ratio_is_a_knob_the_plan_solves(tiny_bert_dir, sentences_file):
    planned = squeezelang.plan(
        f'model = hf("{tiny_bert_dir}", task = "embedding")\ndata calib = text("{sentences_file}")\n'
        'stage s: prune { method = "sparsegpt", data = calib, ratio = auto(0.2 .. 0.8) }\n'
        'constraints { size <= 80% }\n')
    assert {s.name: s.autos for s in planned.plan.stages} == {"s": {"ratio": (0.2, 0.8)}}


def test_wanda_is_a_composable_candidate_that_needs_data(registries):
    offered = {c.label: c for c in registries.techniques.get("prune").candidates("embedding")}
    wanda = offered["wanda"]
    assert wanda.params["method"] == "wanda" and wanda.autos == ("ratio",) and wanda.needs_data
    assert wanda.risk < offered["magnitude"].risk


def test_row_keep_mask_spreads_an_odd_count_exactly():
    from squeezelang_plugins.prune.wanda import row_keep_mask

    score = torch.tensor([[1.0, 5.0, 3.0], [2.0, 0.5, 9.0]])
    # one each (the lowest of each row), then the row whose next-lowest is lower loses one more
    assert row_keep_mask(score, 3).tolist() == [[False, True, True], [False, False, True]]
    assert row_keep_mask(score, 0).all() and not row_keep_mask(score, 6).any()


def _layer_problem(seed=0, rows=24, cols=64, tokens=512):
    """A layer whose inputs have a few outlier channels (as LLM activations do)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)
    x = torch.randn(tokens, cols, generator=g) @ mixing  # correlated inputs
    x[:, :4] *= 20
    return torch.randn(rows, cols, generator=g), x


def test_sparsegpt_reconstructs_a_layer_better_than_wanda_and_magnitude():
    from squeezelang_plugins.prune.magnitude import prune_mask
    from squeezelang_plugins.prune.sparsegpt import sparsegpt_prune
    from squeezelang_plugins.prune.wanda import row_keep_mask, wanda_score

    w, x = _layer_problem()
    half = w.numel() // 2
    pruned = {
        "magnitude": w * prune_mask([w.abs()], 0.5, "layer")[0],
        "wanda": w * row_keep_mask(wanda_score(w, x.pow(2).mean(0).double()), half),
        "sparsegpt": sparsegpt_prune(w, (x.t() @ x).double() / len(x), half, block=16),
    }
    error = {k: float((x @ (p - w).t()).pow(2).mean()) for k, p in pruned.items()}
    assert all(int((p == 0).sum()) == half for p in pruned.values())
    assert error["sparsegpt"] < 0.75 * error["wanda"] and error["wanda"] < 0.5 * error["magnitude"], error


def test_sparsegpt_keeps_earlier_zeros_and_n_m_runs():
    from squeezelang_plugins.prune.sparsegpt import sparsegpt_prune

    w, x = _layer_problem(seed=1)
    w[:, 5] = 0  # an earlier stage's zeros
    gram = (x.t() @ x).double() / len(x)
    out = sparsegpt_prune(w, gram, w.numel() // 2)
    assert (out[:, 5] == 0).all() and int((out == 0).sum()) == w.numel() // 2
    runs = sparsegpt_prune(w, gram, pattern=(2, 8), block=12)  # rounded to a multiple of m
    assert (runs[:, 5] == 0).all() and int((runs.reshape(-1, 8) != 0).sum(1).max()) <= 2


def _outlier_norms_(model) -> None:
    """Give every norm a log-normal gain per channel: some input channels of the linear layers
    become far larger than others, as in trained transformers (the case Wanda and SparseGPT are
    made for; a freshly initialised model's channels are all alike)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.exp(torch.randn(module.weight.shape, generator=g)))


@pytest.mark.parametrize("fixture", FAMILIES)
def test_calibrated_methods_damage_held_out_outputs_less_than_magnitude(request, fixture, registries):
    src = request.getfixturevalue(fixture)
    tech = registries.techniques.get("prune")
    reference = load_model(src)
    _outlier_norms_(reference.model)
    expected = _out(reference)
    error = {}
    for pattern, (calibrated, baseline) in PATTERNS.items():
        for method in ("magnitude", *METHODS):
            params = baseline if method == "magnitude" else {"method": method, **calibrated, **CALIB}
            handle = load_model(src)
            _outlier_norms_(handle.model)
            tech.apply_(handle, {**tech.defaults_for(params), **params}, _ctx())
            error[method, pattern] = float((_out(handle) - expected).pow(2).mean()
                                           / expected.pow(2).mean())
    print(f"{fixture}: relative MSE on held-out texts "
          + ", ".join(f"{m} {p} {e:.2e}" for (m, p), e in error.items()), file=sys.stderr)
    for pattern in PATTERNS:
        assert error["sparsegpt", pattern] < 0.5 * error["magnitude", pattern], error
    assert error["wanda", "50%"] < error["magnitude", "50%"], error
    if fixture != "tiny_bert_dir":  # the encoder's final LayerNorm evens out what wanda gains
        for pattern in PATTERNS:
            assert error["wanda", pattern] < 0.75 * error["magnitude", pattern], error


@pytest.mark.slow
@pytest.mark.shared
def test_minilm_stsb_wanda_and_sparsegpt_beat_magnitude(minilm_dir, shared_data, registries):
    """The acceptance setting: all-MiniLM-L6-v2 at 50% unstructured, no distillation, Spearman on
    the STS-B dev set; calibrated on 128 sentences of the train split."""
    from scipy.stats import spearmanr

    with open(shared_data / "stsb-en-dev.csv", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    with open(shared_data / "stsb-en-train.csv", encoding="utf-8") as f:
        calib = [row[0] for row in csv.reader(f)][:128]
    tech = registries.techniques.get("prune")

    def spearman(handle) -> float:
        a, b = encode(handle, [r[0] for r in rows]), encode(handle, [r[1] for r in rows])
        cosine = torch.nn.functional.cosine_similarity(a, b).numpy()
        return 100 * spearmanr(cosine, [float(r[2]) for r in rows]).statistic

    scores = {}
    for method in ("magnitude", *METHODS):
        params = {"method": method, "ratio": 0.5}
        if method != "magnitude":
            params.update(data="calib", samples=128)
        handle = load_model(minilm_dir)
        tech.apply_(handle, {**tech.defaults_for(params), **params}, _ctx(calib))
        scores[method] = spearman(handle)
    print("minilm 50% unstructured, STS-B dev Spearman: "
          + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()), file=sys.stderr)
    assert scores["wanda"] > scores["magnitude"] + 0.5
    assert scores["sparsegpt"] > scores["magnitude"] + 0.5
