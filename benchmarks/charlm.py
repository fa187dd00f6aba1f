"""The character-level models of the causal-LM benchmarks: data split, tokenizer, training, cache.

``prepare`` trains (once) a causal LM on the first 90% of the characters of a text file and
early-stops on the last 10%, and writes into ``benchmarks/cache/charlm/<key>/``. The architecture
is ``Hyper.arch``, a key of ``ARCHS`` (a config factory each): ``"gpt2"`` (the ``causal_lm``
suite's) or ``"llama"`` (the ``llama_lm`` suite's: grouped-query attention with ``kv_heads``
key/value heads, a gated SiLU MLP, RMSNorm, rotary positions, tied embeddings); everything else —
data, tokenizer, training, control — is the same code for both. Files:

- ``model/``: the best checkpoint as a plain transformers directory (``config.json``,
  ``model.safetensors``) with a character tokenizer (a ``tokenizers`` WordLevel model over the
  characters, split one character a token, saved as ``PreTrainedTokenizerFast``) that
  ``AutoTokenizer`` loads; the vocabulary is every character of the file, as nanoGPT's character
  model has it;
- ``val.jsonl``: the validation split cut into consecutive, non-overlapping windows of ``context``
  characters (the last one shorter), one JSON object ``{"text": …}`` a line — JSON because the
  windows hold newlines, which a ``text(...)`` data set would split on;
- ``train.jsonl``: ``train_windows`` windows of ``context`` characters at seeded random offsets of
  the training split, for calibration and distillation;
- ``training.json``: the hyper-parameters, the data file's SHA-256, the validation curve, the steps
  and why training stopped.

The key hashes the hyper-parameters, the data file's SHA-256 and ``VERSION``, so a change retrains
(the fields added with the Llama model are left out at their defaults, so the GPT-2 key is the
one it had before them).

Validation loss is the token-weighted mean next-character negative log-likelihood (nats) over the
validation windows, each window scored on its own with the first character as context only. That is
exactly what the engine's ``perplexity`` metric computes on ``val.jsonl`` for a tokenizer without a
BOS token (``squeezelang.models.forward.lm_loss``: a text that fits the context is one window and
its first token is never predicted), so ``ln(perplexity)`` of the engine equals this loss.

Training: AdamW (betas 0.9/0.99, weight decay on matrices), a linear warm-up then a constant
learning rate that is halved whenever the validation loss has not improved by ``min_delta`` for
``patience`` evaluations; after ``lr_halvings`` halvings the next such plateau stops training, and
the best checkpoint is kept. Batches are windows at random offsets of the training split. No dropout
(the engine's distillation trains without it too). Seeded: the same hyper-parameters, data and
thread count give the same model.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "cache" / "charlm"
#: Bumped when the training or the files written change in a way the hyper-parameters do not show.
VERSION = 1
UNK = "<unk>"


@dataclass(frozen=True)
class Hyper:
    """Everything that decides the trained model and the derived data files."""

    layers: int = 4
    d_model: int = 128
    heads: int = 4
    context: int = 128
    batch_size: int = 16
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.1
    eval_every: int = 250
    #: evaluations without an improvement of ``min_delta`` before the learning rate is halved or,
    #: after ``lr_halvings`` halvings, training stops
    patience: int = 1
    lr_halvings: int = 3
    min_delta: float = 0.002
    max_steps: int = 12000
    seed: int = 0
    val_fraction: float = 0.1
    train_windows: int = 16384
    #: the architecture: a key of ``ARCHS``
    arch: str = "gpt2"
    #: key/value heads (grouped-query attention); 0: as many as ``heads``
    kv_heads: int = 0
    #: the MLP's inner width; 0: 4 × ``d_model``
    inner: int = 0


#: Fields added after the GPT-2 cache existed, with the defaults that leave them out of the key.
_LATER = {"arch": "gpt2", "kv_heads": 0, "inner": 0}


@dataclass(frozen=True)
class Prepared:
    """Where the cached model and data files are, and the training record."""

    dir: Path
    model: Path
    val: Path
    train: Path
    info: dict[str, Any]
    hyper: Hyper

    @property
    def val_loss(self) -> float:
        return float(self.info["best_val_loss"])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(hyper: Hyper, data_sha: str) -> str:
    fields = {k: v for k, v in asdict(hyper).items() if k not in _LATER or _LATER[k] != v}
    blob = json.dumps({"version": VERSION, "hyper": fields, "data": data_sha}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split(text: str, val_fraction: float) -> tuple[str, str]:
    """The first ``1 - val_fraction`` of the characters (train) and the rest (validation)."""
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


def build_tokenizer(chars: list[str], context: int) -> Any:
    """A character tokenizer: one token per character, no BOS/EOS, ``<unk>`` (id 0) for others."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {UNK: 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, pad_token=UNK,
                                   model_max_length=context)


