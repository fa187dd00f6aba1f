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
large matrix dominates the cost of a CPU step. Weights that a codec stores sparse or N:M keep their
zeros: the mask is recorded before training and re-applied after every step. Low-rank (factorized)
layers are ordinary modules and train as such. The student's tokenizer drives both models; when a
``vocab_trim`` stage made it a subset of the teacher's, its ids are mapped to the teacher's by
token, and LM logits are compared on the kept tokens. Runs are deterministic for a given ``seed``.

LoRA (``lora_rank = r``, ``lora.py``): every linear layer that ``lora_include`` / ``lora_exclude``
select (default: those of the numbered blocks; a GPT-2 ``Conv1D`` in its ``[in, out]`` layout) is
frozen with every other parameter, and gets a low-rank adapter ``(lora_alpha / r) · B·A`` (``B``
zero at the start) trained with the same losses; at the end each adapter is merged into its weight
and removed, so the saved model has the architecture, codecs and size it had before the stage.
Gradients and AdamW state then cover the adapters only (the stage's log gives both, in bytes, and
the number of parameters trained); a dense layer's adapter runs beside it, so no weight-sized
tensor is added either. A sparse or N:M weight's update is masked, so the merged weight keeps its
zeros; the merged model computes what the adapted one did (up to float rounding). A weight tied to
another module's (a head tied to the embeddings) is refused: merging would change both. Adapters
start from zero and usually want a larger ``lr`` than full training (3e-3 on the tiny models
measured, against 1e-3).

