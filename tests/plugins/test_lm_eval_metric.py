"""``lm_eval``: lm-evaluation-harness tasks as metrics, on tiny real models and local data.

The harness's figures are checked against independent computations from ``logits`` and
``perplexity`` on the same items, and against the harness's own ``hf`` model (``HFLM``) on the
same task: the metric scores what ``lm_eval --model hf`` would.
"""
from __future__ import annotations

import json
import math
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import SENTENCES, build_tiny_gpt2, build_tiny_llama
from squeezelang.errors import ExecutionError
from squeezelang.hooks.context import Context, DataStore
from squeezelang.models import hf
from squeezelang.models.handle import ModelHandle
from squeezelang_plugins.metrics import LmEval, Perplexity, required_columns

NEEDS_HARNESS = "the lm-eval extra is not installed (pip install 'squeezelang[lm-eval]')"


@pytest.fixture(scope="module")
def harness():
    return pytest.importorskip("lm_eval", reason=NEEDS_HARNESS)


def handle_of(directory: Path) -> ModelHandle:
    return ModelHandle(hf.load_pretrained(directory, "causal-lm"), hf.load_tokenizer(directory),
                       "causal-lm", source_dir=directory)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request, tmp_path_factory) -> ModelHandle:
    build = {"gpt2": build_tiny_gpt2, "llama": build_tiny_llama}[request.param]
    return handle_of(build(tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir) -> ModelHandle:
    return handle_of(tiny_gpt2_dir)


def context(**data) -> Context:
    store = DataStore()
    for name, rows in data.items():
        store.add(name, rows)
    return Context(data=store, quiet=True)


def choice_items(lines: list[str], n: int, seed: int = 0) -> list[dict]:
    """Next-line items: the line after ``lines[i]`` among three other lines, in random order."""
    rnd = random.Random(seed)
    items = []
    for i in range(n):
        others = rnd.sample([l for j, l in enumerate(lines) if j not in (i, i + 1)], 3)
        choices = others + [lines[i + 1]]
        rnd.shuffle(choices)
        items.append({"context": lines[i], "choices": choices, "answer": choices.index(lines[i + 1])})
    return items


#: Choice items from the shorter ``SENTENCES`` (no shared data needed): a context, a space and a
#: choice fit the tiny models' 64 positions, so no text is truncated.
SHORT = [s for s in SENTENCES if len(s) <= 31]
ITEMS = choice_items(SHORT, len(SHORT) - 1)


def shakespeare_lines(path: Path, limit: int = 400) -> list[str]:
    """Speech lines of 8-28 characters (a context and a choice fit the tiny models' 64 positions),
    each followed by the next line of its speech."""
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for line, after in zip(lines, lines[1:]):
        line, after = line.strip(), after.strip()
        if all(8 <= len(s) <= 28 and not s.endswith(":") for s in (line, after)):
            out += [line, after]
        if len(out) >= limit:
            break
    return out


def own_loglikelihoods(handle: ModelHandle, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """Summed log-probability of each continuation after its context, and whether it is greedy,
    from ``logits`` (one forward pass per text, the context's tokens not scored)."""
    from squeezelang.plugin import logits

    texts = [c + x for c, x in pairs]
    flat = torch.log_softmax(logits(handle, texts, batch_size=16, max_length=64).double(), -1)
    out, start = [], 0
    for (ctx, _), text in zip(pairs, texts):
        ids = handle.tokenizer(text)["input_ids"]
        first = len(handle.tokenizer(ctx)["input_ids"])
        rows = flat[start:start + len(ids)]
        start += len(ids)
        targets = torch.tensor(ids[first:])
        scores = rows[first - 1:len(ids) - 1]
        out.append((float(scores.gather(-1, targets[:, None]).sum()),
                    bool((scores.argmax(-1) == targets).all())))
    return out


def own_accuracies(handle: ModelHandle, items: list[dict]) -> tuple[float, float]:
    """acc and acc_norm (log-likelihood per character of the choice) x 100, computed here."""
    pairs = [(it["context"], " " + c) for it in items for c in it["choices"]]
    lls = [ll for ll, _ in own_loglikelihoods(handle, pairs)]
    acc = norm = 0
    for it in items:
        mine, lls = lls[:len(it["choices"])], lls[len(it["choices"]):]
        acc += max(range(len(mine)), key=lambda k: mine[k]) == it["answer"]
        per_char = [ll / len(c) for ll, c in zip(mine, it["choices"])]
        norm += max(range(len(mine)), key=lambda k: per_char[k]) == it["answer"]
    return 100.0 * acc / len(items), 100.0 * norm / len(items)


# -- definition and `squeeze check` ---------------------------------------------------------------

def test_definition_columns_and_direction(registries):
    metric = registries.metrics.get("lm_eval")
    assert isinstance(metric, LmEval) and metric.needs_data
    assert metric.higher_is_better_for({"task": "multiple_choice"})
    assert metric.higher_is_better_for({"task": "arc_easy", "output": "acc_norm"})
    assert not metric.higher_is_better_for({"task": "loglikelihood_rolling"})
    assert not metric.higher_is_better_for({"task": "wikitext", "output": "bits_per_byte"})
    assert required_columns(metric, {"task": "multiple_choice", "context": "question"}) == \
        [["question", "choices", "answer"]]
    assert required_columns(metric, {"task": "multiple_choice", "choices": ["A", "B", "C"]}) == \
        [["context", "A", "B", "C", "answer"]]
    assert required_columns(metric, {"task": "loglikelihood_rolling", "text": "line"}) == [["line"]]
    assert required_columns(metric, {"task": "hellaswag"}) == [[]]  # the task's own fields


@pytest.mark.parametrize("args, key, message", [
    ({"task": "multiple_choice", "output": "word_perplexity"}, "output",
     "reports acc, acc_norm, not 'word_perplexity'"),
    ({"task": "loglikelihood_rolling", "choices": "options"}, "choices", "reads no 'choices' column"),
    ({"task": "arc_easy", "context": "question"}, "context", "reads the fields its prompt names"),
    ({"task": "loglikelihood_rolling", "num_fewshot": 2}, "num_fewshot", "no few-shot examples"),
])
def test_check_refuses_arguments_that_do_not_go_together(args, key, message, harness):
    problems = LmEval().check(args)
    assert [k for k, _ in problems] == [key] and message in problems[0][1]


def _recipe(tmp_path: Path, model: Path, metrics: str, stages: str = "",
            constraints: str = "") -> Path:
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(it) + "\n" for it in ITEMS), encoding="utf-8")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(f'''recipe "harness"
model = hf("{model}", task = "causal-lm")
data items = jsonl("{items}")
data texts = text("{texts}")
{metrics}
{stages}
{constraints}
output "out" {{ format = "squeeze" }}
''', encoding="utf-8")
    return recipe