def val_windows(text: str, context: int) -> list[str]:
    """Consecutive non-overlapping windows of ``context`` characters (the last may be shorter)."""
    return [text[i:i + context] for i in range(0, len(text), context) if len(text[i:i + context]) >= 2]


def train_windows(text: str, context: int, count: int, seed: int) -> list[str]:
    """``count`` windows of ``context`` characters at seeded random offsets."""
    rng = random.Random(seed)
    return [text[o:o + context] for o in (rng.randrange(len(text) - context + 1) for _ in range(count))]


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]


def mean_nll(model: Any, windows: list[list[int]], batch_size: int = 32) -> float:
    """Token-weighted mean next-token NLL over ``windows``, each scored alone (first token unscored)."""
    import torch

    total, count = 0.0, 0
    by_length: dict[int, list[list[int]]] = {}
    for w in windows:
        by_length.setdefault(len(w), []).append(w)
    model.eval()
    with torch.inference_mode():
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                ids = torch.tensor(group[start:start + batch_size], dtype=torch.long)
                logits = model(input_ids=ids).logits[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:],
                                                        reduction="sum")
                total += float(nll)
                count += ids[:, 1:].numel()
    return total / count


def gpt2_config(hyper: Hyper, vocab: int) -> Any:
    """GPT-2: learned positions, LayerNorm, a GELU MLP; no dropout, tied embeddings."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_positions=hyper.context, n_embd=hyper.d_model,
                      n_layer=hyper.layers, n_head=hyper.heads, n_inner=hyper.inner or 4 * hyper.d_model,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                      eos_token_id=None, pad_token_id=0, tie_word_embeddings=True)


def llama_config(hyper: Hyper, vocab: int) -> Any:
    """Llama: grouped-query attention, a gated SiLU MLP, RMSNorm, rotary; tied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hyper.d_model, num_hidden_layers=hyper.layers,
                       num_attention_heads=hyper.heads,
                       num_key_value_heads=hyper.kv_heads or hyper.heads,
                       head_dim=hyper.d_model // hyper.heads,
                       intermediate_size=hyper.inner or 4 * hyper.d_model, hidden_act="silu",
                       max_position_embeddings=hyper.context, attention_dropout=0.0,
                       attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None,
                       pad_token_id=0, tie_word_embeddings=True)


#: The architectures ``Hyper.arch`` names: a transformers config from the hyper-parameters and the
#: vocabulary size.
ARCHS: dict[str, Callable[[Hyper, int], Any]] = {"gpt2": gpt2_config, "llama": llama_config}


def _model(hyper: Hyper, vocab: int) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(ARCHS[hyper.arch](hyper, vocab))


def _optimizer(model: Any, hyper: Hyper) -> Any:
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": hyper.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=hyper.lr, betas=(0.9, 0.99))


def train(hyper: Hyper, train_ids: torch.Tensor, val: list[list[int]], vocab: int,
          log: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """Train until the validation loss stops improving; return the best model and the record."""
    import torch

    torch.manual_seed(hyper.seed)
    model = _model(hyper, vocab)
    optimizer = _optimizer(model, hyper)
    generator = torch.Generator().manual_seed(hyper.seed)
    lr, halvings, bad = hyper.lr, 0, 0
    best, best_step, best_state = math.inf, 0, None
    curve: list[dict[str, float]] = []
    started = time.perf_counter()
    stop = "max_steps"
    step = 0
    offsets = torch.arange(hyper.context)
    for step in range(1, hyper.max_steps + 1):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / hyper.warmup)
        starts = torch.randint(0, len(train_ids) - hyper.context + 1, (hyper.batch_size,),
                               generator=generator)
        x = train_ids[starts[:, None] + offsets[None, :]]
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % hyper.eval_every:
            continue
        val_loss = mean_nll(model, val)
        curve.append({"step": step, "train_loss": loss.item(), "val_loss": val_loss, "lr": lr,
                      "seconds": time.perf_counter() - started})
        log(f"charlm: step {step} train {loss.item():.4f} val {val_loss:.4f} lr {lr:.2e} "
            f"({time.perf_counter() - started:.0f} s)")
        if val_loss < best - hyper.min_delta:
            bad = 0
        else:
            bad += 1
        if val_loss < best:
            best, best_step = val_loss, step
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if bad >= hyper.patience:
            if halvings >= hyper.lr_halvings:
                stop = "plateau"
                break
            lr, halvings, bad = lr / 2, halvings + 1, 0
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    record = {"steps": step, "best_step": best_step, "best_val_loss": best, "stopped": stop,
              "final_lr": lr,
              "train_seconds": time.perf_counter() - started, "curve": curve,
              "tokens_seen": step * hyper.batch_size * hyper.context, "threads": torch.get_num_threads()}
    return model, record


