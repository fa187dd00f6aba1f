"""Build an lm-evaluation-harness task over a data set's rows and run it (imports ``lm_eval``).

Imported by ``lm_eval.LmEval.measure`` only, inside ``contained`` (offline, generators kept). A task
is the harness's ``ConfigurableTask``: lm_eval's own tasks are configured here from the documents'
fields, a harness task from its YAML in the installed harness; either way its ``custom_dataset`` is
the rows (as the single ``test`` split, few-shot examples drawn from the other rows), so the
harness's download never runs.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import datasets
from lm_eval.api.task import ConfigurableTask
from lm_eval.evaluator import evaluate

from squeezelang.plugin import ExecutionError
from squeezelang_plugins.metrics.lm_eval import OWN_TASKS
from squeezelang_plugins.metrics.lm_eval_model import HarnessLM

if TYPE_CHECKING:
    from squeezelang.plugin import MeasureContext, ModelHandle

SPLIT = "test"

def own_config(name: str, delimiter: str) -> dict[str, Any]:
    """How lm_eval's own task ``name`` reads its documents (``LmEval.documents`` makes them so).

    A ``loglikelihood`` continuation follows its context after ``delimiter``, as a choice does (the
    harness puts ``target_delimiter`` before choices only; its own templates add the space)."""
    configs: dict[str, dict[str, Any]] = {
        "multiple_choice": {"output_type": "multiple_choice", "doc_to_text": lambda d: d["context"],
                            "doc_to_choice": lambda d: d["choices"],
                            "doc_to_target": lambda d: d["answer"]},
        "loglikelihood": {"output_type": "loglikelihood", "doc_to_text": lambda d: d["context"],
                          "doc_to_target": lambda d: delimiter + d["continuation"]},
        "loglikelihood_rolling": {"output_type": "loglikelihood_rolling",
                                  "doc_to_text": lambda d: "", "doc_to_target": lambda d: d["text"]},
    }
    return {"task": f"squeeze_{name}", "metadata": {"version": 1.0}, "target_delimiter": delimiter,
            **configs[name]}


def evaluate_task(handle: ModelHandle, docs: list[dict[str, Any]], args: dict[str, Any],
                  output: str, ctx: MeasureContext) -> tuple[float, bool | None]:
    """The harness's value of ``output`` on ``docs``, and whether it calls higher better."""
    task = build_task(docs, args, ctx.seed)
    name = task.config.task
    lm = HarnessLM(handle, batch_size=int(args.get("batch_size", 8)),
                   max_length=args.get("max_length"), progress=ctx.progress)
    results = evaluate(lm=lm, task_dict={"tasks": {name: task}, "groups": {}, "group_map": {}},
                       bootstrap_iters=0, log_samples=False)
    scores = (results or {}).get("results", {}).get(name, {})
    found = {key.split(",")[0]: value for key, value in scores.items()
             if "," in key and "_stderr" not in key}
    if output not in found:
        raise ExecutionError(f"metric 'lm_eval': task '{args['task']}' reports "
                             f"{', '.join(sorted(found)) or 'nothing'}, not '{output}' (output = …)")
    return float(found[output]), task.higher_is_better().get(output)


def build_task(docs: list[dict[str, Any]], args: dict[str, Any], seed: int) -> ConfigurableTask:
    """The harness task named by ``args['task']``, its documents ``docs``."""
    name = args["task"]
    if name in OWN_TASKS:
        config = own_config(name, args.get("target_delimiter", " "))
    else:
        config = harness_config(name)
        if "target_delimiter" in args:
            config["target_delimiter"] = args["target_delimiter"]
    shots = int(args.get("num_fewshot", config.get("num_fewshot") or 0))
    fixed = isinstance(config.get("fewshot_config"), dict) and "samples" in config["fewshot_config"]
    try:
        rows = datasets.Dataset.from_list(docs)
    except Exception as exc:  # Arrow refuses rows whose fields change type
        raise ExecutionError(f"metric 'lm_eval': the documents do not form a table: "
                             f"{type(exc).__name__}: {exc}") from None
    config.update(custom_dataset=lambda **_: datasets.DatasetDict({SPLIT: rows}),
                  test_split=SPLIT, validation_split=None, training_split=None,
                  fewshot_split=SPLIT if shots and not fixed else None)
    try:
        task = ConfigurableTask(config=config)
    except Exception as exc:  # the harness tries its templates on the first row: any error
        raise ExecutionError(f"metric 'lm_eval': task '{name}' cannot read the data set's rows "
                             f"({type(exc).__name__}: {exc}); they must hold the fields of its "
                             "documents") from None
    task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(seed=seed)
    return task


def harness_config(name: str) -> dict[str, Any]:
    """The configuration of the harness's task ``name``, read from its YAML (functions resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = _task_index().get(name)
    if entry is None:
        import difflib

        close = difflib.get_close_matches(name, list(_task_index()), n=3)
        raise ExecutionError(f"metric 'lm_eval': the installed lm-evaluation-harness has no task "
                             f"'{name}'" + (f" (did you mean {', '.join(close)}?)" if close else "")
                             + "; lm_eval's own tasks are " + ", ".join(OWN_TASKS))
    if entry.kind.name in ("GROUP", "TAG"):
        raise ExecutionError(f"metric 'lm_eval': '{name}' is a harness {entry.kind.name.lower()} "
                             "of several tasks, not one task; name one of its tasks")
    if entry.kind.name != "TASK" or entry.yaml_path is None:
        raise ExecutionError(f"metric 'lm_eval': harness task '{name}' is a Python class, not a "
                             "configured task; the metric runs configured (YAML) tasks")
    config = load_yaml(entry.yaml_path, resolve_func=True)
    for key in ("tag", "group", "task_list"):
        config.pop(key, None)
    if config.get("output_type") == "generate_until":
        raise ExecutionError(f"metric 'lm_eval': task '{name}' generates text (generate_until); "
                             "the metric runs multiple-choice and log-likelihood tasks")
    if any(isinstance(m, dict) and m.get("hf_evaluate") for m in config.get("metric_list") or ()):
        raise ExecutionError(f"metric 'lm_eval': task '{name}' loads a metric from the Hugging "
                             "Face hub (hf_evaluate), which an offline run cannot do")
    return config


@functools.lru_cache(maxsize=1)
def _task_index() -> dict[str, Any]:
    """The installed harness's task catalogue (name -> entry), read once (a few seconds)."""
    from lm_eval.tasks import TaskManager

    return dict(TaskManager().task_index)
