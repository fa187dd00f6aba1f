"""The state-dict work of structured surgery: select the kept rows and columns, role by role.

``surgery.reshape_`` decides *what* is kept; this module knows *where* it lives, reading every
module name and weight orientation from the model's ``ModelFamily`` (``squeezelang.hooks.family``).
Nothing here names a module of a particular architecture.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from squeezelang.errors import SqueezeError

if TYPE_CHECKING:
    import torch

    from squeezelang.hooks.family import ModelFamily


class WeightState:
    """A state dict plus the family's weight orientation: select output or input features."""

    def __init__(self, state: dict[str, torch.Tensor], conv1d: bool) -> None:
        self.state = state
        self.conv1d = conv1d

    def sel(self, key: str, dim: int, idx: torch.Tensor) -> None:
        if key in self.state:
            self.state[key] = self.state[key].index_select(dim, idx)

    def out(self, name: str, idx: torch.Tensor) -> None:
        """Keep the output features ``idx`` of the projection ``name`` (weight and bias)."""
        self.sel(f"{name}.weight", 1 if self.conv1d else 0, idx)
        self.sel(f"{name}.bias", 0, idx)

    def inp(self, name: str, idx: torch.Tensor) -> None:
        """Keep the input features ``idx`` of the projection ``name``."""
        self.sel(f"{name}.weight", 0 if self.conv1d else 1, idx)

    def vec(self, name: str, idx: torch.Tensor) -> None:
        """Keep the channels ``idx`` of a norm (weight and bias, when there is one)."""
        self.sel(f"{name}.weight", 0, idx)
        self.sel(f"{name}.bias", 0, idx)

    def out_major(self, name: str) -> torch.Tensor:
        """The weight of ``name`` as ``[out, in]`` whatever its storage."""
        w = self.state[f"{name}.weight"]
        return w.t() if self.conv1d else w

    def scale_out(self, name: str, stop: int, factor: float) -> None:
        """Multiply the first ``stop`` output features of ``name`` by ``factor``."""
        w = self.state[f"{name}.weight"]
        (w[:, :stop] if self.conv1d else w[:stop]).mul_(factor)
        bias = self.state.get(f"{name}.bias")
        if bias is not None:
            bias[:stop].mul_(factor)


def head_rows(heads: Sequence[int], d: int) -> torch.Tensor:
    """The rows of the attention inner dimension belonging to ``heads`` (each ``d`` wide)."""
    import torch

    return torch.tensor([h * d + j for h in heads for j in range(d)], dtype=torch.long)


