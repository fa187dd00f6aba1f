"""Fuse a pre-norm RMSNorm decoder's norms into their readers, then rotate its residual stream.

Computational invariance (SliceGPT, QuaRot): with every hidden-wide norm reduced to a plain
``x / rms(x)`` (its weight folded into the linear layers that read it), an orthogonal ``Q`` commutes
with the norm (``rms(x Q) = rms(x)``), so the whole residual stream can live in the basis ``x Q``:

* the token embedding ``E ← E Q``;
* every linear layer reading the stream (through a norm) ``W ← W diag(g) Q``: the attention
  projections, the MLP inputs and the output layer (after the final norm);
* every linear layer writing to it ``W ← Qᵀ W`` (and its bias ``b ← Qᵀ b``): the attention output
  and MLP output projections.

Optionally each attention head's values are rotated too by a ``head_dim`` orthogonal ``H`` (the
value rows of every key/value head ``← Hᵀ ·``, the output projection's input columns of every query
head ``← · H``): the attention mixes values per channel, so that is exact as well.

Where a norm feeds which layers comes from the model's family (``scale_pairs``, built on its
``input_norms``), the writers from its ``o`` and ``mlp_out`` roles, the embeddings and the final
norm from its ``embeddings`` and ``final_norm``. ``refusal`` says, from the same data, which
families cannot be rotated offline.

Every weight is transformed once, in float64 from its stored values, and rounded back to its dtype:
a float32 model computes the same function up to float32 rounding, a bfloat16/float16 one up to
one rounding of each weight to its dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from squeezelang.plugin import SqueezeError

if TYPE_CHECKING:
    import torch

    from squeezelang.plugin import ModelFamily

#: An operation on a weight as float64 ``[out, in]``: ``"right"`` mixes its input columns,
#: ``"left"`` its output rows (and the bias the same way, as a column).
Op = tuple[str, "Callable[[torch.Tensor], torch.Tensor]"]

TASK = "causal-lm"


def refusal(fam: ModelFamily) -> str | None:
    """Why the residual stream of ``fam``'s models cannot be rotated offline, or ``None``."""
    if fam.norm_kind == "layernorm":
        return ("its norms are LayerNorms, whose mean subtraction does not commute with a rotation "
                "(converting them to RMSNorm, as SliceGPT does, is not implemented)")
    if not fam.input_norms:
        return ("its blocks are post-norm: each norm's output is also the residual stream, so "
                "there is no norm-free stream to rotate")
    inputs = dict(fam.input_norms)
    if set(inputs.values()) != {"attention", "mlp"}:
        return "its input_norms do not name a norm before both the attention and the MLP"
    others = [n for n in fam.norms if n not in inputs]
    if others:
        return (f"its blocks also normalise each sublayer's output before the residual add "
                f"({', '.join(others)}): such a norm's weight cannot absorb the rotation, which "
                "would have to run online")
    if fam.embedding_norm:
        return (f"its embeddings pass through a norm ({fam.embedding_norm}) before the residual "
                "stream, whose weight cannot absorb the rotation")
    return None


def task_refusal(task: str) -> str | None:
    """Why a model of ``task`` cannot be rotated, or ``None``."""
    if task != TASK:
        return (f"it rotates a causal LM's residual stream into its output layer; a {task} "
                "model's hidden states would come out rotated")
    return None


@dataclass
class Rotated:
    """What ``rotate_`` changed, for the stage's log."""

    norms: int = 0
    readers: int = 0
    writers: int = 0
    values: int = 0
    embeddings: int = 0
    untied: str | None = None


def _gain(norm: Any, kind: str) -> tuple[torch.Tensor | None, Callable[[], None]]:
    """The norm's per-channel gain (float64; ``None``: it has no weight) and how to reset it."""
    import torch

    if getattr(norm, "bias", None) is not None:
        raise SqueezeError(f"rotate: norm {type(norm).__name__} has a bias; only RMSNorms fold")
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None, lambda: None
    one_plus = kind == "rmsnorm_one_plus"
    gain = weight.detach().double() + (1.0 if one_plus else 0.0)
    return gain, lambda: weight.data.fill_(0.0 if one_plus else 1.0)


def _scaled(gain: torch.Tensor | None) -> list[Op]:
    return [] if gain is None else [("right", lambda m: m * gain.to(m.device)[None, :])]


def _heads_left(h: torch.Tensor, rows: tuple[int, int] | None) -> Op:
    """Each ``head_dim`` run of output rows (within ``rows``) ``← Hᵀ ·`` (values: ``v ← v H``)."""
    import torch

    d = h.shape[0]

    def op(m: torch.Tensor) -> torch.Tensor:
        start, stop = rows or (0, m.shape[0])
        part = m[start:stop].reshape(-1, d, m.shape[1])
        out = m.clone()
        mixed = torch.einsum("de,kdi->kei", h.to(m.device), part)
        out[start:stop] = mixed.reshape(stop - start, m.shape[1])
        return out

    return ("left", op)


def _heads_right(h: torch.Tensor) -> Op:
    """Each ``head_dim`` run of input columns ``← · H`` (the output projection reads ``v H``)."""
    d = h.shape[0]

    def op(m: torch.Tensor) -> torch.Tensor:
        return (m.reshape(m.shape[0], -1, d) @ h.to(m.device)).reshape(m.shape[0], -1)

    return ("right", op)


