"""Metrics of what the model computes, read from a data set: perplexity, accuracy, f1, ece,
spearman and fidelity."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from squeezelang.plugin import ExecutionError, Metric
from squeezelang_plugins.metrics.columns import renames

if TYPE_CHECKING:
    import torch

    from squeezelang.plugin import MeasureContext, ModelHandle


def _rename(role: str) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "description": f"the column read as '{role}'"}


_MAX_LENGTH = {"type": "integer", "minimum": 2, "default": 128,
               "description": "tokens per text; longer texts are truncated"}
_BATCH = {"type": "integer", "minimum": 1, "default": 32}
#: Rows a row metric evaluates at most (the data set's first ones), unless its ``max_rows`` says.
MAX_ROWS = 10_000
_MAX_ROWS = {"type": "integer", "minimum": 1, "default": MAX_ROWS,
             "description": "evaluate at most this many rows, the data set's first ones; the "
                            "report says when it cut the data"}
#: Tokens ``perplexity`` scores at most (in text order), unless its ``max_tokens`` says.
MAX_TOKENS = 262_144


class DataMetric(Metric):
    """A metric read from a data set; ``tasks`` lists the model tasks it applies to (all if empty)."""

    needs_data = True
    tasks: ClassVar[tuple[str, ...]] = ()

    def check_task(self, handle: ModelHandle) -> None:
        if self.tasks and handle.task not in self.tasks:
            raise ExecutionError(f"metric '{self.name}' needs a {' or '.join(self.tasks)} model; "
                                 f"this model's task is '{handle.task}'")

    def rows(self, ctx: MeasureContext, data: str, args: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows evaluated: the first ``max_rows`` (logged, for the report, when that cuts)."""
        rows = ctx.data.rows(data)
        limit = int(args.get("max_rows", MAX_ROWS))
        if len(rows) > limit:
            ctx.log(f"evaluated the first {limit:,} of the {len(rows):,} rows of data set "
                    f"'{data}' (max_rows = {limit})")
            return list(rows[:limit])
        return list(rows)

    def column(self, ctx: MeasureContext, data: str, args: dict[str, Any], role: str) -> str:
        """The name of the column read as ``role``, checked to exist."""
        name = renames(args).get(role, role)
        rows = ctx.data.rows(data)
        if name not in rows[0]:
            raise ExecutionError(f"metric '{self.name}': data set '{data}' has no column '{name}' "
                                 f"(it has {', '.join(rows[0])})")
        return name

    def texts(self, ctx: MeasureContext, data: str,
              args: dict[str, Any]) -> tuple[list[str], list[str] | None]:
        """Per row evaluated: the ``text`` column, or the ``a`` and ``b`` columns as a pair."""
        rows = self.rows(ctx, data, args)
        text = renames(args).get("text", "text")
        if text in rows[0]:
            return [str(r[text]) for r in rows], None
        a, b = (self.column(ctx, data, args, role) for role in ("a", "b"))
        return [str(r[a]) for r in rows], [str(r[b]) for r in rows]