def slice_block_(fam: ModelFamily, ws: WeightState, p: str, cur: dict[str, int],
                 kept_q: list[int], neurons: torch.Tensor, hid: torch.Tensor, new_d: int) -> None:
    """Slice one block (state-dict prefix ``p``): heads, MLP neurons and hidden channels."""
    import torch

    d, n_q, n_kv = cur["head_dim"], cur["heads"], cur["kv_heads"]
    group = n_q // n_kv
    groups = sorted({h // group for h in kept_q})
    if new_d != d:  # a tied head dimension shrinking with the hidden size (no GQA there)
        q_rows, v_rows = _tied_head_dims(fam, ws, p, cur, kept_q, new_d)
        k_rows, o_cols = q_rows, v_rows
    else:
        q_rows, k_rows = head_rows(kept_q, d), head_rows(groups, d)
        v_rows, o_cols = k_rows, q_rows
    if fam.qkv is not None:
        ws.out(p + fam.qkv, torch.cat([q_rows, k_rows + n_q * d, v_rows + (n_q + n_kv) * d]))
        ws.inp(p + fam.qkv, hid)
        q_name = fam.qkv
    else:
        for name, rows in ((fam.q, q_rows), (fam.k, k_rows), (fam.v, v_rows)):
            ws.out(p + name, rows)
            ws.inp(p + name, hid)
        q_name = fam.q
    if new_d != d:  # keep the attention temperature 1 / sqrt(head_dim) of the original
        ws.scale_out(p + q_name, len(q_rows), (new_d / d) ** 0.5)
    ws.inp(p + fam.o, o_cols)
    ws.out(p + fam.o, hid)
    if fam.mlp_fused is not None:
        ws.out(p + fam.mlp_fused, torch.cat([neurons, neurons + cur["inner"]]))
        ws.inp(p + fam.mlp_fused, hid)
    for name in fam.mlp_in:
        ws.out(p + name, neurons)
        ws.inp(p + name, hid)
    ws.inp(p + fam.mlp_out, neurons)
    ws.out(p + fam.mlp_out, hid)
    for norm in fam.norms:
        ws.vec(p + norm, hid)


def _tied_head_dims(fam: ModelFamily, ws: WeightState, p: str, cur: dict[str, int],
                    kept: list[int], new_d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows kept for queries/keys and for values when each head's dimension shrinks to ``new_d``."""
    import torch

    d, width = cur["head_dim"], cur["heads"] * cur["head_dim"]
    if fam.qkv is not None:
        w = ws.out_major(p + fam.qkv)
        wq, wk, wv = w[:width], w[width:2 * width], w[2 * width:]
    else:
        wq, wk, wv = (ws.out_major(p + name) for name in (fam.q, fam.k, fam.v))
    wo = ws.out_major(p + fam.o).t()                      # [attention inner, hidden]
    # q·k sums products over a head's dims: keep dims where both rows are large; v dims feed wo.
    qk_score = wq.norm(dim=1) * wk.norm(dim=1)
    v_score = wv.norm(dim=1) * wo.norm(dim=1)
    qk_rows, v_rows = [], []
    for h in kept:
        span = slice(h * d, (h + 1) * d)
        qk_rows += [h * d + j for j in _top(qk_score[span], new_d)]
        v_rows += [h * d + j for j in _top(v_score[span], new_d)]
    return torch.tensor(qk_rows, dtype=torch.long), torch.tensor(v_rows, dtype=torch.long)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(int(i) for i in scores.topk(k).indices)


def slice_outside_(fam: ModelFamily, model: Any, ws: WeightState, pre: str, width: int,
                   hid: torch.Tensor) -> None:
    """Slice the hidden axis of embeddings, their norm, the final norm and the task heads.

    The embeddings and norms are found by role; the pooler and task heads (classifier, prediction
    head, untied output layer), which no family names, by module kind and width.
    """
    named = [*fam.embeddings, *(n for n in (fam.embedding_norm, fam.final_norm) if n)]
    for emb in fam.embeddings:
        ws.sel(f"{pre}{emb}.weight", 1, hid)
    for norm in (fam.embedding_norm, fam.final_norm):
        if norm:
            ws.vec(pre + norm, hid)
    skip = (f"{pre}{fam.blocks}.", *(f"{pre}{n}." for n in named))
    state = ws.state
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if not name or prefix.startswith(skip):
            continue
        w, b = f"{prefix}weight", f"{prefix}bias"
        if w not in state:
            continue
        if hasattr(module, "in_features"):  # a Linear
            if module.in_features == width:
                state[w] = state[w].index_select(1, hid)
            if module.out_features == width:
                state[w] = state[w].index_select(0, hid)
                if b in state:
                    state[b] = state[b].index_select(0, hid)
        elif hasattr(module, "embedding_dim"):
            if module.embedding_dim == width:
                state[w] = state[w].index_select(1, hid)
        elif tuple(state[w].shape) == (width,):  # a norm (LayerNorm, RMSNorm) over the hidden axis
            state[w] = state[w].index_select(0, hid)
            if b in state:
                state[b] = state[b].index_select(0, hid)
    # Anything still as wide as the old hidden size outside the blocks is a tensor we missed.
    for key, value in list(state.items()):
        if key.endswith("weight") and value.dim() == 2 and value.shape[1] == width and \
                not key.startswith(skip):
            raise SqueezeError(f"cannot tell how to shrink '{key}' {tuple(value.shape)} of a "
                               f"'{fam.name}' model")


def renumber_layers(state: dict[str, torch.Tensor], stack: str,
                    kept: Sequence[int]) -> dict[str, torch.Tensor]:
    """The state dict with the blocks under ``stack`` (``"model.layers."``) kept and renumbered."""
    new_of = {int(old): new for new, old in enumerate(kept)}
    renamed = {}
    for key, value in state.items():
        if key.startswith(stack):
            num, _, rest = key[len(stack):].partition(".")
            if int(num) not in new_of:
                continue
            key = f"{stack}{new_of[int(num)]}.{rest}"
        renamed[key] = value
    return renamed
