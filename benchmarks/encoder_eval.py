"""Measure sentence encoders the same way, whatever produced them: STS-B quality, latency, size.

An ``Encoder`` is anything with ``embed`` (mean-pooled sentence vectors) and ``forward_once`` (one
forward pass, for latency): the engine's reloaded artifacts and the peers of ``benchmarks.peers``
(by-hand torch baselines, Torch-Pruning, ONNX Runtime) are all measured through it, so that every
row of a table is computed by the same code. Quality is STS-Benchmark dev Spearman × 100 of the
cosine similarity of the two sentences' embeddings (mean pooling over the attention mask, at most
128 tokens, batches of 64 in order of token length). Latency is measured for several encoders
interleaved in one process so that their ratios are taken under the same load.
"""
from __future__ import annotations

import csv
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

if TYPE_CHECKING:
    import torch

# On a machine shared with other jobs, OpenMP threads that spin-wait at torch's barriers make a
# 2-thread forward pass 2-4x slower and its time erratic (an encoder measured against itself came
# out 0.85-1.32x); sleeping threads keep the ratios steady. It only takes effect if torch is not
# imported yet; set OMP_WAIT_POLICY=ACTIVE in the environment to measure with spinning threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MAX_LENGTH = 128
BATCH_SIZE = 64
#: Files that hold a model, counted by ``dir_bytes`` when the tokenizer is excluded. The engine's
#: ``size`` counts ``*.safetensors``, ``config.json`` and ``squeeze.json``; the other weight
#: formats are those the peers save (a torch state dict, an ONNX graph and its external data).
MODEL_FILES = ("config.json", "squeeze.json")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".onnx", ".onnx.data", ".onnx_data")


class Encoder(Protocol):
    """A sentence encoder as the benchmarks see it. An encoder may also have a ``vocab_size``
    attribute (the number of token ids it accepts), which ``latency_ms`` honours."""

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Return ``[len(texts), dim]`` float32 embeddings, mean-pooled over the attention mask."""
        ...

    def forward_once(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        """Run one forward pass on a ``[batch, seq]`` batch (what latency measures)."""
        ...


def load_stsb_dev(path: str | Path) -> tuple[list[str], list[str], list[float]]:
    """Read an STS-B split (``sentence_a,sentence_b,score`` rows, CSV quoting, no header)."""
    a: list[str] = []
    b: list[str] = []
    score: list[float] = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.reader(handle):
            if not row:
                continue
            a.append(row[0])
            b.append(row[1])
            score.append(float(row[2]))
    return a, b, score


def train_sentences(path: str | Path, limit: int) -> list[str]:
    """The first ``limit`` distinct sentences of an STS-B split (both columns, in file order)."""
    seen: dict[str, None] = {}
    a, b, _ = load_stsb_dev(path)
    for first, second in zip(a, b):
        for text in (first, second):
            if len(seen) < limit:
                seen.setdefault(text, None)
    return list(seen)


class TokenEncoder:
    """An ``Encoder`` from a tokenizer and a function ``(input_ids, attention_mask) -> token
    states [batch, seq, dim]``; ``embed`` batches by token length and mean-pools."""

    def __init__(self, tokenizer: Any, hidden: Callable[[Any, Any], torch.Tensor],
                 vocab_size: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.hidden = hidden
        self.vocab_size = vocab_size

    def forward_once(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.hidden(input_ids, attention_mask)

    def embed(self, texts: list[str]) -> torch.Tensor:
        import torch

        ids = self.tokenizer([str(t) for t in texts], truncation=True,
                             max_length=MAX_LENGTH)["input_ids"]
        pad = self.tokenizer.pad_token_id or 0
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(0)
        with torch.inference_mode():
            for start in range(0, len(order), BATCH_SIZE):
                idx = order[start:start + BATCH_SIZE]
                width = max(len(ids[i]) for i in idx)
                input_ids = torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in idx])
                mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in idx])
                states = self.hidden(input_ids, mask).float()
                weights = mask.unsqueeze(-1).to(states.dtype)
                pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
                if out.numel() == 0:
                    out = torch.empty(len(texts), pooled.shape[1])
                out[torch.tensor(idx)] = pooled
        return out


def hf_encoder(model: Any, tokenizer: Any) -> TokenEncoder:
    """Wrap a module that takes ``input_ids``/``attention_mask`` and returns an object with
    ``last_hidden_state`` or a tuple whose first item is it (transformers models, the engine's
    reloaded artifacts, a dynamically quantized ``BertModel``)."""
    model.eval()

    def hidden(input_ids: Any, attention_mask: Any) -> torch.Tensor:
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(
        getattr(model, "config", None), "vocab_size", None)
    return TokenEncoder(tokenizer, hidden, vocab)


def spearman_stsb(encoder: Encoder, dev: tuple[Sequence[str], Sequence[str], Sequence[float]]) -> float:
    """Spearman × 100 between the gold scores and the cosine similarity of the pairs' embeddings."""
    import torch
    from scipy.stats import spearmanr

    a, b, score = dev
    vectors = encoder.embed(list(a) + list(b))
    cosine = torch.nn.functional.cosine_similarity(vectors[:len(a)], vectors[len(a):], dim=-1)
    return 100.0 * float(spearmanr(cosine.numpy(), list(score)).statistic)


def latency_ms(encoders: dict[str, Encoder], seq: int = 128, batch: int = 1, threads: int = 2,
               rounds: int = 30, warmup: int = 3, seed: int = 0,
               vocab: dict[str, int] | None = None) -> dict[str, float]:
    """Median milliseconds of one forward pass of each encoder on the same random ``[batch, seq]``
    token ids, all encoders measured interleaved: every round runs each encoder once, in an order
    shuffled from round to round (seeded), so that a change of load affects all of them alike and
    no encoder always runs right after the same other one.

    The token ids are drawn below the smallest vocabulary of the encoders (``vocab[name]``, else
    the encoder's ``vocab_size`` attribute), so that a trimmed vocabulary takes the same input.
    ``threads`` sets torch's intra-op threads; an encoder that runs outside torch (ONNX Runtime)
    fixes its own threads when it is built.
    """
    import random

    import torch

    sizes = [(vocab or {}).get(name) or getattr(enc, "vocab_size", None)
             for name, enc in encoders.items()]
    limit = min((s for s in sizes if s), default=30522)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, limit, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    names = list(encoders)
    times: dict[str, list[float]] = {name: [] for name in names}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for name in names:
                for _ in range(warmup):
                    encoders[name].forward_once(input_ids, mask)
            shuffler = random.Random(seed)
            for _ in range(rounds):
                for name in shuffler.sample(names, len(names)):
                    start = time.perf_counter()
                    encoders[name].forward_once(input_ids, mask)
                    times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def dir_bytes(path: str | Path, exclude_tokenizer: bool = True) -> int:
    """Bytes on disk of an artifact: a single file's size, or for a directory its weight files
    (``WEIGHT_SUFFIXES``) plus ``config.json`` and ``squeeze.json`` — the engine's ``size``
    convention — or, with ``exclude_tokenizer=False``, every file under it."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    files = [p for p in path.rglob("*") if p.is_file()]
    if exclude_tokenizer:
        files = [p for p in files if p.parent == path
                 and (p.name in MODEL_FILES or p.name.endswith(WEIGHT_SUFFIXES))]
    return sum(p.stat().st_size for p in files)
