"""The texts ``distill`` trains on, as padded batches in a seeded order, and the teacher's token ids."""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import SqueezeError

if TYPE_CHECKING:
    import torch

    from squeezelang.plugin import ModelHandle, World


def id_map(student: Any, teacher: Any) -> torch.Tensor | None:
    """Teacher id of each student id, or ``None`` when the two vocabularies are the same.

    ``SqueezeError`` when a student token is missing from the teacher's vocabulary.
    """
    import torch

    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab == t_vocab:
        return None
    missing = [tok for tok in s_vocab if tok not in t_vocab]
    if missing:
        raise SqueezeError(f"distill: the teacher's tokenizer lacks {len(missing)} of the student's "
                           f"tokens (e.g. {', '.join(repr(t) for t in missing[:3])}); the teacher "
                           "must share the student's vocabulary or be a superset of it")
    index = torch.empty(max(s_vocab.values()) + 1, dtype=torch.long)
    for tok, i in s_vocab.items():
        index[i] = t_vocab[tok]
    return index


class Batcher:
    """Tokenized texts, served as padded batches in a seeded order, epoch after epoch."""

    def __init__(self, handle: ModelHandle, texts: list[str], batch_size: int, max_length: int,
                 seed: int) -> None:
        from squeezelang.plugin import length_limit, pad_id

        limit = length_limit(handle, max_length)
        kwargs: dict[str, Any] = {"truncation": limit is not None}
        if limit is not None:
            kwargs["max_length"] = limit
        encoded = handle.tokenizer(texts, **kwargs)
        self.rows = [list(r) for r in encoded["input_ids"]]
        self.types = ([list(r) for r in encoded["token_type_ids"]]
                      if "token_type_ids" in encoded else None)
        self.pad = pad_id(handle.tokenizer)
        self.batch_size = min(batch_size, len(self.rows))
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.device = next(iter(handle.model.parameters())).device  # the run's device

    def batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        import torch

        width = max(len(self.rows[i]) for i in idx)
        ids = torch.tensor([self.rows[i] + [self.pad] * (width - len(self.rows[i])) for i in idx])
        mask = torch.tensor([[1] * len(self.rows[i]) + [0] * (width - len(self.rows[i])) for i in idx])
        out = {"input_ids": ids, "attention_mask": mask}
        if self.types is not None:
            out["token_type_ids"] = torch.tensor(
                [self.types[i] + [0] * (width - len(self.types[i])) for i in idx])
        return {k: v.to(self.device) for k, v in out.items()}

    def next(self, ranks: World) -> dict[str, torch.Tensor]:
        """This rank's share of the next batch (every rank draws the same batches)."""
        from squeezelang.plugin import share

        if len(self.order) < self.batch_size:
            fresh = list(range(len(self.rows)))
            self.rng.shuffle(fresh)
            self.order += fresh
        idx, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return self.batch(share(idx, ranks))
