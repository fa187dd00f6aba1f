"""``lm_eval``: a task of EleutherAI's lm-evaluation-harness as a metric, run on a declared data set.

``metric mc = lm_eval(items, task = "multiple_choice", output = "acc_norm")`` scores the model the
way ``lm_eval --model hf`` does (the harness's own requests, tokenisation conventions, metrics and
aggregation; ``lm_eval_model.HarnessLM`` answers its requests with the model being compressed), so
``drop(mc) <= 1.0`` is checked with a number users already quote. The documents are always the
rows of the data set named as first argument; nothing is fetched:

- ``task = "multiple_choice"``: columns ``context``, ``choices`` (a list, or ``choices = [col, …]``
  naming one column per choice) and ``answer`` (the index of the right choice, or its text);
  outputs ``acc`` (default) and ``acc_norm`` (log-likelihood per character of the choice);
- ``task = "loglikelihood"``: columns ``context`` and ``continuation`` (scored after the context
  and ``target_delimiter``, a space by default, as choices are); outputs ``acc`` (default: the
  continuation is the greedy one) and ``perplexity`` (exp of minus the mean log-likelihood of a
  continuation);
- ``task = "loglikelihood_rolling"``: column ``text``; outputs ``word_perplexity`` (default),
  ``byte_perplexity`` and ``bits_per_byte`` of each whole text, read in windows of the model's
  context (not ``perplexity``'s token perplexity: the harness divides by words or bytes);
- any other name is a task of the harness's own catalogue (``arc_easy``, ``hellaswag``, ``piqa``,
  ``lambada_openai``, ``wikitext`` …): its prompt, choices, target, few-shot format and metrics,
  applied to the data set's rows, which hold the fields of that task's documents (a local copy of
  its split). Its download is replaced by the rows; its ``output`` defaults to ``acc``.

Accuracies (``acc``, ``acc_norm``, ``acc_mutual_info``, ``exact_match``, ``f1``, ``mcc``) are
reported x 100, like ``accuracy``; perplexities and bits per byte as the harness gives them, lower
being better. The harness is the optional ``lm-eval`` extra: ``squeeze check`` names it when it is
missing, and this module imports it only while measuring.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import ExecutionError, installed
from squeezelang_plugins.metrics.columns import renames
from squeezelang_plugins.metrics.quality import MAX_ROWS, DataMetric

if TYPE_CHECKING:
    from squeezelang.plugin import MeasureContext, ModelHandle

#: The tasks built from the data set's columns: columns spec, outputs (the first is the default).
OWN_TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "multiple_choice": ("context,choices,answer", ("acc", "acc_norm")),
    "loglikelihood": ("context,continuation", ("acc", "perplexity")),
    "loglikelihood_rolling": ("text", ("word_perplexity", "byte_perplexity", "bits_per_byte")),
}
#: Column roles of the tasks above; an argument of the same name renames one.
ROLES = ("context", "choices", "answer", "continuation", "text")
#: Harness metrics in [0, 1], reported x 100.
PERCENT = frozenset({"acc", "acc_norm", "acc_bytes", "acc_mutual_info", "exact_match", "f1", "mcc"})
#: Harness metrics for which lower is better.
LOWER_IS_BETTER = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte",
                             "brier_score"})
INSTALL = "pip install 'squeezelang[lm-eval]'"


def _rename(role: str) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "description": f"the column read as '{role}'"}


def own_task(args: dict[str, Any]) -> tuple[str, tuple[str, ...]] | None:
    """The columns and outputs of ``args``' task when it is one of lm_eval's own, else ``None``
    (read defensively: ``squeeze check`` also asks with arguments the schema refused)."""
    task = args.get("task")
    return OWN_TASKS.get(task) if isinstance(task, str) else None


def output_of(args: dict[str, Any]) -> str:
    """The harness metric that is the value: ``output``, else the task's default."""
    own = own_task(args)
    output = args.get("output")
    return output if isinstance(output, str) and output else (own[1][0] if own else "acc")


