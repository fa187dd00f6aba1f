"""``mteb``: MTEB's STS evaluator as a metric, on the STS-B dev pairs, offline.

Its ``cosine_spearman`` must be ``spearman``'s figure (the same embeddings, MTEB's correlation),
within 0.01; its other scores are checked against scipy on the same cosine similarities.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from conftest import SENTENCES
from squeezelang.errors import ExecutionError
from squeezelang.hooks.context import Context, DataStore
from squeezelang.models import hf
from squeezelang.models.handle import ModelHandle
from squeezelang_plugins.metrics import Mteb, Spearman, required_columns

NEEDS_MTEB = "the mteb extra is not installed (pip install 'squeezelang[mteb]')"


@pytest.fixture(scope="module")
def mteb_lib():
    return pytest.importorskip("mteb", reason=NEEDS_MTEB)


@pytest.fixture(scope="module")
def bert(tiny_bert_dir) -> ModelHandle:
    return ModelHandle(hf.load_pretrained(tiny_bert_dir, "embedding"),
                       hf.load_tokenizer(tiny_bert_dir), "embedding", source_dir=tiny_bert_dir)


def context(**data) -> Context:
    store = DataStore()
    for name, rows in data.items():
        store.add(name, rows)
    return Context(data=store, quiet=True)


def stsb_rows(shared_data: Path, limit: int | None = None) -> list[dict]:
    from squeezelang_plugins.data import CsvSource

    args = {"path": str(shared_data / "stsb-en-dev.csv"), "columns": ["a", "b", "score"]}
    return CsvSource().load({**args, "limit": limit} if limit else args)


PAIRS = [{"s1": SENTENCES[i], "s2": SENTENCES[(i * 5 + 3) % len(SENTENCES)], "gold": i % 6}
         for i in range(len(SENTENCES))]
#: Every pair of ``SENTENCES``, scored by the words they share.
OVERLAPS = [{"s1": a, "s2": b, "gold": len(set(a.split()) & set(b.split()))}
            for i, a in enumerate(SENTENCES) for b in SENTENCES[i + 1:]]


def told_apart(rows: list[dict], handle: ModelHandle) -> list[dict]:
    """The pairs whose sentences the tiny BERT's vocabulary tells apart. Its vocabulary makes most
    words of STS-B ``[UNK]``: a pair of equal token sequences has cosine 1 up to rounding, and
    MTEB's cosine (via a distance) and ``spearman``'s (``cosine_similarity``) round such ties apart
    differently, a rank change no model would show."""
    ids = lambda text: handle.tokenizer(text)["input_ids"]  # noqa: E731
    return [r for r in rows if ids(r["a"]) != ids(r["b"])]


def test_definition(registries):
    metric = registries.metrics.get("mteb")
    assert isinstance(metric, Mteb) and metric.needs_data and metric.higher_is_better
    assert required_columns(metric, {"a": "s1", "b": "s2", "score": "gold"}) == [["s1", "s2", "gold"]]


def test_squeeze_check_says_what_to_install_when_mteb_is_missing(tmp_path, tiny_bert_dir,
                                                                 monkeypatch, capsys):
    from squeezelang.cli import main

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("a,b,score\nx y,x z,1\nu v,u w,3\n", encoding="utf-8")
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(f'model = hf("{tiny_bert_dir}", task = "embedding")\n'
                      f'data sts = csv("{pairs}")\n'
                      'metric y = mteb(sts, task = "sts")\n', encoding="utf-8")
    monkeypatch.setitem(sys.modules, "mteb", None)  # `import mteb` fails, as when absent
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "r.squeeze:3:" in err and "metric 'mteb' needs the 'mteb' extra" in err
    assert "pip install 'squeezelang[mteb]'" in err
    with pytest.raises(ExecutionError, match=r"pip install 'squeezelang\[mteb\]'"):
        Mteb().measure(None, context(sts=PAIRS), "sts", {})
    monkeypatch.delitem(sys.modules, "mteb")
    if not Mteb().check({}):  # installed: the same recipe is fine
        assert main(["check", str(recipe)]) == 0


def test_scores_on_renamed_columns_and_outputs_against_scipy(bert, mteb_lib):
    from squeezelang.plugin import encode

    args = {"a": "s1", "b": "s2", "score": "gold"}
    ctx = context(sts=PAIRS)
    first = encode(bert, [r["s1"] for r in PAIRS]).double()
    second = encode(bert, [r["s2"] for r in PAIRS]).double()
    cosine = torch.nn.functional.cosine_similarity(first, second, dim=1).numpy()
    gold = [r["gold"] for r in PAIRS]
    value = Mteb().measure(bert, ctx, "sts", args)
    assert value == pytest.approx(100 * spearmanr(cosine, gold).statistic, abs=1e-6)
    assert value == pytest.approx(Spearman().measure(bert, ctx, "sts", args), abs=1e-6)
    pearson = Mteb().measure(bert, ctx, "sts", {**args, "output": "cosine_pearson"})
    assert pearson == pytest.approx(100 * pearsonr(cosine, gold).statistic, abs=1e-4)
    euclid = Mteb().measure(bert, ctx, "sts", {**args, "output": "euclidean_spearman"})
    distance = -(first - second).norm(dim=1).numpy()
    assert euclid == pytest.approx(100 * spearmanr(distance, gold).statistic, abs=1e-6)


def test_measuring_leaves_the_random_generators_alone(bert, mteb_lib):
    import random

    torch.manual_seed(7)
    random.seed(7)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(7)
    random.seed(7)
    Mteb().measure(bert, context(sts=PAIRS), "sts", {"a": "s1", "b": "s2", "score": "gold"})
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_an_mteb_task_by_name_reads_the_data_set(bert, mteb_lib, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = {"a": "s1", "b": "s2", "score": "gold"}
    ctx = context(sts=PAIRS)
    assert Mteb().measure(bert, ctx, "sts", {**args, "task": "STSBenchmark"}) == \
        pytest.approx(Mteb().measure(bert, ctx, "sts", args))
    with pytest.raises(ExecutionError, match="'Banking77Classification' is an MTEB Classification "
                                             "task; the metric runs text STS tasks"):
        Mteb().measure(bert, ctx, "sts", {**args, "task": "Banking77Classification"})
    with pytest.raises(ExecutionError, match="MTEB has no task 'STSBenchmarc'"):
        Mteb().measure(bert, ctx, "sts", {**args, "task": "STSBenchmarc"})


def test_bad_scores_name_the_row(bert, mteb_lib):
    rows = [{"a": "x", "b": "y", "score": "1"}, {"a": "x", "b": "z", "score": "high"}]
    with pytest.raises(ExecutionError, match="data set 'sts' row 2: column 'score' holds 'high'"):
        Mteb().measure(bert, context(sts=rows), "sts", {})
    same = [{"a": "x", "b": "y", "score": "1"}, {"a": "x", "b": "z", "score": "1"}]
    with pytest.raises(ExecutionError, match="at least two different values"):
        Mteb().measure(bert, context(sts=same), "sts", {})


@pytest.mark.shared
def test_reproduces_spearman_on_stsb_dev_with_a_tiny_bert(bert, shared_data, mteb_lib):
    rows = told_apart(stsb_rows(shared_data, limit=400), bert)
    assert len(rows) > 200
    ctx = context(sts=rows)
    assert Mteb().measure(bert, ctx, "sts", {}) == \
        pytest.approx(Spearman().measure(bert, ctx, "sts", {}), abs=0.01)


@pytest.mark.slow
@pytest.mark.shared
def test_reproduces_spearman_on_stsb_dev_with_minilm(minilm_dir, shared_data, mteb_lib):
    from squeezelang_plugins.sources import HfSource

    handle = HfSource().load({"path": str(minilm_dir)})
    ctx = context(sts=stsb_rows(shared_data))
    value = Mteb().measure(handle, ctx, "sts", {"task": "STSBenchmark"})
    assert value == pytest.approx(Spearman().measure(handle, ctx, "sts", {}), abs=0.01)
    assert value == pytest.approx(86.72, abs=0.05)  # the published figure (shared/data/README.md)


def test_a_recipe_checks_a_drop_constraint_on_mteb(tmp_path, tiny_bert_dir, mteb_lib):
    import squeezelang

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in OVERLAPS), encoding="utf-8")
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(f'''recipe "mteb"
model = hf("{tiny_bert_dir}", task = "embedding")
data sts = jsonl("{pairs}")
metric y = mteb(sts, task = "sts", a = "s1", b = "s2", score = "gold")
metric ours = spearman(sts, a = "s1", b = "s2", score = "gold")
stage p: prune {{ ratio = 0.5 }}
constraints {{
    drop(y) <= 1.0
}}
output "out" {{ format = "squeeze" }}
''', encoding="utf-8")
    result = squeezelang.run(recipe, output=tmp_path / "out")
    metrics = result.report["metrics"]
    for when in ("original", "final"):
        assert metrics["y"][when] == pytest.approx(metrics["ours"][when], abs=1e-6)
    assert metrics["y"]["final"] != metrics["y"]["original"]  # pruning changes the embeddings
    (verdict,) = result.report["constraints"]
    assert verdict["constraint"] == "drop(y) <= 1.0"
    assert verdict["value"] == pytest.approx(metrics["y"]["original"] - metrics["y"]["final"])
    assert verdict["met"] == (verdict["value"] <= 1.0) == result.ok