def _transform_(module: Any, ops: list[Op]) -> None:
    """Apply ``ops`` to the module's weight (and a left op to its bias) in float64; round once."""
    import torch

    from squeezelang.plugin import kind_of, output_axis

    weight = module.weight
    transposed = output_axis(kind_of(module)) == 1  # Conv1D stores [in, out]
    m = weight.detach().double()
    m = m.t() if transposed else m
    bias = getattr(module, "bias", None)
    b = bias.detach().double()[:, None] if isinstance(bias, torch.Tensor) else None
    for side, op in ops:
        m = op(m)
        if side == "left" and b is not None:
            b = op(b)
    weight.data.copy_((m.t() if transposed else m).to(weight.dtype))
    if b is not None:
        bias.data.copy_(b[:, 0].to(bias.dtype))


def _untie_(model: Any, head: Any, embedding: Any) -> None:
    import torch

    head.weight = torch.nn.Parameter(embedding.weight.detach().clone(),
                                     requires_grad=embedding.weight.requires_grad)
    configs = (model.config, model.config.get_text_config())
    for config in {id(c): c for c in configs}.values():
        config.tie_word_embeddings = False


def rotate_(model: Any, q: torch.Tensor, head_q: torch.Tensor | None = None,
            codecs: dict[str, Any] | None = None) -> Rotated:
    """Fold the norms of ``model`` (a causal LM of a family ``refusal`` accepts) into their readers
    and rotate its residual stream by the orthogonal float64 ``q`` (``hidden × hidden``), and each
    head's values by ``head_q`` (``head_dim × head_dim``) when given. A tied output layer is untied
    first (``Rotated.untied`` names it). ``codecs``: the handle's; a weight that already has one is
    refused before anything changes."""
    from squeezelang.plugin import family_of, get_module, get_path, layer_modules, scale_pairs

    fam = family_of(model.config)
    reason = refusal(fam)
    if reason:
        raise SqueezeError(f"rotate: model family '{fam.name}': {reason}")
    base = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise SqueezeError("rotate: the model has no output layer: " + str(task_refusal("embedding")))
    names = {id(m): n for n, m in model.named_modules()}
    ops: dict[str, list[Op]] = {}
    resets: list[Callable[[], None]] = []
    done = Rotated()

    def add(module: Any, *more: Op) -> None:
        ops.setdefault(names[id(module)], []).extend(more)

    rotate_in: Op = ("right", lambda m: m @ q.to(m.device))  # the weight's device (a device map)
    rotate_out: Op = ("left", lambda m: q.to(m.device).t() @ m)
    pairs = scale_pairs(model)
    norm_pairs = [p for p in pairs if p.norm_kind is not None]
    value_pairs = [p for p in pairs if p.norm_kind is None and p.consumers[0].endswith(f".{fam.o}")]
    for pair in norm_pairs:
        gain, reset = _gain(get_module(model, pair.producer), pair.norm_kind)
        for consumer in pair.consumers:
            add(get_module(model, consumer), *_scaled(gain), rotate_in)
            done.readers += 1
        resets.append(reset)
        done.norms += 1
    if head_q is not None:
        for pair in value_pairs:
            add(get_module(model, pair.producer), _heads_left(head_q, pair.rows))
            add(get_module(model, pair.consumers[0]), _heads_right(head_q))
            done.values += 1
    for block in layer_modules(model):
        for role in (fam.o, fam.mlp_out):
            add(get_path(block, role), rotate_out)
            done.writers += 1
    embeddings = [get_path(base, e) for e in fam.embeddings]
    for table in embeddings:
        add(table, rotate_in)
        done.embeddings += 1
    final = get_path(base, fam.final_norm) if fam.final_norm else None
    gain, reset = _gain(final, fam.norm_kind) if final is not None else (None, lambda: None)
    add(head, *_scaled(gain), rotate_in)
    resets.append(reset)
    done.norms += final is not None
    done.readers += 1

    tied = head.weight is embeddings[0].weight
    modules = {name: model.get_submodule(name) for name in ops}
    _refuse_shared(modules, tied, names[id(head)])
    coded = sorted(f"{name}.{t}" for name, module in modules.items() for t in ("weight", "bias")
                   if (codecs or {}).get(f"{name}.{t}"))
    if coded:
        raise SqueezeError(f"rotate: '{coded[0]}' is already encoded ({codecs[coded[0]]}); "
                           "rotating would leave its codec's grid — rotate before quantizing, "
                           "pruning or clustering")
    if tied:
        _untie_(model, head, embeddings[0])
        done.untied = names[id(head)]
    for name, module in modules.items():
        _transform_(module, ops[name])
    for reset in resets:
        reset()
    return done


def _refuse_shared(modules: dict[str, Any], tied: bool, head: str) -> None:
    """A weight reached under two names (shared blocks) would be rotated twice: refuse it."""
    seen: dict[int, str] = {}
    for name, module in modules.items():
        key = id(module.weight)
        if key in seen and not (tied and head in (name, seen[key])):
            raise SqueezeError(f"rotate: '{name}' shares its weight with '{seen[key]}'; rotate "
                               "before sharing layers")
        seen[key] = name
