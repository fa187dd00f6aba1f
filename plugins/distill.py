"""The built-in ``distill`` technique: train the compressed model to imitate a teacher.

Usually placed after lossy stages (``teacher = original``) to win back what they cost. The student
trains on the texts of ``data`` with AdamW for ``steps`` batches (or until ``time`` runs out). Losses:

- ``embedding`` models (``loss = "auto"``): ``1 - cosine`` between the student's and the teacher's
  mean-pooled sentence embeddings, plus the MSE between the two after L2 normalisation, plus the same
  two terms on every token's final state (more signal per text than the pooled vector alone). A
  student with fewer hidden channels than the teacher (heads pruned with their channels) is
  trained on the MSE between the two models' cosine-similarity matrices instead (sentences of a
  batch, and tokens), since its vectors cannot be compared with the teacher's directly.
- ``causal-lm``, ``masked-lm``, ``classification`` (``loss = "auto"``): KL divergence between the
  temperature-softened distributions (token by token for LMs), scaled by ``temperature²``.
- ``hidden_weight > 0`` adds the MSE between student layer ``i`` and teacher layer
  ``round(i × L_teacher / L_student)``, each normalised by the teacher state's mean square.

Dropout stays off (the model stays in eval mode with gradients on): on a few hundred texts dropout
noise costs more than it regularises. The word embeddings (and an output layer tied to them) stay
frozen unless ``train_embeddings = true``: the data touches few of their rows, and updating the
large matrix dominates the cost of a CPU step. Weights that a codec stores sparse keep their zeros: the mask is
recorded before training and re-applied after every step. Low-rank (factorized) layers are ordinary
modules and train as such. The student's tokenizer drives both models; when a ``vocab_trim`` stage
made it a subset of the teacher's, its ids are mapped to the teacher's by token, and LM logits are
compared on the kept tokens. Runs are deterministic for a given ``seed``.

Under ``torchrun`` (``WORLD_SIZE`` > 1) training is data-parallel: every rank draws the same global
batches (same seed), computes the loss on its ``share`` of each, weighted by that share's size, and
trains the student wrapped in ``DistributedDataParallel``, which averages the gradients; the
teacher stays a plain model on each rank. A step is then the single-process step of the whole batch
up to how the per-token terms are averaged (over a share's tokens, not the batch's), padding, and
summation order; the relational loss of a narrower student compares the sentences within a share.
With ``time``, the ranks agree at every step on whether time is up, so all stop at the same step.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import Candidate, SqueezeError, Technique, hookimpl

if TYPE_CHECKING:
    import torch

    from squeezelang.plugin import ModelHandle, ModelMeta, StageContext, World

LOSSES = ("auto", "cosine", "mse", "kl")


def _teacher(handle: ModelHandle, teacher: str, ctx: StageContext) -> ModelHandle:
    if teacher == "original":
        return ctx.original()
    from squeezelang.plugin import load_model

    path = Path(teacher)
    if not path.is_dir():
        raise SqueezeError(f"distill: teacher '{teacher}' is neither `original` nor a model "
                           "directory")
    return load_model(path, task=handle.task)


def _sparse_masks(handle: ModelHandle) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(parameter, nonzero mask)`` of every tensor a codec stores sparse."""
    params = dict(handle.model.named_parameters(remove_duplicate=False))
    out, seen = [], set()
    for name, spec in sorted(handle.codecs.items()):
        if not (spec and spec.get("sparse")) or name not in params or id(params[name]) in seen:
            continue
        seen.add(id(params[name]))
        out.append((params[name], params[name].detach() != 0))
    return out


def _id_map(student: Any, teacher: Any) -> torch.Tensor | None:
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


class _Batcher:
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


def _widen_float16(model: torch.nn.Module) -> dict[str, torch.dtype] | None:
    """A float16 model's tensors cast to float32 for training (AdamW steps on float16 weights
    overflow within a few steps); the dtypes to restore, or ``None`` when nothing is float16."""
    import torch

    dtypes = {name: t.dtype for name, t in list(model.named_parameters())
              + list(model.named_buffers())}
    if torch.float16 not in dtypes.values():
        return None
    model.float()
    return dtypes