def test_squeeze_check_says_what_to_install_when_the_harness_is_missing(tmp_path, tiny_gpt2_dir,
                                                                        monkeypatch, capsys):
    from squeezelang.cli import main

    recipe = _recipe(tmp_path, tiny_gpt2_dir, 'metric mc = lm_eval(items, task = "multiple_choice")')
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` fails, as when absent
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "r.squeeze:5:" in err  # at the metric's statement
    assert "metric 'lm_eval' needs the 'lm-eval' extra" in err
    assert "pip install 'squeezelang[lm-eval]'" in err
    monkeypatch.delitem(sys.modules, "lm_eval")
    if LmEval().check({"task": "multiple_choice"}) == []:  # installed: the same recipe is fine
        assert main(["check", str(recipe)]) == 0


def test_squeeze_check_verifies_the_columns_of_the_task(tmp_path, tiny_gpt2_dir, capsys, harness):
    from squeezelang.cli import main

    recipe = _recipe(tmp_path, tiny_gpt2_dir,
                     'metric mc = lm_eval(items, task = "multiple_choice", context = "question")\n'
                     'metric lines = lm_eval(texts, task = "loglikelihood_rolling")\n'
                     'metric bad = lm_eval(texts, task = "loglikelihood_rolling", batch_size = 0)')
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "metric 'lm_eval' needs column 'question', which data set 'items' does not have" in err
    assert "r.squeeze:7:" in err and "batch_size" in err
    assert err.count(": error:") == 2  # texts has the text column the rolling task reads


# -- the harness's figures against independent computations ---------------------------------------

@pytest.mark.shared
def test_next_line_choice_on_tiny_shakespeare_equals_own_computation(lm, shared_data, harness):
    items = choice_items(shakespeare_lines(shared_data / "tinyshakespeare.txt"), 60)
    ctx = context(items=items)
    acc = LmEval().measure(lm, ctx, "items", {"task": "multiple_choice"})
    acc_norm = LmEval().measure(lm, ctx, "items", {"task": "multiple_choice", "output": "acc_norm"})
    assert (acc, acc_norm) == pytest.approx(own_accuracies(lm, items), abs=1e-9)
    assert 0 < acc < 100


def test_scores_equal_the_harness_own_hf_model(gpt2, harness):
    """Our model adapter against lm-eval's ``HFLM`` wrapping the same model, on the same tasks."""
    pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate (the test extra)")
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from squeezelang_plugins.metrics.lm_eval_tasks import build_task

    reference = HFLM(pretrained=gpt2.model, tokenizer=gpt2.tokenizer, batch_size=4, device="cpu")
    long_texts = [" ".join(SENTENCES[i:i + 4]) for i in range(0, 16, 4)]  # past the 64-token window
    cases = [("items", ITEMS, {"task": "multiple_choice"}, ("acc", "acc_norm")),
             ("texts", [{"text": t} for t in long_texts], {"task": "loglikelihood_rolling"},
              ("word_perplexity", "bits_per_byte"))]
    for data, rows, args, outputs in cases:
        task = build_task(rows, args, seed=0)
        name = task.config.task
        theirs = evaluate(lm=reference, task_dict={"tasks": {name: task}, "groups": {},
                                                   "group_map": {}},
                          bootstrap_iters=0, log_samples=False)["results"][name]
        for output in outputs:
            ours = LmEval().measure(gpt2, context(**{data: rows}), data, {**args, "output": output})
            scale = 100.0 if output.startswith("acc") else 1.0
            assert ours == pytest.approx(scale * theirs[f"{output},none"], rel=1e-5), output


def test_rolling_perplexity_against_the_perplexity_metric(gpt2, harness):
    """Texts inside the window: the harness and ``perplexity`` score the same tokens (each text
    after a BOS token), so the summed NLL agrees; the harness divides it by words or bytes."""
    texts = [{"text": s} for s in SENTENCES]
    ctx = context(texts=texts)
    ppl = Perplexity().measure(gpt2, ctx, "texts", {})
    tokens = sum(len(gpt2.tokenizer(s)["input_ids"]) for s in SENTENCES)
    nll = math.log(ppl) * tokens
    words = sum(len(re.split(r"\s+", s)) for s in SENTENCES)
    size = sum(len(s.encode("utf-8")) for s in SENTENCES)
    measure = lambda output: LmEval().measure(gpt2, ctx, "texts", {  # noqa: E731
        "task": "loglikelihood_rolling", "output": output})
    assert measure("word_perplexity") == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert measure("byte_perplexity") == pytest.approx(math.exp(nll / size), rel=1e-5)
    assert measure("bits_per_byte") == pytest.approx(nll / size / math.log(2), rel=1e-5)


def test_loglikelihood_task_equals_own_computation(gpt2, harness):
    rows = [{"context": s[:len(s) // 2].rstrip(), "continuation": s[len(s) // 2:].lstrip()}
            for s in SHORT]
    ctx = context(pairs=rows)
    # the continuation is scored after the target delimiter, a space
    own = own_loglikelihoods(gpt2, [(r["context"], " " + r["continuation"]) for r in rows])
    ppl = LmEval().measure(gpt2, ctx, "pairs", {"task": "loglikelihood", "output": "perplexity"})
    assert ppl == pytest.approx(math.exp(-sum(ll for ll, _ in own) / len(own)), rel=1e-6)
    acc = LmEval().measure(gpt2, ctx, "pairs", {"task": "loglikelihood"})
    assert acc == pytest.approx(100.0 * sum(g for _, g in own) / len(own))


# -- harness tasks by name, on local rows ---------------------------------------------------------

def test_a_harness_task_runs_on_local_rows_of_its_documents(gpt2, harness, monkeypatch):
    """``arc_easy``'s prompt on ARC-shaped rows equals ``multiple_choice`` on the same prompt."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    labels = ["A", "B", "C", "D"]
    arc = [{"id": str(i), "question": it["context"],
            "choices": {"text": it["choices"], "label": labels},
            "answerKey": labels[it["answer"]]} for i, it in enumerate(ITEMS)]
    same = [{**it, "context": f"Question: {it['context']}\nAnswer:"} for it in ITEMS]
    ctx = context(arc=arc, same=same)
    for output in ("acc", "acc_norm"):
        by_name = LmEval().measure(gpt2, ctx, "arc", {"task": "arc_easy", "output": output})
        own = LmEval().measure(gpt2, ctx, "same", {"task": "multiple_choice", "output": output})
        assert by_name == pytest.approx(own)


@pytest.mark.parametrize("task", ["multiple_choice", "arc_easy"])
def test_few_shot_examples_are_other_rows(task, harness):
    from squeezelang_plugins.metrics.lm_eval_tasks import build_task

    labels = ["A", "B", "C", "D"]
    docs = ITEMS if task == "multiple_choice" else [
        {"id": str(i), "question": it["context"], "choices": {"text": it["choices"], "label": labels},
         "answerKey": labels[it["answer"]]} for i, it in enumerate(ITEMS)]
    prompt = (lambda it: it["context"]) if task == "multiple_choice" else \
        (lambda it: f"Question: {it['context']}\nAnswer:")
    solved = {prompt(it) + " " + it["choices"][it["answer"]]: i for i, it in enumerate(ITEMS)}
    built = build_task(docs, {"task": task, "num_fewshot": 2}, seed=0)
    built.build_all_requests()
    for instance in built.instances[::4]:  # one request per choice: the first of each document
        *shots, question = instance.args[0].split("\n\n")
        own = [i for i, it in enumerate(ITEMS) if prompt(it) == question]
        assert len(shots) == 2 and own
        assert all(shot in solved and solved[shot] not in own for shot in shots)


@pytest.mark.parametrize("task, message", [
    ("arc_eazy", "has no task 'arc_eazy' (did you mean arc_easy"),
    ("gsm8k", "generates text"),
    ("mmlu", "'mmlu' is a harness group of several tasks"),
    ("scrolls_govreport", "is a Python class, not a configured task"),
])
def test_harness_tasks_it_cannot_run_are_named(gpt2, harness, task, message):
    with pytest.raises(ExecutionError, match=re.escape(message)):
        LmEval().measure(gpt2, context(items=ITEMS), "items", {"task": task})


def test_rows_that_are_not_the_task_documents_are_named(gpt2, harness):
    with pytest.raises(ExecutionError, match="task 'arc_easy' cannot read the data set's rows"):
        LmEval().measure(gpt2, context(items=ITEMS), "items", {"task": "arc_easy"})


# -- the documents of the own tasks ---------------------------------------------------------------

def test_answers_as_index_digits_or_text_and_choices_as_columns():
    rows = [{"q": "a b", "A": "x", "B": "y", "C": "z", "gold": "2"},
            {"q": "c d", "A": "x", "B": "y", "C": "z", "gold": "y"},
            {"q": "e f", "A": "x", "B": "y", "C": "z", "gold": 0}]
    args = {"task": "multiple_choice", "context": "q", "choices": ["A", "B", "C"], "answer": "gold"}
    docs = LmEval().documents(context(d=rows), "d", args, rows)
    assert [d["answer"] for d in docs] == [2, 1, 0]
    assert docs[0] == {"context": "a b", "choices": ["x", "y", "z"], "answer": 2}


@pytest.mark.parametrize("row, message", [
    ({"context": "c", "choices": ["x", "y"], "answer": 2}, "row 2: answer 2 is out of range"),
    ({"context": "c", "choices": ["x", "y"], "answer": "w"},
     "row 2: column 'answer' holds 'w', neither a choice's index nor one of its choices"),
    ({"context": "c", "choices": "x|y", "answer": 0}, "row 2: column 'choices' holds 'x|y', not a list"),
])
def test_bad_documents_name_the_data_set_and_row(row, message):
    rows = [{"context": "c", "choices": ["x", "y"], "answer": 1}, row]
    with pytest.raises(ExecutionError, match=re.escape(f"data set 'd' {message}")):
        LmEval().documents(context(d=rows), "d", {"task": "multiple_choice"}, rows)


# -- in a recipe ----------------------------------------------------------------------------------

def test_a_recipe_checks_drop_constraints_on_harness_metrics(tmp_path, tiny_gpt2_dir, harness):
    import squeezelang

    recipe = _recipe(
        tmp_path, tiny_gpt2_dir,
        'metric mc = lm_eval(items, task = "multiple_choice", output = "acc_norm")\n'
        'metric bpb = lm_eval(texts, task = "loglikelihood_rolling", output = "bits_per_byte")',
        stages='stage q: quantize { scheme = "int8" }',
        constraints="constraints {\n    drop(mc) <= 1.0\n    drop(bpb) <= 5%\n}")
    result = squeezelang.run(recipe, output=tmp_path / "out")
    metrics = result.report["metrics"]
    assert metrics["mc"]["higher_is_better"] and not metrics["bpb"]["higher_is_better"]
    handle = handle_of(tiny_gpt2_dir)
    assert metrics["mc"]["original"] == pytest.approx(own_accuracies(handle, ITEMS)[1])
    assert metrics["bpb"]["final"] != metrics["bpb"]["original"]  # int8 changes the model
    verdicts = {c["metric"]: c for c in result.report["constraints"]}
    assert set(verdicts) == {"mc", "bpb"}
    mc, bpb = metrics["mc"], metrics["bpb"]
    assert verdicts["mc"]["met"] == (mc["original"] - mc["final"] <= 1.0)
    assert verdicts["bpb"]["met"] == (bpb["final"] - bpb["original"] <= 0.05 * bpb["original"])
    assert result.ok == all(v["met"] for v in verdicts.values())
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "drop(mc)" in report and "drop(bpb)" in report
