"""Task-aware forward passes that metrics and stages share: pooled embeddings, logits, LM loss.

Every helper runs the model in eval mode under ``torch.inference_mode``, in batches, and returns
results in the order of the input texts. Texts are batched in order of token length so that little
padding is computed; padding never changes a result because every reduction honours the attention
mask. Tokenizers without a padding token (GPT-2) are padded by hand, so the tokenizer is never
modified.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from squeezelang.errors import ExecutionError

if TYPE_CHECKING:
    import torch

    from squeezelang.models.handle import ModelHandle

#: Tasks whose models return token logits over a vocabulary.
LM_TASKS = ("causal-lm", "masked-lm")


def max_positions(model: Any) -> int | None:
    """The longest input the model's position embeddings allow, or ``None`` if it has no limit."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _device(model: Any) -> torch.device:
    from squeezelang.models.offload import compute_device

    return compute_device(model)


def pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def length_limit(handle: ModelHandle, max_length: int | None) -> int | None:
    limit = max_positions(handle.model)
    if max_length is None:
        return limit
    return min(max_length, limit) if limit else max_length


def _batches(handle: ModelHandle, texts: Sequence[str], pair: Sequence[str] | None,
             batch_size: int, max_length: int | None) -> Iterator[tuple[list[int], dict[str, Any]]]:
    """Yield ``(indices, inputs)``: padded tensors for groups of texts of similar length."""
    import torch

    if pair is not None and len(pair) != len(texts):
        raise ExecutionError(f"{len(texts)} first texts but {len(pair)} second texts")
    if batch_size < 1:
        raise ExecutionError(f"batch_size must be at least 1, not {batch_size}")
    texts = [str(t) for t in texts]
    limit = length_limit(handle, max_length)
    kwargs: dict[str, Any] = {"truncation": limit is not None}
    if limit is not None:
        kwargs["max_length"] = limit
    if pair is not None:
        encoded = handle.tokenizer(texts, [str(t) for t in pair], **kwargs)
    else:
        encoded = handle.tokenizer(texts, **kwargs)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in encoded]
    pad_values = {"input_ids": pad_id(handle.tokenizer), "token_type_ids": 0, "attention_mask": 0}
    order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
    device = _device(handle.model)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(1, max(len(encoded["input_ids"][i]) for i in idx))
        inputs = {}
        for key in keys:
            rows = [list(encoded[key][i]) for i in idx]
            inputs[key] = torch.tensor([r + [pad_values[key]] * (width - len(r)) for r in rows],
                                       dtype=torch.long, device=device)
        if "attention_mask" not in inputs:
            lengths = torch.tensor([len(encoded["input_ids"][i]) for i in idx], device=device)
            inputs["attention_mask"] = (torch.arange(width, device=device)[None, :]
                                        < lengths[:, None]).long()
        yield idx, inputs


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors that the attention mask keeps (sentence-transformers' pooling)."""
    import torch

    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / torch.clamp(weights.sum(1), min=1e-9)


def _scatter(parts: list[tuple[list[int], torch.Tensor]], n: int) -> torch.Tensor:
    """Put per-batch results back in input order."""
    import torch

    if not parts:
        return torch.empty(0)
    out = torch.empty((n,) + tuple(parts[0][1].shape[1:]), dtype=torch.float32)
    for idx, values in parts:
        out[torch.tensor(idx)] = values.float().cpu()
    return out


def encode(handle: ModelHandle, texts: Sequence[str], batch_size: int = 32, max_length: int = 128,
           pair: Sequence[str] | None = None) -> torch.Tensor:
    """Return one float32 vector per text (or text pair): the attention-masked mean of token states.

    ``embedding`` models pool ``last_hidden_state`` (all-MiniLM-L6-v2's own pooling); the other
    tasks pool the last entry of ``hidden_states``, the representation their head reads.
    """
    import torch

    model = handle.model.eval()
    parts = []
    with torch.inference_mode():
        for idx, inputs in _batches(handle, texts, pair, batch_size, max_length):
            if handle.task == "embedding":
                out = model(**inputs)
                hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            else:
                hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
            parts.append((idx, mean_pool(hidden, inputs["attention_mask"])))
    return _scatter(parts, len(texts))


def logits(handle: ModelHandle, texts: Sequence[str], batch_size: int = 32, max_length: int = 128,
           pair: Sequence[str] | None = None) -> torch.Tensor:
    """Return float32 logits: ``[texts, classes]`` for a classifier, ``[tokens, vocab]`` for an LM.

    For ``causal-lm`` and ``masked-lm`` the rows are the logits at every non-padding token, text
    after text in input order (the flattened per-token logits).
    """
    import torch

    if handle.task not in LM_TASKS + ("classification",):
        raise ExecutionError(f"a '{handle.task}' model has no logits; logits need a causal-lm, "
                             "masked-lm or classification model")
    model = handle.model.eval()
    per_text: list[torch.Tensor | None] = [None] * len(texts)
    with torch.inference_mode():
        for idx, inputs in _batches(handle, texts, pair, batch_size, max_length):
            out = model(**inputs).logits.float().cpu()
            mask = inputs["attention_mask"].bool().cpu()
            for row, i in enumerate(idx):
                per_text[i] = out[row] if handle.task == "classification" else out[row][mask[row]]
    if handle.task == "classification":
        return torch.stack(per_text) if per_text else torch.empty(0)
    return torch.cat(per_text) if per_text else torch.empty(0)


@dataclass(frozen=True)
class LmLoss:
    """``lm_loss_counted``'s answer: the mean loss, the tokens it scored and those available."""

    loss: float
    scored: int
    available: int


def lm_loss(handle: ModelHandle, texts: Sequence[str], max_length: int | None = None,
            stride: int | None = None, batch_size: int = 4, max_tokens: int | None = None) -> float:
    """Return the token-weighted mean negative log-likelihood (nats) of a causal LM on ``texts``
    (see ``lm_loss_counted``)."""
    return lm_loss_counted(handle, texts, max_length, stride, batch_size, max_tokens).loss


def lm_loss_counted(handle: ModelHandle, texts: Sequence[str], max_length: int | None = None,
                    stride: int | None = None, batch_size: int = 4,
                    max_tokens: int | None = None) -> LmLoss:
    """The token-weighted mean negative log-likelihood (nats) of a causal LM on ``texts``, and
    how many tokens it scored: all of them, or the first ``max_tokens`` in text order.

    Each text is scored on its own, prefixed with the tokenizer's BOS token when the tokenizer does
    not add one, so that every token of the text is predicted. A text longer than ``max_length``
    (default: the model's context) is scored with sliding windows that advance by ``stride``
    (default: half a window; at most ``max_length - 1``, so that a window has a token of context);
    each token is scored exactly once, with ``max_length - stride`` tokens of context carried over
    from the previous window.
    """
    import torch

    if handle.task != "causal-lm":
        raise ExecutionError(f"the LM loss needs a causal-lm model, not a '{handle.task}' model")
    window = length_limit(handle, max_length) or 1024
    if window < 2:
        raise ExecutionError(f"max_length must be at least 2 tokens, not {window}")
    stride = stride or max(1, window // 2)
    if not 0 < stride <= window:
        raise ExecutionError(f"stride must be between 1 and max_length ({window}), not {stride}")
    tokenizer = handle.tokenizer
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(tokenizer, "eos_token_id", None)

    # (token ids of one window, index of its first scored token)
    items: list[tuple[list[int], int]] = []
    for text in texts:
        ids = list(tokenizer(str(text))["input_ids"])
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if len(ids) < 2:
            continue
        scored_to = 1  # tokens before this index are scored (the first one never is)
        begin = 0
        while scored_to < len(ids):
            end = min(begin + window, len(ids))
            items.append((ids[begin:end], scored_to - begin))
            scored_to = end
            begin = min(begin + stride, end - 1)  # a token of context at least
    if not items:
        raise ExecutionError("no text has a token to predict")
    available = sum(len(ids) - first for ids, first in items)
    if max_tokens is not None and available > max_tokens:
        kept, left = [], int(max_tokens)
        for ids, first in items:
            if left <= 0:
                break
            take = min(left, len(ids) - first)
            kept.append((ids[:first + take], first))
            left -= take
        items = kept

    model = handle.model.eval()
    device = _device(model)
    pad = pad_id(tokenizer)
    total, count = 0.0, 0
    items.sort(key=lambda item: len(item[0]))
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch],
                                     dtype=torch.long, device=device)
            positions = torch.arange(width, device=device)[None, :]
            lengths = torch.tensor([len(ids) for ids, _ in batch], device=device)[:, None]
            firsts = torch.tensor([first for _, first in batch], device=device)[:, None]
            attention = (positions < lengths).long()
            out = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
            targets = input_ids[:, 1:]
            nll = torch.nn.functional.cross_entropy(out.transpose(1, 2), targets, reduction="none")
            target_pos = positions[:, 1:]
            keep = (target_pos >= firsts) & (target_pos < lengths)
            total += float(nll[keep].double().sum())
            count += int(keep.sum())
    return LmLoss(total / count, count, available)


def outputs_for_fidelity(handle: ModelHandle, texts: Sequence[str], batch_size: int = 32,
                         max_length: int = 128) -> torch.Tensor:
    """Return the rows whose cosine to the original's rows measures fidelity.

    ``embedding``: one pooled embedding per text; ``causal-lm``/``masked-lm``: the logits at every
    token (``[tokens, vocab]``); ``classification``: the logits of every text.
    """
    if handle.task == "embedding":
        return encode(handle, texts, batch_size=batch_size, max_length=max_length)
    return logits(handle, texts, batch_size=batch_size, max_length=max_length)