Quantized students (quantization-aware distillation, ``qat.py``): a weight whose codec quantizes it
(int8, int4 or mixed widths, any axis and group; float8 codes alike) trains as a float shadow
whose forward pass reads its codes — recomputed at every step from the shadow with the codec's own
scale rule and rounding (``quantize_weight``, the quantize stage's function), the rounding passed
by the straight-through estimator — and ends exactly on its codec's grid: the same codec, the same
file size, and a save and reload that gives the trained weights back bit for bit. Frozen quantized
weights (the embeddings, by default) stay as they are. With LoRA over a quantized model, an adapted
quantized weight reads ``Q(W + scale · B·A)``: the adapter trains through the rounding and is
merged, then the weight re-quantized on the same codec — which is why its update cannot run beside
the weight. Int8 kernels (``quantize { scheme = "int8-dynamic" }``) are refused at run time (their
weights are packed inside torch's quantized op: use scheme ``"int8"``, the same file), as are
clustered weights (``squeeze check`` refuses distill after ``share`` method ``"cluster"``).
AdamW moves a weight by about ``lr`` a step whatever its gradient, and a code changes only when
its shadow crosses half a grid step (``max|w| / qmax`` of its channel or group): keep ``lr`` well
under a grid step, about ten times smaller for int8 than for int4 (on the tiny models measured,
the default 3e-4 for int4, 3e-5 for int8; larger rates make the codes flip back and forth and
the loss rise).

Under ``torchrun`` (``WORLD_SIZE`` > 1) training is data-parallel: every rank draws the same global
batches (same seed), computes the loss on its ``share`` of each, weighted by that share's size, and
trains the student wrapped in ``DistributedDataParallel``, which averages the gradients; the
teacher stays a plain model on each rank. A step is then the single-process step of the whole batch
up to how the per-token terms are averaged (over a share's tokens, not the batch's), padding, and
summation order; the relational loss of a narrower student compares the sentences within a share.
With ``time``, the ranks agree at every step on whether time is up, so all stop at the same step.
``parallel = "fsdp"`` trains through torch's FSDP2 instead (``data_parallel(model, "fsdp")``): a
copy of the student whose transformer blocks, then the rest, are sharded over the ranks trains on
the shards (the optimizer is built on them), each block's weights gathered only while it runs.
The gradients are averaged as DDP averages them, so the steps are DDP's. The pruned zeros are
kept on each rank's shard (the masks are cut as the weights are); LoRA adapters and quantized
shadows live in the blocks and are sharded with them. At the end the trained values are gathered
whole into the model on every rank, as DDP leaves it. Every rank still holds the whole model (it
runs every stage, and keeps its weights through the loop): what FSDP divides by the number of
ranks is what training adds, the gradients, AdamW's two moments and the copy that trains.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import BLOCKS, Candidate, SqueezeError, Technique, hookimpl

from .losses import logit_loss, relational_loss, similarity_loss

if TYPE_CHECKING:
    import torch

    from squeezelang.plugin import ModelHandle, ModelMeta, StageContext

LOSSES = ("auto", "cosine", "mse", "kl")
#: The parameters that configure LoRA; all but ``lora_rank`` need it.
LORA = ("lora_rank", "lora_alpha", "lora_include", "lora_exclude")


def _teacher(handle: ModelHandle, teacher: str, ctx: StageContext) -> ModelHandle:
    if teacher == "original":
        return ctx.original()
    from squeezelang.plugin import load_model

    path = Path(teacher)
    if not path.is_dir():
        raise SqueezeError(f"distill: teacher '{teacher}' is neither `original` nor a model "
                           "directory")
    return load_model(path, task=handle.task)


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


class Distill(Technique):
    name = "distill"
    description = (
        "Knowledge distillation: train the model to reproduce a teacher's outputs (usually "
        "`teacher = original`) on the texts of `data`, to recover quality lost by earlier stages. "
        "Embedding models match pooled and per-token embeddings (cosine + MSE); language models "
        "and classifiers match temperature-softened output distributions (KL). Keeps pruned "
        "weights at zero. With `lora_rank`, trains low-rank adapters of the linear layers "
        "instead of the weights and merges them at the end. A quantized model trains through "
        "its codes (quantization-aware: float shadows, straight-through rounding) and stays on "
        "its codecs' grids. Under torchrun, trains data-parallel (DDP, or FSDP with "
        "`parallel = \"fsdp\"`). The model's size does not change.")
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
                   "description": "AdamW learning rate (constant after a 10% warm-up). LoRA "
                                  "adapters usually want a larger one; quantized weights one "
                                  "well under their grid step (int8: about a tenth of int4's)."},
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
            "parallel": {"type": "string", "enum": ["ddp", "fsdp"], "default": "ddp",
                         "description": "Under torchrun: ddp (every rank holds the whole "
                                        "gradients and AdamW state) or fsdp (the trained "
                                        "weights, their gradients and AdamW state sharded over "
                                        "the ranks, block by block). Ignored in one process."},
            "lora_rank": {"type": "integer", "minimum": 1,
                          "description": "Train LoRA adapters of this rank on the selected linear "
                                         "layers, with every weight frozen, and merge them into "
                                         "the weights at the end (absent: train the weights)."},
            "lora_alpha": {"type": "number", "exclusiveMinimum": 0,
                           "description": "LoRA: the adapters' update is scaled by lora_alpha / "
                                          "lora_rank (default: twice lora_rank, a scale of 2)."},
            "lora_include": {"type": "array", "items": {"type": "string"},
                             "description": "LoRA: globs of the linear layers that get adapters "
                                            "(default: those of the numbered transformer "
                                            "blocks)."},
            "lora_exclude": {"type": "array", "items": {"type": "string"},
                             "description": "LoRA: globs of linear layers left without one "
                                            "(default: none)."},
        },
        "required": ["data"],
    }
    #: Trains quantized models (through their codes); a clustered one keeps no codebook.
    refuses = frozenset({"clustered"})
    data_params = {"data": "text|a,b"}
    example = "stage heal: distill { teacher = original, data = calib, steps = 300 }"

    def candidates(self, task: str) -> list[Candidate]:
        """Heals what a structural stage before it lost; composed only after one."""
        return [Candidate("distill", {"teacher": "original", "steps": 300}, risk=-1.5, order=60,
                          needs_data=True, heals=True)]

    def defaults_for(self, params: dict[str, Any]) -> dict[str, Any]:
        """With ``lora_rank``, the LoRA defaults too (``lora_alpha``: twice the rank)."""
        if params.get("lora_rank") is None:
            return self.defaults()
        return {**self.defaults(), "lora_alpha": 2 * params["lora_rank"],
                "lora_include": list(BLOCKS), "lora_exclude": []}

    def check(self, params: dict[str, Any]) -> list[tuple[str | None, str]]:
        if params.get("lora_rank") is not None:
            if params.get("train_embeddings"):
                return [("train_embeddings", "with lora_rank only the adapters train; the "
                                             "embeddings stay frozen")]
            return []
        return [(key, f"'{key}' configures LoRA: set lora_rank too")
                for key in LORA[1:] if key in params]

    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        """Distillation changes values, never shapes or codecs (merged adapters, quantized weights
        left on their codecs' grids)."""
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

        from .batches import Batcher, id_map as vocab_map
        from .losses import as_float32
        from .trainable import Trainee, refuse_untrainable

        refuse_untrainable(handle)
        params = {**self.defaults_for(params), **params}
        errors = self.check(params)
        if errors:
            raise SqueezeError(f"distill: {errors[0][1]}")
        seed = int(params["seed"]) if params.get("seed") is not None else int(ctx.seed)
        kind = self._loss_kind(handle.task, params.get("loss", "auto"))
        teacher = _teacher(handle, params.get("teacher", "original"), ctx)
        if teacher.task != handle.task:
            raise SqueezeError(f"distill: the teacher is a '{teacher.task}' model, the student a "
                               f"'{handle.task}' model")
        texts = ctx.data.texts(params["data"])
        id_map = vocab_map(handle.tokenizer, teacher.tokenizer)
        batcher = Batcher(handle, texts, int(params.get("batch_size", 16)),
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
                    t_out = as_float32(t_out)
            s_out = student(**batch, output_hidden_states=want_hidden)
            mask = batch["attention_mask"].bool()
            if handle.task == "embedding":
                s_h, t_h = s_out[0], t_out[0]
                if s_h.shape[-1] == t_h.shape[-1]:
                    loss = (similarity_loss(mean_pool(s_h, mask), mean_pool(t_h, mask), kind)
                            + similarity_loss(s_h[mask], t_h[mask], kind))
                else:  # hidden channels were pruned: match what the vectors are used for
                    loss = (relational_loss(mean_pool(s_h, mask), mean_pool(t_h, mask))
                            + relational_loss(s_h[mask], t_h[mask]))
            else:
                loss = logit_loss(handle.task, s_out.logits, t_out.logits, mask, id_map, kind,
                                  temperature)
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
        lora = None if params.get("lora_rank") is None else {
            "rank": int(params["lora_rank"]), "alpha": float(params["lora_alpha"]),
            "include": params.get("lora_include"), "exclude": params.get("lora_exclude", ())}
        trainee = Trainee(handle, lora, bool(params.get("train_embeddings", False)))
        try:
            trainee.prepare_()
        except BaseException:
            trainee.finish_()
            raise
        steps = int(params.get("steps", 200))
        lr = float(params.get("lr", 3e-4))
        warmup = max(1, steps // 10)
        parallel = str(params.get("parallel", "ddp"))
        deadline = time.monotonic() + float(params["time"]) if params.get("time") else math.inf
        if ranks.size > 1:
            backend = "nccl" if batcher.device.type == "cuda" else "gloo"
            how = ("fully sharded data-parallel (FSDP: weights, gradients and AdamW state "
                   "sharded)" if parallel == "fsdp" else "data-parallel")
            ctx.log(f"distill: {how} on {ranks.size} ranks ({backend})")
        probe = batcher.batch(list(range(min(len(batcher.rows), batcher.batch_size))))
        done, student, trainable, optimizer, scheduler = 0, None, [], None, None
        try:
            if not any(p.requires_grad for p in model.parameters()):
                raise SqueezeError("distill: the model has no trainable parameters")
            with torch.no_grad():
                start_loss = float(loss_of(probe, model))
            with torch.enable_grad(), data_parallel(model, parallel) as student, \
                    ctx.progress(total=steps, desc="distill") as bar:
                # built from what trains: under FSDP, the student's sharded parameters
                trainable = trainee.train_in(student)
                optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
                scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, lambda step: min(1.0, (step + 1) / warmup))
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
                    trainee.keep_zeros_()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4g}")
                    if deadline < math.inf and any_rank(time.monotonic() >= deadline):
                        break
                summary = trainee.describe(trainable, optimizer)
        finally:
            student = None  # the data-parallel wrapper and its gradient hooks go
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            # and, under FSDP, the sharded parameters and their AdamW state with them
            trainable, optimizer, scheduler = [], None, None
            trainee.finish_()  # adapters merged, quantized weights on their grid
            model.eval()
        with torch.no_grad():
            end_loss = float(loss_of(probe, model))
        if widened is not None:
            _restore_dtypes(model, widened)
            ctx.log("distill: trained the float16 model in float32 (master weights), saved back "
                    "as float16")
        trainee.requantize_()
        ctx.log(summary)
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


@hookimpl
def register_techniques(registry: Any) -> None:
    registry.add(Distill())
