"""Run an MTEB STS task on a data set's pairs with the model being compressed (imports ``mteb``).

Imported by ``mteb.Mteb.measure`` only, inside ``contained`` (offline, generators kept: MTEB seeds
Python's, NumPy's and torch's generators when it builds a task). ``SqueezeEncoder`` is MTEB's
encoder around the model: the embeddings of ``spearman`` (``encode``: attention-masked mean of the
token states, ``max_length`` tokens; in float64), so MTEB's ``cosine_spearman`` is ``spearman``'s
figure. The task is ``LocalSTS`` (``task = "sts"``) or one of MTEB's STS tasks by name; either way
its data set is the pairs, set as already loaded, so MTEB's ``load_data`` never fetches.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy
from datasets import Dataset, DatasetDict
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder

from squeezelang.plugin import ExecutionError, encode

if TYPE_CHECKING:
    from squeezelang.plugin import ModelHandle

SPLIT = "test"


class LocalSTS(AbsTaskSTS):
    """An STS task whose pairs a metric sets: ``task = "sts"``."""

    metadata = TaskMetadata(
        name="SqueezeLocalSTS", description="an STS task over a squeezelang data set",
        dataset={"path": "local", "revision": "local"}, type="STS", category="t2t",
        modalities=["text"], eval_splits=[SPLIT], eval_langs=["und"], main_score="cosine_spearman")
    # Scores are min-max normalised before the correlations, which no affine map changes.
    min_score = 0
    max_score = 1


class SqueezeEncoder(AbsEncoder):
    """``handle``'s mean-pooled embeddings as an MTEB encoder (cosine similarity)."""

    def __init__(self, handle: ModelHandle, batch_size: int, max_length: int) -> None:
        self.model = handle.model
        self.handle = handle
        self.batch_size = batch_size
        self.max_length = max_length

    def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,
               prompt_type: Any = None, **kwargs: Any) -> numpy.ndarray:
        texts = [str(text) for batch in inputs for text in batch["text"]]
        vectors = encode(self.handle, texts, batch_size=self.batch_size, max_length=self.max_length)
        # float64, as spearman computes its cosines: in float32, near-equal similarities (those of
        # a small model) can swap ranks
        return vectors.double().numpy()


def sts_scores(handle: ModelHandle, first: list[str], second: list[str], gold: list[float],
               task: str, batch_size: int, max_length: int) -> dict[str, float]:
    """MTEB's STS scores (correlations in [-1, 1], ``main_score`` among them) of the pairs."""
    sts = LocalSTS() if task == "sts" else named_task(task)
    one, two = sts.column_names
    sts.dataset = {"default": DatasetDict({SPLIT: Dataset.from_dict(
        {one: first, two: second, "score": gold})})}
    sts.hf_subsets = ["default"]
    sts.data_loaded = True
    model = SqueezeEncoder(handle, batch_size, max_length)
    scores = sts.evaluate(model, split=SPLIT, encode_kwargs={"batch_size": batch_size})["default"]
    return {key: float(value) for key, value in scores.items() if isinstance(value, (int, float))}


def named_task(name: str) -> AbsTaskSTS:
    """MTEB's task ``name``, refused unless it is a text STS task."""
    import mteb

    try:
        task = mteb.get_task(name)
    except (KeyError, ValueError) as exc:
        raise ExecutionError(f"metric 'mteb': MTEB has no task '{name}' ({exc}); "
                             "task = \"sts\" runs an STS task on any a, b, score data") from None
    if not isinstance(task, AbsTaskSTS) or list(task.metadata.modalities) != ["text"] \
            or not all(isinstance(c, str) for c in task.column_names):
        raise ExecutionError(f"metric 'mteb': '{name}' is an MTEB {task.metadata.type} task; the "
                             "metric runs text STS tasks (pairs with a graded score)")
    return task
