"""The built-in ``rotate`` technique: orthogonal rotations fused into the weights (QuaRot-style).

Outlier channels of a decoder's residual stream (a few hidden dimensions far larger than the rest)
make 4-bit weights lose most where the activations are largest. ``rotate`` changes the basis of
the residual stream by an orthogonal matrix ``Q`` — a randomized Hadamard matrix by default, which
spreads every channel evenly over all of them — and folds ``Q`` into the weights, so that the float
model computes the same function and a ``quantize`` stage after it meets weights and activations
without outliers (QuaRot, Ashkboos et al. 2024; SpinQuant's ``R1``/``R2`` without training; the
invariance is SliceGPT's):

1. each RMSNorm's weight is folded into the linear layers that read it (attention norm → ``q``,
   ``k``, ``v`` or ``qkv``; MLP norm → ``gate``/``up`` or ``gate_up``; final norm → the output
   layer) and set to 1 (a ``rmsnorm_one_plus`` norm, ``x · (1 + w)``: ``w = 0``), after which they
   commute with ``Q``;
2. the token embedding becomes ``E Q``, the layers reading the stream ``W Q``, the layers writing
   to it (attention and MLP output projections) ``Qᵀ W`` with their biases;
3. with ``heads = true`` (the default), each attention head's values are rotated by a
   ``head_dim`` Hadamard matrix ``H`` and the output projection's matching inputs by ``Hᵀ``.

The matrices (``hadamard.py``): ``kind = "hadamard"`` is ``diag(±1) · H / √n`` with Sylvester,
Paley and Kronecker constructions covering the powers of two and sizes such as 896, 2304, 3072,
5120; a size none covers falls back to a random orthogonal matrix (QR of a Gaussian), which the
log says; ``kind = "random"`` always uses one. Both are drawn from ``seed``.

Precision: every weight is transformed once in float64 and rounded back to its dtype, so a
float32 model's logits match to float32 rounding, and a bfloat16/float16 checkpoint, stored in
its own dtype, differs from the original by one rounding of each weight only.

Where it applies (from the model's family, ``fuse.refusal``): pre-norm RMSNorm decoders whose
blocks have only input norms — the built-in llama, mistral, qwen2, qwen3 and phi3 families —
loaded as causal LMs. ``squeeze check`` and ``squeeze plan`` refuse LayerNorm models (GPT-2; its
mean subtraction does not commute with a rotation), post-norm encoders (BERT, RoBERTa) and
Gemma 2/3, whose blocks also normalise each sublayer's output before the residual add: such a
norm's weight cannot absorb ``Q`` (SpinQuant's authors say the same of Gemma 2), so the rotation
would have to run online, which this stage does not do.

Tied embeddings: after folding the final norm into the output layer it no longer equals ``E Q``,
so a tied output layer is untied: the saved file grows by one ``vocab × hidden`` matrix in the
checkpoint's dtype (the estimate adds exactly that tensor, the log says so); a later ``quantize``
stage stores it like any linear layer.

The rotated model is a standard checkpoint of the same architecture (no edit record, no codec):
it saves, reloads and exports like the original. ``rotate`` must come before ``quantize``, before
sparse pruning, clustering, shared layers and factorization (it would leave their codes, zeros or
structure): ``squeeze check`` refuses it after them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from squeezelang.plugin import ModuleMeta, SqueezeError, Technique, TensorMeta, hookimpl
from squeezelang_plugins.rotate.fuse import TASK, refusal, rotate_, task_refusal
from squeezelang_plugins.rotate.hadamard import KINDS, rotation

if TYPE_CHECKING:
    from squeezelang.plugin import ModelFamily, ModelHandle, ModelMeta, StageContext


def _tie_pairs(fam: ModelFamily, meta: ModelMeta) -> list[tuple[str, str]]:
    """``(head tensor, embedding tensor)`` pairs that are one tensor when the model is tied: the
    family layout's ties for the task, else ``lm_head.weight`` and the token embedding."""
    layout = fam.layout
    if layout is not None and meta.task in layout.tasks:
        base = f"{layout.prefix}."
        return [(a.format(base=base), b.format(base=base)) for a, b in layout.tasks[meta.task].ties]
    suffix = f"{fam.embeddings[0]}.weight"
    embedding = next((n for n in meta.tensors if n == suffix or n.endswith(f".{suffix}")), suffix)
    return [("lm_head.weight", embedding)]