class LmEval(DataMetric):
    name = "lm_eval"
    packages = ("lm-eval",)  # a task's prompt and scoring come from the harness
    description = ("an lm-evaluation-harness task on the data set: multiple_choice, loglikelihood, "
                   "loglikelihood_rolling, or a harness task's name; accuracies x 100, perplexities "
                   "(lower is better) as the harness gives them (the 'lm-eval' extra)")
    tasks = ("causal-lm",)
    #: Those of ``task = "multiple_choice"``; ``columns_for`` gives each task's.
    columns = OWN_TASKS["multiple_choice"][0]
    schema = {
        "type": "object",
        "properties": {
            "task": {"type": "string", "minLength": 1,
                     "description": "multiple_choice, loglikelihood or loglikelihood_rolling over "
                                    "the data set's columns, or the name of a harness task whose "
                                    "documents the data set holds (arc_easy, hellaswag …)"},
            "output": {"type": "string", "minLength": 1,
                       "description": "the harness metric that is the value (acc, acc_norm, "
                                      "word_perplexity …; default acc, word_perplexity for "
                                      "loglikelihood_rolling)"},
            "num_fewshot": {"type": "integer", "minimum": 0,
                            "description": "examples put before each document, drawn from the "
                                           "other rows (default: the task's own, else 0)"},
            "target_delimiter": {"type": "string",
                                 "description": "between the context and a choice or "
                                                "continuation (default: the task's, else ' ')"},
            "context": _rename("context"), "answer": _rename("answer"),
            "continuation": _rename("continuation"), "text": _rename("text"),
            "choices": {"anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 2,
                 "uniqueItems": True}],
                "description": "the column holding the list of choices, or one column per choice"},
            "batch_size": {"type": "integer", "minimum": 1, "default": 8},
            "max_length": {"type": "integer", "minimum": 2,
                           "description": "tokens per window (default: the model's context)"},
            "max_rows": {"type": "integer", "minimum": 1, "default": MAX_ROWS,
                         "description": "evaluate at most this many documents, the data set's "
                                        "first ones; the report says when it cut the data"},
        },
        "required": ["task"],
        "additionalProperties": False,
    }

    def check(self, args: dict[str, Any]) -> list[tuple[str | None, str]]:
        problems: list[tuple[str | None, str]] = []
        if not installed("lm_eval"):
            problems.append((None, "metric 'lm_eval' needs the 'lm-eval' extra (lm-evaluation-"
                                   f"harness is not installed): {INSTALL}"))
        task = args.get("task", "")
        own = own_task(args)
        roles = [role for role in ROLES if role in args]
        if own is None:
            problems += [(role, f"'{role}' renames a column of lm_eval's own tasks; harness task "
                                f"'{task}' reads the fields its prompt names") for role in roles]
            return problems
        spec, outputs = own
        if args.get("output", outputs[0]) not in outputs:
            problems.append(("output", f"lm_eval task '{task}' reports {', '.join(outputs)}, "
                                       f"not '{args['output']}'"))
        problems += [(role, f"lm_eval task '{task}' reads no '{role}' column (it reads "
                            f"{spec.replace(',', ', ')})") for role in roles
                     if role not in spec.split(",")]
        if task == "loglikelihood_rolling" and args.get("num_fewshot"):
            problems.append(("num_fewshot", "loglikelihood_rolling scores each text on its own; "
                                            "it takes no few-shot examples"))
        return problems

    def columns_for(self, args: dict[str, Any]) -> str:
        own = own_task(args)
        if own is None:  # a harness task reads the fields its own templates name
            return ""
        listed = args.get("choices")
        if isinstance(listed, list) and all(isinstance(c, str) for c in listed):
            return own[0].replace("choices", ",".join(listed))
        return own[0]

    def higher_is_better_for(self, args: dict[str, Any]) -> bool:
        return output_of(args) not in LOWER_IS_BETTER

    def measure(self, handle: ModelHandle, ctx: MeasureContext, data: str | None,
                args: dict[str, Any]) -> float:
        self.check_task(handle)
        for _, message in self.check(args):
            raise ExecutionError(message)
        task, output = args["task"], output_of(args)
        rows = self.rows(ctx, data, args)
        docs = self.documents(ctx, data, args, rows) if task in OWN_TASKS else rows
        from squeezelang_plugins.metrics.contained import contained

        with contained("lm_eval", "lm-eval", quiet=ctx.quiet):
            from squeezelang_plugins.metrics import lm_eval_tasks

            value, higher = lm_eval_tasks.evaluate_task(handle, docs, args, output, ctx)
        if higher is not None and higher != self.higher_is_better_for(args):
            raise ExecutionError(f"metric 'lm_eval': the harness says {'higher' if higher else 'lower'}"
                                 f" '{output}' is better, which squeezelang did not expect; its "
                                 "constraints would be judged the wrong way round")
        return 100.0 * value if output in PERCENT else value

    # -- the documents of the own tasks ----------------------------------------------------------
    def documents(self, ctx: MeasureContext, data: str, args: dict[str, Any],
                  rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows as the own tasks' documents (``context``/``choices``/``answer`` …), checked."""
        task = args["task"]
        if task == "loglikelihood_rolling":
            text = self.column(ctx, data, args, "text")
            return [{"text": str(r[text])} for r in rows]
        context = self.column(ctx, data, args, "context")
        if task == "loglikelihood":
            continuation = self.column(ctx, data, args, "continuation")
            return [{"context": str(r[context]), "continuation": str(r[continuation])} for r in rows]
        answer = self.column(ctx, data, args, "answer")
        listed = args.get("choices") if isinstance(args.get("choices"), list) else None
        columns = [self.column_named(ctx, data, c) for c in listed] if listed else None
        single = None if listed else self.column(ctx, data, args, "choices")
        docs = []
        for i, row in enumerate(rows, start=1):
            choices = [row[c] for c in columns] if columns else row[single]
            if not isinstance(choices, list) or len(choices) < 2:
                raise ExecutionError(
                    f"metric 'lm_eval': data set '{data}' row {i}: column '{single}' holds "
                    f"{choices!r}, not a list of at least two choices (in a CSV file, name one "
                    "column per choice: choices = [\"A\", \"B\", …])")
            choices = [str(c) for c in choices]
            docs.append({"context": str(row[context]), "choices": choices,
                         "answer": _answer(row[answer], choices, data, i, answer)})
        return docs

    def column(self, ctx: MeasureContext, data: str, args: dict[str, Any], role: str) -> str:
        return self.column_named(ctx, data, renames(args, ROLES).get(role, role))

    def column_named(self, ctx: MeasureContext, data: str, name: str) -> str:
        rows = ctx.data.rows(data)
        if name not in rows[0]:
            raise ExecutionError(f"metric 'lm_eval': data set '{data}' has no column '{name}' "
                                 f"(it has {', '.join(rows[0])})")
        return name


def _answer(value: Any, choices: list[str], data: str, row: int, column: str) -> int:
    """The index of the right choice: ``value`` is an index (a number, or digits) or a choice."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        index = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value) and value.strip() not in choices:
        index = int(value)
    elif isinstance(value, str) and value in choices:
        return choices.index(value)
    else:
        raise ExecutionError(f"metric 'lm_eval': data set '{data}' row {row}: column '{column}' "
                             f"holds {value!r}, neither a choice's index nor one of its choices")
    if not 0 <= index < len(choices):
        raise ExecutionError(f"metric 'lm_eval': data set '{data}' row {row}: answer {index} is "
                             f"out of range for {len(choices)} choices (answers count from 0)")
    return index
