"""``mteb``: an MTEB STS task as a metric of a sentence encoder, run on a declared data set.

``metric sts_mteb = mteb(sts, task = "sts")`` hands the data set's pairs (columns ``a``, ``b``,
``score``, renamed as for ``spearman``) to MTEB's STS evaluator with the model being compressed as
its encoder (the embeddings ``spearman`` reads: the attention-masked mean of the token states), so
its ``cosine_spearman`` is ``spearman``'s figure computed by MTEB. ``task`` is ``"sts"`` (a task of
the data set alone) or the name of one of MTEB's STS tasks (``STSBenchmark``, ``SICK-R`` …), whose
own metadata then labels the run while the pairs still come from the data set: MTEB's download
never runs. ``output`` picks one of MTEB's STS scores (``cosine_spearman``, its main score, by
default), reported x 100 like ``spearman``. MTEB is the optional ``mteb`` extra: ``squeeze check``
names it when it is missing, and this module imports it only while measuring.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from squeezelang.plugin import ExecutionError, installed
from squeezelang_plugins.metrics.quality import MAX_ROWS, DataMetric, _number

if TYPE_CHECKING:
    from squeezelang.plugin import MeasureContext, ModelHandle

#: MTEB's STS scores (correlations), its main score first.
OUTPUTS = ("cosine_spearman", "cosine_pearson", "spearman", "pearson", "manhattan_spearman",
           "manhattan_pearson", "euclidean_spearman", "euclidean_pearson")
INSTALL = "pip install 'squeezelang[mteb]'"


def _rename(role: str) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "description": f"the column read as '{role}'"}


class Mteb(DataMetric):
    name = "mteb"
    packages = ("mteb",)
    description = ("an MTEB STS task on the data set's pairs (a, b, score) with the model's mean-"
                   "pooled embeddings; a correlation x 100, cosine_spearman by default (the 'mteb' "
                   "extra)")
    columns = "a,b,score"
    schema = {
        "type": "object",
        "properties": {
            "task": {"type": "string", "minLength": 1, "default": "sts",
                     "description": "\"sts\", or the name of one of MTEB's STS tasks "
                                    "(STSBenchmark, SICK-R …) evaluated on the data set's pairs"},
            "output": {"enum": list(OUTPUTS), "default": OUTPUTS[0],
                       "description": "the MTEB score that is the value"},
            "a": _rename("a"), "b": _rename("b"), "score": _rename("score"),
            "max_length": {"type": "integer", "minimum": 2, "default": 128,
                           "description": "tokens per text; longer texts are truncated"},
            "batch_size": {"type": "integer", "minimum": 1, "default": 32},
            "max_rows": {"type": "integer", "minimum": 1, "default": MAX_ROWS,
                         "description": "evaluate at most this many rows, the data set's first "
                                        "ones; the report says when it cut the data"},
        },
        "additionalProperties": False,
    }

    def check(self, args: dict[str, Any]) -> list[tuple[str | None, str]]:
        if installed("mteb"):
            return []
        return [(None, f"metric 'mteb' needs the 'mteb' extra (MTEB is not installed): {INSTALL}")]

    def measure(self, handle: ModelHandle, ctx: MeasureContext, data: str | None,
                args: dict[str, Any]) -> float:
        for _, message in self.check(args):
            raise ExecutionError(message)
        a, b, score = (self.column(ctx, data, args, role) for role in ("a", "b", "score"))
        rows = self.rows(ctx, data, args)
        gold = [_number(r[score], self.name, data, i, score) for i, r in enumerate(rows, start=1)]
        if len(set(gold)) < 2:
            raise ExecutionError(f"metric 'mteb': data set '{data}' needs at least two different "
                                 f"values in column '{score}'")
        from squeezelang_plugins.metrics.contained import contained

        with contained("mteb", quiet=ctx.quiet):
            from squeezelang_plugins.metrics.mteb_tasks import sts_scores

            scores = sts_scores(handle, [str(r[a]) for r in rows], [str(r[b]) for r in rows], gold,
                                task=args.get("task", "sts"),
                                batch_size=int(args.get("batch_size", 32)),
                                max_length=int(args.get("max_length", 128)))
        value = scores[args.get("output", OUTPUTS[0])]
        if value != value:  # NaN: every pair got the same similarity, no ranking at all
            ctx.log("mteb: the model gives every pair the same similarity")
            return 0.0
        return 100.0 * value