class Rotate(Technique):
    name = "rotate"
    description = (
        "Rotate a decoder's residual stream by an orthogonal matrix fused into the weights "
        "(QuaRot-style randomized Hadamard): the float model is unchanged and outlier channels "
        "are spread out before a later 4-bit quantize stage (it helps where the residual stream "
        "has outliers). Folds the RMSNorm weights into "
        "the layers that read them and unties a tied output layer (the file grows by one "
        "vocab × hidden matrix). Pre-norm RMSNorm decoders (llama, mistral, qwen2, qwen3, phi3) "
        "loaded as causal LMs; place it before quantize.")
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "kind": {"type": "string", "enum": list(KINDS), "default": "hadamard",
                     "description": "\"hadamard\": a randomized Hadamard matrix diag(±1)·H/√n "
                                    "(a random orthogonal one for sizes without a Hadamard "
                                    "construction); \"random\": a random orthogonal matrix."},
            "seed": {"type": "integer", "minimum": 0, "default": 0,
                     "description": "seed of the random signs (or the random matrix)."},
            "heads": {"type": "boolean", "default": True,
                      "description": "also rotate each attention head's values by a head_dim "
                                     "Hadamard matrix and the output projection's inputs back."},
        },
    }
    produces = frozenset()
    refuses = frozenset({"quantized", "sparse", "clustered", "shared", "factorized"})
    example = 'stage r: rotate { kind = "hadamard", seed = 0 }'

    def family_needs(self, params: dict[str, Any]) -> list[str]:
        return ["rotate"]

    def _refuse(self, fam: ModelFamily, task: str) -> None:
        """Refuse a family (declared in its ``unsupported``, or found from its structure) or task."""
        fam.require("rotate")
        reason = refusal(fam)
        if reason:
            raise SqueezeError(f"rotate is not supported on model family '{fam.name}': {reason}")
        reason = task_refusal(task)
        if reason:
            raise SqueezeError(f"rotate needs a {TASK} model: {reason}")

    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        """Exact: no shape changes; a tied output layer gets its own tensor, shaped and typed like
        the token embedding (the only growth), and the config says it is untied."""
        from squeezelang.plugin import family_of

        out = meta.copy()
        fam = family_of(out.config)
        self._refuse(fam, out.task)
        for head, embedding in _tie_pairs(fam, out):
            if head in out.tensors or embedding not in out.tensors:
                continue
            source = out.tensors[embedding]
            out.tensors[head] = TensorMeta(tuple(source.shape), source.dtype)
            module = head.rsplit(".", 1)[0]
            out.modules[module] = ModuleMeta(module, "Linear", [head])
            out.config["tie_word_embeddings"] = False
            out.notes.append(f"rotate: unties '{head}' from '{embedding}' (the folded final norm "
                             f"makes them differ): +{source.numel:,} weights")
        return out

    def apply_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        from squeezelang.plugin import family_of

        params = {**self.defaults(), **params}
        fam = family_of(handle.config)
        self._refuse(fam, handle.task)
        states = sorted(self.refuses & set(handle.states))
        if states:
            raise SqueezeError(f"rotate: the model is already {states[0]}; rotate before that stage")
        dims = fam.sizes(handle.config)
        kind, seed = params["kind"], int(params["seed"])
        q, how = rotation(dims["hidden"], kind, seed)
        head_q, head_how = (rotation(dims["head_dim"], kind, seed + 1) if params["heads"]
                            else (None, ""))
        done = rotate_(handle.model, q, head_q, handle.codecs)
        if done.untied:
            vocab, hidden = handle.model.get_output_embeddings().weight.shape
            ctx.log(f"untied '{done.untied}' from the token embedding (the final norm is folded "
                    f"into it): the file grows by {vocab} × {hidden} weights")
        ctx.log(f"folded {done.norms} norms into {done.readers} layers; rotated the residual stream "
                f"(hidden {dims['hidden']}) by a {how} matrix: {done.embeddings} embedding(s), "
                f"{done.readers} readers, {done.writers} writers")
        if head_q is not None:
            ctx.log(f"rotated the values of {done.values} attention layers per head "
                    f"(head_dim {dims['head_dim']}, {head_how})")


@hookimpl
def register_techniques(registry: Any) -> None:
    registry.add(Rotate())