def _number(value: Any, metric: str, data: str, row: int, column: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ExecutionError(f"metric '{metric}': data set '{data}' row {row}: column '{column}' "
                             f"holds {value!r}, not a number") from None


# -- language modelling -----------------------------------------------------------------------

class Perplexity(DataMetric):
    name = "perplexity"
    description = "exp of the token-weighted mean negative log-likelihood of a causal LM"
    higher_is_better = False
    columns = "text|a,b"
    tasks = ("causal-lm",)
    schema = {
        "type": "object",
        "properties": {
            "text": _rename("text"), "a": _rename("a"), "b": _rename("b"),
            "max_length": {"type": "integer", "minimum": 2,
                           "description": "tokens per window (default: the model's context)"},
            "stride": {"type": "integer", "minimum": 1,
                       "description": "tokens a window advances (default: half a window)"},
            "batch_size": {"type": "integer", "minimum": 1, "default": 4},
            "max_tokens": {"type": "integer", "minimum": 1, "default": MAX_TOKENS,
                           "description": "score at most this many tokens, in text order; the "
                                          "report says when it cut the data"},
        },
        "additionalProperties": False,
    }

    def measure(self, handle: ModelHandle, ctx: MeasureContext, data: str | None,
                args: dict[str, Any]) -> float:
        import math

        from squeezelang.plugin import lm_loss_counted

        self.check_task(handle)
        texts = ctx.data.texts(data, renames(args))
        limit = int(args.get("max_tokens", MAX_TOKENS))
        result = lm_loss_counted(handle, texts, max_length=args.get("max_length"),
                                 stride=args.get("stride"), batch_size=args.get("batch_size", 4),
                                 max_tokens=limit)
        if result.available > result.scored:
            ctx.log(f"scored the first {result.scored:,} of the {result.available:,} tokens of "
                    f"data set '{data}' (max_tokens = {limit})")
        return math.exp(min(result.loss, 700.0))  # exp overflows a float past ~709


# -- classification ---------------------------------------------------------------------------

_CLASSIFY_SCHEMA = {
    "type": "object",
    "properties": {"text": _rename("text"), "a": _rename("a"), "b": _rename("b"),
                   "label": _rename("label"), "max_length": _MAX_LENGTH, "batch_size": _BATCH,
                   "max_rows": _MAX_ROWS},
    "additionalProperties": False,
}


class ClassificationMetric(DataMetric):
    columns = "text|a,b;label"
    tasks = ("classification",)
    schema = _CLASSIFY_SCHEMA

    def predict(self, handle: ModelHandle, ctx: MeasureContext, data: str,
                args: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The class probabilities for every row, and the gold class ids."""
        import torch

        from squeezelang.plugin import logits

        self.check_task(handle)
        label = self.column(ctx, data, args, "label")
        config = handle.model.config
        num_labels = int(config.num_labels)
        label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
        gold = []
        for i, row in enumerate(self.rows(ctx, data, args), start=1):
            value = row[label]
            if isinstance(value, str) and value.strip() in label2id:
                gold.append(label2id[value.strip()])
                continue
            try:
                number = float(value)
                if not number.is_integer():
                    raise ValueError
                class_id = int(number)
            except (TypeError, ValueError):
                raise ExecutionError(
                    f"metric '{self.name}': data set '{data}' row {i}: label {value!r} is neither "
                    f"a class number nor one of the model's labels ({', '.join(label2id)})") from None
            if not 0 <= class_id < num_labels:
                raise ExecutionError(f"metric '{self.name}': data set '{data}' row {i}: label "
                                     f"{class_id} is out of range for {num_labels} classes")
            gold.append(class_id)
        first, second = self.texts(ctx, data, args)
        out = logits(handle, first, pair=second, batch_size=args.get("batch_size", 32),
                     max_length=args.get("max_length", 128))
        return torch.softmax(out.double(), dim=-1), torch.tensor(gold)


class Accuracy(ClassificationMetric):
    name = "accuracy"
    description = "percentage of rows whose predicted class is the gold label (0-100)"

    def measure(self, handle: ModelHandle, ctx: MeasureContext, data: str | None,
                args: dict[str, Any]) -> float:
        probs, gold = self.predict(handle, ctx, data, args)
        return 100.0 * float((probs.argmax(-1) == gold).double().mean())


class F1(ClassificationMetric):
    name = "f1"
    description = ("macro F1 over the classes that occur as gold or predicted labels, as a "
                   "percentage (0-100)")

    def measure(self, handle: ModelHandle, ctx: MeasureContext, data: str | None,
                args: dict[str, Any]) -> float:
        probs, gold = self.predict(handle, ctx, data, args)
        pred = probs.argmax(-1)
        scores = []
        for c in sorted(set(gold.tolist()) | set(pred.tolist())):
            tp = int(((pred == c) & (gold == c)).sum())
            fp = int(((pred == c) & (gold != c)).sum())
            fn = int(((pred != c) & (gold == c)).sum())
            scores.append(2 * tp / (2 * tp + fp + fn))
        return 100.0 * sum(scores) / len(scores)


class Ece(ClassificationMetric):
    name = "ece"
    description = ("expected calibration error of the top-class confidence, 15 equal-width bins, "
                   "as a percentage (0-100)")
    higher_is_better = False
    bins = 15

    def measure(self, handle: ModelHandle, ctx: MeasureContext, data: str | None,
                args: dict[str, Any]) -> float:
        import torch

        probs, gold = self.predict(handle, ctx, data, args)
        confidence, pred = probs.max(-1)
        correct = (pred == gold).double()
        # bin i holds confidences in (i/15, (i+1)/15]
        index = torch.clamp(torch.ceil(confidence * self.bins).long() - 1, 0, self.bins - 1)
        error = 0.0
        for b in range(self.bins):
            member = index == b
            if member.any():
                error += float(member.double().mean()
                               * (correct[member].mean() - confidence[member].mean()).abs())
        return 100.0 * error


# -- embeddings and fidelity ------------------------------------------------------------------

class Spearman(DataMetric):
    name = "spearman"
    description = ("Spearman rank correlation x 100 between the cosine similarity of the "
                   "embeddings of a and b and the gold score")
    columns = "a,b,score"
    schema = {
        "type": "object",
        "properties": {"a": _rename("a"), "b": _rename("b"), "score": _rename("score"),
                       "max_length": _MAX_LENGTH, "batch_size": _BATCH, "max_rows": _MAX_ROWS},
        "additionalProperties": False,
    }

    def measure(self, handle: ModelHandle, ctx: MeasureContext, data: str | None,
                args: dict[str, Any]) -> float:
        import math

        import torch
        from scipy.stats import spearmanr

        from squeezelang.plugin import encode

        a, b, score = (self.column(ctx, data, args, role) for role in ("a", "b", "score"))
        rows = self.rows(ctx, data, args)
        gold = [_number(r[score], self.name, data, i, score) for i, r in enumerate(rows, start=1)]
        if len(set(gold)) < 2:
            raise ExecutionError(f"metric 'spearman': data set '{data}' needs at least two "
                                 f"different values in column '{score}'")
        options = {"batch_size": args.get("batch_size", 32), "max_length": args.get("max_length", 128)}
        first = encode(handle, [str(r[a]) for r in rows], **options)
        second = encode(handle, [str(r[b]) for r in rows], **options)
        cosine = torch.nn.functional.cosine_similarity(first.double(), second.double(), dim=1)
        rho = spearmanr(cosine.numpy(), gold).statistic
        if math.isnan(rho):  # every pair got the same similarity: no ranking at all
            ctx.log("spearman: the model gives every pair the same similarity")
            return 0.0
        return 100.0 * float(rho)


class Fidelity(DataMetric):
    name = "fidelity"
    description = ("mean cosine similarity (0-1) between this model's outputs and the original "
                   "model's on the data's texts: pooled embeddings, or logits")
    columns = "text|a,b"
    schema = {
        "type": "object",
        "properties": {"text": _rename("text"), "a": _rename("a"), "b": _rename("b"),
                       "max_length": _MAX_LENGTH, "batch_size": _BATCH, "max_rows": _MAX_ROWS},
        "additionalProperties": False,
    }

    def measure(self, handle: ModelHandle, ctx: MeasureContext, data: str | None,
                args: dict[str, Any]) -> float:
        import torch

        from squeezelang.plugin import outputs_for_fidelity

        original = ctx.original()
        if handle is original or handle.model is original.model:
            return 1.0
        names = renames(args)
        limit = int(args.get("max_rows", MAX_ROWS))
        texts = ctx.data.texts(data, names)
        if len(texts) > limit:
            ctx.log(f"evaluated the first {limit:,} of the {len(texts):,} texts of data set "
                    f"'{data}' (max_rows = {limit})")
            texts = texts[:limit]
        options = {"batch_size": args.get("batch_size", 32), "max_length": args.get("max_length", 128)}
        key = ("fidelity", data, tuple(sorted(names.items())), options["max_length"], limit)
        if key not in ctx.cache:
            ctx.cache[key] = outputs_for_fidelity(original, texts, **options)
        reference = ctx.cache[key]
        outputs = outputs_for_fidelity(handle, texts, **options)
        if outputs.shape != reference.shape:
            raise ExecutionError(
                f"metric 'fidelity': the outputs have shape {tuple(outputs.shape)} but the "
                f"original's have {tuple(reference.shape)} (a changed tokenizer or vocabulary "
                "makes token logits incomparable)")
        cosine = torch.nn.functional.cosine_similarity(outputs.double(), reference.double(), dim=1)
        return float(min(1.0, max(-1.0, float(cosine.mean()))))
