"""Calibration for weight compression: statistics of the inputs of linear layers, and GPTQ.

``input_stats`` runs the model over calibration texts with forward pre-hooks on chosen ``Linear`` /
``Conv1D`` modules and accumulates, over the non-padding tokens, the per-input-channel mean ``|x|``
and ``x²`` and optionally the second-moment matrix ``XᵀX / tokens`` (GPTQ's Hessian, up to a
factor). ``gptq_quantize`` is GPTQ (Frantar et al., 2022): columns quantized one at a time, the
rounding error spread over the columns not yet quantized through the inverse Hessian's Cholesky
factor, in blocks, with group-wise symmetric scales that land exactly on ``models.codec``'s grid.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from squeezelang.errors import SqueezeError

if TYPE_CHECKING:
    import torch

    from squeezelang.models.handle import ModelHandle


@dataclass
class InputStats:
    """Input statistics of one linear layer over ``tokens`` calibration tokens: the per-channel
    means in float64, ``XᵀX / tokens`` in float32 (one tensor for the layers reading the same
    input: consumers copy before changing it)."""

    tokens: int
    abs_mean: torch.Tensor
    sq_mean: torch.Tensor
    gram: torch.Tensor | None = None


class _Stop(Exception):
    """Raised by a hook to end a calibration forward pass once the layers of interest have run."""


@contextmanager
def accumulate(modules: Sequence[tuple[str, Any]], sums: dict[str, list[Any]],
               gram: bool) -> Iterator[dict[str, Any]]:
    """Forward pre-hooks on ``modules`` that add their inputs' moments into ``sums`` while the
    block is open. The caller sets ``live["mask"]`` (the batch's attention mask) and
    ``live["seen"] = {}`` before each batch.

    ``XᵀX`` is float32, added to in place. Layers that have read the same inputs in every batch
    so far (q/k/v, gate/up) share one matrix, added to once a batch: a batch's products are added
    when the next batch starts (or the block ends), once it is known who read what; a layer whose
    inputs part from its sharers' gets its own copy first."""
    import torch

    live: dict[str, Any] = {"pending": []}

    def rows_of(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = x[mask] if tuple(x.shape[:2]) == tuple(mask.shape) else x
        return rows.reshape(-1, x.shape[-1]).float()

    def moments(x: torch.Tensor) -> list[Any]:
        """``[x, mask, tokens, Σ|x|, Σx²]`` of one input, shared by the layers reading it."""
        # the entry holds ``x``, so its memory cannot be reused by another input of this batch
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
        if key not in live["seen"]:
            rows = rows_of(x, live["mask"])
            live["seen"][key] = [x, live["mask"], rows.shape[0], rows.abs().sum(0).double(),
                                 rows.pow(2).sum(0).double()]
        return live["seen"][key]

    def add_pending() -> None:
        """Add the pending batch's ``XᵀX`` products, one per input and shared matrix."""
        pending, live["pending"] = live["pending"], []
        if not pending:
            return
        reads: dict[str, list[Any]] = {}
        for name, entry in pending:
            reads.setdefault(name, []).append(entry)
        # layers group by (the matrix they share so far, what they read this batch)
        groups: dict[tuple[Any, ...], list[str]] = {}
        for name in dict.fromkeys([*reads, *(n for n, acc in sums.items() if acc[3] is not None)]):
            held = sums.setdefault(name, [0, 0.0, 0.0, None])[3]
            signature = tuple(id(e) for e in reads.get(name, ()))
            groups.setdefault((id(held) if held is not None else None, signature), []).append(name)
        claimed: set[Any] = set()
        for (held_id, _), names in groups.items():  # new or copied matrices before any adds
            held = sums[names[0]][3]
            if held is None:
                n = reads[names[0]][0][0].shape[-1]
                held = torch.zeros(n, n)
            elif held_id in claimed:
                held = held.clone()
            claimed.add(held_id)
            for name in names:
                sums[name][3] = held
        targets: dict[int, list[Any]] = {}  # input -> the matrices it is added to
        for (_, signature), names in groups.items():
            for e in reads.get(names[0], ()):
                targets.setdefault(id(e), [e, []])[1].append(sums[names[0]][3])
        for e, matrices in targets.values():
            rows = rows_of(e[0], e[1])
            for matrix in matrices:
                matrix.addmm_(rows.t(), rows)

    def flush() -> None:
        # ordinary tensors (not inference ones, whichever mode the batch ran in): ``finish``
        # divides them in place
        with torch.inference_mode(False), torch.no_grad():
            add_pending()

    def hook_for(name: str) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            if live.get("batch") is not live["seen"]:
                flush()
                live["batch"] = live["seen"]
            entry = moments(args[0])
            acc = sums.setdefault(name, [0, 0.0, 0.0, None])
            acc[0] += entry[2]
            acc[1] = acc[1] + entry[3]
            acc[2] = acc[2] + entry[4]
            if gram:
                live["pending"].append((name, entry))
        return hook

    hooks = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules]
    try:
        yield live
        flush()
    finally:
        live["pending"] = []
        for h in hooks:
            h.remove()


def finish(modules: Sequence[tuple[str, Any]], sums: dict[str, list[Any]]) -> dict[str, InputStats]:
    """The accumulated sums as means per module; an error for a module that never ran. Layers
    that shared an ``XᵀX`` get one mean (divided in place: no second matrix)."""
    out = {}
    means: dict[int, Any] = {}
    for name, _ in modules:
        if name not in sums:
            raise SqueezeError(f"calibration: layer '{name}' was never called on the data")
        n, a, s, g = sums[name]
        if g is not None and id(g) not in means:
            means[id(g)] = g.div_(n)
        out[name] = InputStats(n, (a / n).clone(), (s / n).clone(),
                               None if g is None else means[id(g)])
        sums[name][3] = None
    return out


def no_cache(model: Any) -> dict[str, Any]:
    """``use_cache = False`` for a model whose forward takes it: a calibration pass needs no
    key/value cache (and a block run twice would find its own keys there)."""
    import inspect

    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def input_stats(handle: ModelHandle, texts: Sequence[str], modules: Sequence[tuple[str, Any]],
                gram: bool = False, batch_size: int = 16, max_length: int = 128,
                stop_after: Any = None) -> dict[str, InputStats]:
    """Statistics of the inputs of ``modules`` (``[(name, module)]``) over the texts' tokens.

    ``stop_after``: a module (a block) after which each forward pass is cut short, when every
    module of interest lies in it or before it. (To calibrate block after block, changing each,
    ``models.block_inputs.block_stats`` runs every block once instead of the model once per block.)
    """
    import torch

    from squeezelang.models.forward import _batches

    model = handle.model.eval()
    sums: dict[str, list[Any]] = {}

    def stop(*_: Any) -> None:
        raise _Stop

    stopper = stop_after.register_forward_hook(stop) if stop_after is not None else None
    try:
        with accumulate(modules, sums, gram) as live, torch.inference_mode():
            for _, inputs in _batches(handle, list(texts), None, batch_size, max_length):
                live["mask"] = inputs["attention_mask"].bool()
                live["seen"] = {}
                try:
                    model(**inputs, **no_cache(model))
                except _Stop:
                    pass
    finally:
        if stopper is not None:
            stopper.remove()
    return finish(modules, sums)


def gptq_quantize(weight: torch.Tensor, gram: torch.Tensor, bits: int, group: int | None,
                  keep: torch.Tensor | None = None, block: int = 128,
                  damp: float = 0.01) -> torch.Tensor:
    """GPTQ-quantize a ``[out, in]`` float32 weight given ``XᵀX`` of its inputs; return the
    dequantized weight, exactly on the codec grid ``{"quant": {"bits", "axis": 0, "group"}}``.

    Columns are quantized in activation order (largest ``XᵀX`` diagonal first: the inputs that
    carry most energy are rounded while the most columns remain to absorb their error), with
    *static* group scales chosen on the weight before any update, so a group's scale does not
    depend on the order (GPTQ's "act-order" with static groups, as llm-compressor runs it).
    ``keep`` (bool, like ``weight``) pins pruned entries to zero, so sparsity survives. In every
    group the entry of largest ``|w|`` is given the extreme code ``±qmax``: then
    ``max|code| = qmax`` and the codec re-derives the scale from the values.
    (``gptq_rows`` gives the same values a run of rows at a time.)
    """
    import torch

    out = torch.empty(weight.shape, dtype=torch.float32)
    for first, last, values in gptq_rows(weight, gram, bits, group, keep, block, damp):
        out[first:last] = values
    return out


#: Elements of the weight that ``gptq_rows`` works on at a time (each of its temporaries is
#: about this many float32 values): a 32000 x 2048 head is quantized in 16 runs of rows.
GPTQ_CHUNK = 1 << 22


def gptq_rows(weight: torch.Tensor, gram: torch.Tensor, bits: int, group: int | None,
              keep: torch.Tensor | None = None, block: int = 128, damp: float = 0.01,
              chunk: int = GPTQ_CHUNK) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``gptq_quantize`` a run of output rows at a time: yields ``(first, last, values)``, the
    float32 values of rows ``first:last``. Rows are independent given ``XᵀX`` (each is corrected
    only along its own inputs), so the result is the same as in one piece; the inverse Hessian is
    computed once, and no temporary is larger than ``chunk`` elements."""
    import torch

    n_out, n_in = weight.shape
    group = group or n_in
    # float32 (as AutoGPTQ and llm-compressor invert it), with at most two n_in x n_in matrices
    # of its own alive at a time, and none of the caller's once the permuted copy exists (a
    # caller that drops its reference to ``gram`` frees it then: a 5632-input layer's is 127 MB)
    diagonal = gram.diagonal().to(torch.float32, copy=True)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    diagonal.add_(damp * float(diagonal.mean()))
    perm = torch.argsort(diagonal, descending=True, stable=True)
    H = torch.empty(n_in, n_in)
    rows = max(1, chunk // max(n_in, 1))
    for first in range(0, n_in, rows):
        part = perm[first:first + rows]
        H[first:first + rows] = gram.index_select(0, part).index_select(1, perm)
    del gram
    H.diagonal().copy_(diagonal[perm])
    del diagonal
    try:
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        Hinv = torch.linalg.cholesky(H, upper=True)
        del H
    except RuntimeError as exc:
        raise SqueezeError(f"GPTQ: the Hessian is not positive definite ({exc}); more data or "
                           "a larger damping may help") from None
    for first in range(0, n_out, rows):
        last = min(first + rows, n_out)
        part = None if keep is None else keep[first:last]
        yield first, last, _gptq_part(weight[first:last], part, dead, perm, Hinv, bits, group,
                                      block)


def _gptq_part(weight: torch.Tensor, keep: torch.Tensor | None, dead: torch.Tensor,
               perm: torch.Tensor, Hinv: torch.Tensor, bits: int, group: int,
               block: int) -> torch.Tensor:
    """GPTQ on some rows, given the permuted inverse Hessian's Cholesky factor."""
    import torch

    from squeezelang.models import codec

    W = weight.detach().float().clone()
    n_out, n_in = W.shape
    W[:, dead] = 0.0  # inputs never seen: their weights cannot change the calibration outputs
    keep = keep.bool() if keep is not None else None
    if keep is not None:
        W = W * keep
    plans = [_group_plan(W[:, g:g + group], None if keep is None else keep[:, g:g + group], bits)
             for g in range(0, n_in, group)]
    scales = torch.stack([p[0] for p in plans], 1)  # [out, groups]
    forced = torch.cat([p[1] for p in plans], 1)
    force_to = torch.cat([p[2] for p in plans], 1)
    del plans
    # transposed: a column of the weight is a contiguous row here, as the loop reads them
    W = W.t().index_select(0, perm)
    forced, force_to = forced.t().index_select(0, perm), force_to.t().index_select(0, perm)
    col_scale = scales.t().index_select(0, perm // group)
    q = codec.qmax(bits)
    codes = torch.empty(n_in, n_out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the column loop is thousands of small ops: no thread hand-offs
    try:
        for i1 in range(0, n_in, block):
            i2 = min(i1 + block, n_in)
            W1 = W[i1:i2]
            err1 = torch.empty_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                w, s = W1[i], col_scale[col]
                c = torch.where(forced[col], force_to[col], torch.round(w / s).clamp_(-q, q))
                codes[col] = c
                err = (w - c * s).div_(Hinv1[i, i])
                W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
                err1[i] = err
            torch.set_num_threads(threads)  # one large product: all threads
            W[i2:].addmm_(Hinv[i1:i2, i2:].t(), err1, alpha=-1)
            torch.set_num_threads(1)
    finally:
        torch.set_num_threads(threads)
    del W, forced, force_to, col_scale
    codes = codes.index_select(0, torch.argsort(perm)).t().to(torch.int8).contiguous()
    return codec.dequantize(codes, scales.reshape(-1), 0, group)


def _group_plan(ahead: torch.Tensor, keep: torch.Tensor | None,
                bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A group's scales and its forced codes: ``(scales [out], forced [out, g], codes [out, g])``.

    Forced: pruned entries and all-zero rows to 0, each row's largest ``|w|`` to ``±qmax``.
    """
    import torch

    from squeezelang.models import codec

    q = codec.qmax(bits)
    if keep is not None:
        ahead = ahead * keep
    amax, arg = ahead.abs().max(1)
    live = amax > 0
    s = codec.fixed_point_scales(torch.where(live, amax / q, torch.ones_like(amax)), bits)
    forced = torch.zeros_like(ahead, dtype=torch.bool)
    force_to = torch.zeros_like(ahead)
    forced.scatter_(1, arg[:, None], True)
    force_to.scatter_(1, arg[:, None], torch.where(ahead.gather(1, arg[:, None]) < 0, -q, q).float())
    forced |= ~live[:, None]
    force_to[~live] = 0
    if keep is not None:
        forced |= ~keep
        force_to[~keep] = 0
    return s, forced, force_to


def by_block(model: Any, modules: Sequence[tuple[str, Any]]) -> list[tuple[Any, list[tuple[str, Any]]]]:
    """``modules`` grouped by the numbered block that holds them (``model.layers.3``, ``h.0``), in
    the order the blocks run, each with its block module; modules outside any block come last, in
    one group whose block is ``None`` (the forward pass then runs to the end)."""
    import re

    from squeezelang.models.select import get_module

    groups: dict[str | None, list[tuple[str, Any]]] = {}
    for name, module in modules:
        match = re.match(r"^(.*?\.\d+)(?:\.|$)", name)
        groups.setdefault(match.group(1) if match else None, []).append((name, module))
    def order(prefix: str | None) -> tuple[int, ...]:
        if prefix is None:
            return (1 << 30,)
        return tuple(int(n) for n in re.findall(r"\.(\d+)", "." + prefix))
    return [(None if prefix is None else get_module(model, prefix), groups[prefix])
            for prefix in sorted(groups, key=order)]