def prepare(data: Path, hyper: Hyper = Hyper(), log: Callable[[str], None] | None = None) -> Prepared:
    """The cached model and data files for ``data`` and ``hyper``, training them first if absent."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    data_sha = sha256(data)
    directory = CACHE / cache_key(hyper, data_sha)
    info_file = directory / "training.json"
    if info_file.is_file():
        return Prepared(directory, directory / "model", directory / "val.jsonl",
                        directory / "train.jsonl", json.loads(info_file.read_text()), hyper)

    import torch

    text = data.read_text(encoding="utf-8")
    train_text, val_text = split(text, hyper.val_fraction)
    chars = sorted(set(text))
    tokenizer = build_tokenizer(chars, hyper.context)
    index = {c: i + 1 for i, c in enumerate(chars)}
    sample = text[:hyper.context]
    if tokenizer(sample)["input_ids"] != [index[c] for c in sample]:
        raise RuntimeError("the character tokenizer does not give one id per character")
    train_ids = torch.tensor([index[c] for c in train_text], dtype=torch.long)
    windows = val_windows(val_text, hyper.context)
    val = [[index[c] for c in w] for w in windows]
    log(f"charlm: training a {hyper.layers}-layer, {hyper.d_model}-wide character {hyper.arch} on "
        f"{len(train_text)} characters ({len(chars)} distinct), validating on {len(val_text)} "
        f"(cached in {directory})")
    model, record = train(hyper, train_ids, val, len(tokenizer), log)

    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "model").mkdir(parents=True)
    model.save_pretrained(str(staging / "model"), safe_serialization=True)
    tokenizer.save_pretrained(str(staging / "model"))
    write_jsonl(staging / "val.jsonl", windows)
    write_jsonl(staging / "train.jsonl",
                train_windows(train_text, hyper.context, hyper.train_windows, hyper.seed))
    info = {"hyper": asdict(hyper), "data": str(data), "data_sha256": data_sha,
            "train_chars": len(train_text), "val_chars": len(val_text), "vocab": len(tokenizer),
            "val_windows": len(windows), "params": sum(p.numel() for p in model.parameters()),
            **record}
    (staging / "training.json").write_text(json.dumps(info, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)
    return Prepared(directory, directory / "model", directory / "val.jsonl",
                    directory / "train.jsonl", info, hyper)


def continue_training(prepared: Prepared, steps: int, batch_size: int, lr: float, seed: int = 0,
                      train_embeddings: bool = True,
                      log: Callable[[str], None] | None = None) -> Path:
    """The control: the original trained ``steps`` more optimizer steps on the distillation data.

    The same schedule as the engine's ``distill`` stage (``plugins/distill/``): the windows of
    ``train.jsonl`` in the same seeded order and batches, AdamW without weight decay, a linear
    warm-up over 10% of the steps then a constant ``lr``, gradient clipping at 1.0, no dropout, the
    word embeddings frozen unless ``train_embeddings`` — only the loss differs: the next character
    (cross-entropy) instead of the teacher's distribution. Cached next to the model; returns the
    directory of the trained copy (a plain transformers directory with the same tokenizer).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    name = f"control-{steps}x{batch_size}-lr{lr:g}-seed{seed}-emb{int(train_embeddings)}"
    out = prepared.dir / name
    if (out / "model.safetensors").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(str(prepared.model), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(prepared.model), local_files_only=True)
    rows = [list(r) for r in tokenizer(read_jsonl(prepared.train), truncation=True,
                                       max_length=prepared.hyper.context)["input_ids"]]
    if len({len(r) for r in rows}) != 1:
        raise RuntimeError("the distillation windows must all have the same length")
    rng = random.Random(seed)
    batch_size = min(batch_size, len(rows))
    order: list[int] = []
    torch.manual_seed(seed)
    model.eval()  # no dropout, as distill
    frozen = [] if train_embeddings else [model.get_input_embeddings().weight]
    for param in frozen:
        param.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    started = time.perf_counter()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            fresh = list(range(len(rows)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        x = torch.tensor([rows[i] for i in idx], dtype=torch.long)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        if step % 100 == 0:
            log(f"control: step {step}/{steps} loss {loss.item():.4f} "
                f"({time.perf_counter() - started:.0f} s)")
    for param in frozen:
        param.requires_grad_(True)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.eval().save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out