def _restore_dtypes(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Give every parameter and buffer its dtype of before ``_widen_float16``."""
    import torch

    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            wanted = dtypes.get(name)
            if wanted is not None and tensor.dtype != wanted:
                tensor.data = tensor.data.to(wanted)


def _as_float32(out: Any) -> Any:
    """A model output whose floating tensors (and tuples of them) are float32."""
    def cast(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(cast(v) for v in value)
        return value.float() if hasattr(value, "is_floating_point") and value.is_floating_point() \
            else value
    if isinstance(out, tuple):
        return cast(out)
    for key in list(out.keys()):
        out[key] = cast(out[key])
    return out


def _similarity_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """``cosine``: 1 - cos; ``mse``: MSE of L2-normalised rows; ``auto``: both. Rows are vectors."""
    import torch.nn.functional as F

    loss = student.new_zeros(())
    if kind in ("auto", "cosine"):
        loss = loss + (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if kind in ("auto", "mse"):
        loss = loss + F.mse_loss(F.normalize(student, dim=-1), F.normalize(teacher, dim=-1),
                                 reduction="sum") / student.shape[0]
    return loss


def _relational_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the rows' cosine-similarity matrices: for a student whose vectors have fewer
    dimensions than the teacher's (hidden channels pruned), the similarities are what an embedding
    is used for, and they compare across widths."""
    import torch.nn.functional as F

    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return F.mse_loss(s @ s.T, t @ t.T) * student.shape[0]


class Distill(Technique):
    name = "distill"
    description = (
        "Knowledge distillation: train the model to reproduce a teacher's outputs (usually "
        "`teacher = original`) on the texts of `data`, to recover quality lost by earlier stages. "
        "Embedding models match pooled and per-token embeddings (cosine + MSE); language models "
        "and classifiers match temperature-softened output distributions (KL). Keeps pruned "
        "weights at zero; refuses quantized models. The model's size does not change.")
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "teacher": {"type": "string", "default": "original",
                        "description": "`original` (the model before any stage) or the path of a "
                                       "local model directory with the same task."},
            "data": {"type": "string", "description": "The data set whose texts are trained on."},
            "steps": {"type": "integer", "minimum": 1, "default": 200,
                      "description": "Optimizer steps (batches)."},
            "time": {"type": "number", "exclusiveMinimum": 0,
                     "description": "Stop after this many seconds even if steps remain."},
            "batch_size": {"type": "integer", "minimum": 1, "default": 16,
                           "description": "Texts per step (all ranks together, under torchrun)."},
            "lr": {"type": "number", "exclusiveMinimum": 0, "default": 3e-4,
                   "description": "AdamW learning rate (constant after a 10% warm-up)."},
            "temperature": {"type": "number", "exclusiveMinimum": 0, "default": 2.0,
                            "description": "Softmax temperature of the KL loss."},
            "max_length": {"type": "integer", "minimum": 2, "default": 128,
                           "description": "Longest input in tokens; longer texts are truncated."},
            "hidden_weight": {"type": "number", "minimum": 0, "default": 0.0,
                              "description": "Weight of an extra loss matching intermediate "
                                             "hidden states layer to layer (0 = off)."},
            "train_embeddings": {"type": "boolean", "default": False,
                                 "description": "Also train the word embeddings (and an output "
                                                "layer tied to them); off by default: few texts "
                                                "touch few rows, and the matrix is large."},
            "loss": {"type": "string", "enum": list(LOSSES), "default": "auto",
                     "description": "auto: cosine + mse for embedding models, kl otherwise."},
            "seed": {"type": "integer",
                     "description": "Seed of the shuffling and of torch (default: the run's seed)."},
        },
        "required": ["data"],
    }
    data_params = {"data": "text|a,b"}
    example = "stage heal: distill { teacher = original, data = calib, steps = 300 }"

    def candidates(self, task: str) -> list[Candidate]:
        """Heals what a structural stage before it lost; composed only after one."""
        return [Candidate("distill", {"teacher": "original", "steps": 300}, risk=-1.5, order=60,
                          needs_data=True, heals=True)]

    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        """Distillation changes values, never shapes or codecs."""
        return meta.copy()

    def _loss_kind(self, task: str, loss: str) -> str:
        if task == "embedding":
            if loss == "kl":
                raise SqueezeError("distill: loss 'kl' needs logits; an embedding model has none "
                                   "(use auto, cosine or mse)")
            return loss
        if loss != "auto" and loss != "kl":
            return loss
        return "kl"

    def apply_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        import torch

        from squeezelang.plugin import any_rank, data_parallel, mean_pool, share, world

        if "quantized" in handle.states or any((s or {}).get("quant") for s in handle.codecs.values()):
            raise SqueezeError("distill cannot train a quantized model; put distill before quantize")
        seed = int(params["seed"]) if params.get("seed") is not None else int(ctx.seed)
        kind = self._loss_kind(handle.task, params.get("loss", "auto"))
        teacher = _teacher(handle, params.get("teacher", "original"), ctx)
        if teacher.task != handle.task:
            raise SqueezeError(f"distill: the teacher is a '{teacher.task}' model, the student a "
                               f"'{handle.task}' model")
        texts = ctx.data.texts(params["data"])
        id_map = _id_map(handle.tokenizer, teacher.tokenizer)
        batcher = _Batcher(handle, texts, int(params.get("batch_size", 16)),
                           int(params.get("max_length", 128)), seed)
        if id_map is not None:
            id_map = id_map.to(batcher.device)
        ranks = world()
        if ranks.size > batcher.batch_size:
            raise SqueezeError(f"distill: a batch of {batcher.batch_size} texts cannot be shared by "
                               f"{ranks.size} data-parallel ranks; raise `batch_size` (and give "
                               "as many texts) to at least the number of ranks")
        # The ranks' gradients are averaged: weigh each rank's mean loss by its share of the batch.
        weight = ranks.size * len(share(range(batcher.batch_size), ranks)) / batcher.batch_size
        hidden_weight = float(params.get("hidden_weight", 0.0))
        layer_map = self._layer_map(handle, teacher, ctx) if hidden_weight > 0 else None
        temperature = float(params.get("temperature", 2.0))

        def loss_of(batch: dict[str, torch.Tensor], student: torch.nn.Module) -> torch.Tensor:
            t_batch = dict(batch)
            if id_map is not None:
                t_batch["input_ids"] = id_map[batch["input_ids"]]
            want_hidden = layer_map is not None
            with torch.no_grad():
                t_out = teacher.model(**t_batch, output_hidden_states=want_hidden)
                if widened is not None:  # a float16 teacher beside a float32-trained student
                    t_out = _as_float32(t_out)
            s_out = student(**batch, output_hidden_states=want_hidden)
            mask = batch["attention_mask"].bool()
            if handle.task == "embedding":
                s_h, t_h = s_out[0], t_out[0]
                if s_h.shape[-1] == t_h.shape[-1]:
                    loss = (_similarity_loss(mean_pool(s_h, mask), mean_pool(t_h, mask), kind)
                            + _similarity_loss(s_h[mask], t_h[mask], kind))
                else:  # hidden channels were pruned: match what the vectors are used for
                    loss = (_relational_loss(mean_pool(s_h, mask), mean_pool(t_h, mask))
                            + _relational_loss(s_h[mask], t_h[mask]))
            else:
                loss = self._logit_loss(handle.task, s_out.logits, t_out.logits, mask, id_map,
                                        kind, temperature)
            if layer_map:
                s_hidden, t_hidden = s_out.hidden_states, t_out.hidden_states
                terms = [((s_hidden[i][mask] - t_hidden[j][mask]) ** 2).mean()
                         / t_hidden[j][mask].pow(2).mean().clamp_min(1e-12)
                         for i, j in layer_map]
                loss = loss + hidden_weight * torch.stack(terms).mean()
            return loss

        model = handle.model
        torch.manual_seed(seed)
        model.eval()  # no dropout: see the module docstring
        widened = _widen_float16(model)  # float32 master weights for a float16 model
        frozen = [] if params.get("train_embeddings", False) else [
            p for p in (model.get_input_embeddings().weight,) if p.requires_grad]
        for param in frozen:
            param.requires_grad_(False)  # no gradient computed at all, restored below
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise SqueezeError("distill: the model has no trainable parameters")
        masks = _sparse_masks(handle)
        probe = batcher.batch(list(range(min(len(batcher.rows), batcher.batch_size))))
        with torch.no_grad():
            start_loss = float(loss_of(probe, model))
        steps = int(params.get("steps", 200))
        lr = float(params.get("lr", 3e-4))
        warmup = max(1, steps // 10)
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup))
        deadline = time.monotonic() + float(params["time"]) if params.get("time") else math.inf
        if ranks.size > 1:
            backend = "nccl" if batcher.device.type == "cuda" else "gloo"
            ctx.log(f"distill: data-parallel on {ranks.size} ranks ({backend})")
        done, student = 0, None
        try:
            with torch.enable_grad(), data_parallel(model) as student, \
                    ctx.progress(total=steps, desc="distill") as bar:
                for done in range(1, steps + 1):
                    loss = loss_of(batcher.next(ranks), student)
                    if not torch.isfinite(loss):
                        raise SqueezeError(f"distill: the loss became {float(loss)} at step {done}; "
                                           "lower `lr`")
                    optimizer.zero_grad(set_to_none=True)
                    (loss * weight).backward()
                    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                    optimizer.step()
                    scheduler.step()
                    with torch.no_grad():
                        for param, keep in masks:
                            param.mul_(keep)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4g}")
                    if deadline < math.inf and any_rank(time.monotonic() >= deadline):
                        break
        finally:
            student = None  # the data-parallel wrapper and its gradient hooks go
            optimizer.zero_grad(set_to_none=True)
            for param in frozen:
                param.requires_grad_(True)
            model.eval()
        with torch.no_grad():
            end_loss = float(loss_of(probe, model))
        if widened is not None:
            _restore_dtypes(model, widened)
            ctx.log("distill: trained the float16 model in float32 (master weights), saved back "
                    "as float16")
        stopped = " (time limit)" if done < steps else ""
        ctx.log(f"distill: {done} steps{stopped}, loss on a fixed batch {start_loss:.4g} -> "
                f"{end_loss:.4g}")

    def _layer_map(self, handle: ModelHandle, teacher: ModelHandle,
                   ctx: StageContext) -> list[tuple[int, int]] | None:
        """Pairs ``(student hidden-state index, teacher index)``, or ``None`` if sizes differ."""
        def dims(model: Any) -> tuple[int | None, int | None]:
            config = model.config
            layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
            hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
            return layers, hidden

        (ls, hs), (lt, ht) = dims(handle.model), dims(teacher.model)
        if not ls or not lt or hs != ht:
            ctx.log(f"distill: hidden_weight ignored: student hidden size {hs} and teacher's {ht} "
                    "differ (or layer counts are unknown)")
            return None
        return [(i, int(round(i * lt / ls))) for i in range(1, ls + 1)]

    @staticmethod
    def _logit_loss(task: str, s_logits: torch.Tensor, t_logits: torch.Tensor, mask: torch.Tensor,
                    id_map: torch.Tensor | None, kind: str, temperature: float) -> torch.Tensor:
        import torch.nn.functional as F

        if id_map is not None and task != "classification":
            t_logits = t_logits[..., id_map[:s_logits.shape[-1]]]
        if task != "classification":
            s_logits, t_logits = s_logits[mask], t_logits[mask]
        if kind == "kl":
            t = temperature
            return F.kl_div(F.log_softmax(s_logits / t, -1), F.log_softmax(t_logits / t, -1),
                            log_target=True, reduction="batchmean") * t * t
        if kind == "mse":
            return F.mse_loss(s_logits, t_logits)
        return _similarity_loss(s_logits, t_logits, "cosine")


@hookimpl
def register_techniques(registry: Any) -> None:
    registry.add(Distill())
