"""The built-in ``share`` technique: fewer distinct weights — clustered values, tied heads, shared layers.

``method = "cluster"`` (weight sharing, Han et al., 2016) replaces each selected weight's values by
the nearest of ``2**bits`` centroids found by 1-D k-means (Lloyd iterations from quantile starts);
the file stores ``bits``-bit indices plus a float32 codebook per tensor (the ``cluster`` codec).
``method = "tie"`` makes a causal LM's untied output layer reuse the input embedding matrix
(``tie_word_embeddings``), so the file keeps one vocabulary matrix instead of two.
``method = "cross_layer"`` (ALBERT, Lan et al., 2020) lets runs of consecutive transformer blocks
share one set of parameters: each group's members are averaged into its first block (the
representative) and then point at its tensors; the file stores each group once and an edit record
lets ``rebuild_`` re-tie the blocks when the model is loaded back.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Iterable

from squeezelang.plugin import BLOCKS, LINEAR_KINDS, Knob, SqueezeError, Technique, hookimpl

if TYPE_CHECKING:
    import torch

    from squeezelang.plugin import ModelHandle, ModelMeta, StageContext

CLUSTER_KINDS = LINEAR_KINDS + ("Embedding",)
#: Parameters each method reads (``method`` aside).
USES: dict[str, tuple[str, ...]] = {
    "cluster": ("bits", "iterations", "include", "exclude"),
    "tie": (),
    "cross_layer": ("threshold", "groups", "average"),
}
#: Elements assigned to centroids at a time (bounds the temporary index tensors of big embeddings).
CHUNK = 1 << 22
_NUMBERED = re.compile(r"^(.+?)\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------- cluster
def kmeans_1d(values: torch.Tensor, k: int, iterations: int = 15) -> torch.Tensor:
    """Sorted float32 centroids of Lloyd's k-means on the values of a tensor (at most ``k``).

    In one dimension the clusters are runs of the sorted values between centroid midpoints, so each
    iteration is a ``searchsorted`` plus prefix sums — deterministic, and no ``n × k`` distances.
    """
    import torch

    x = torch.sort(values.detach().reshape(-1).to(torch.float64)).values
    n = x.numel()
    if n == 0:
        return torch.zeros(1, dtype=torch.float32)
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(x, 0)])
    starts = ((torch.arange(k, dtype=torch.float64) + 0.5) / k * n).long().clamp(max=n - 1)
    centroids = x[starts]
    cuts = None
    for _ in range(iterations):
        new_cuts = torch.searchsorted(x, (centroids[1:] + centroids[:-1]) / 2)
        if cuts is not None and torch.equal(new_cuts, cuts):
            break
        cuts = new_cuts
        edges = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([n])])
        counts = (edges[1:] - edges[:-1]).to(torch.float64)
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids).sort().values
    return torch.unique(centroids.to(torch.float32), sorted=True)


def cluster_weight_(weight: torch.Tensor, bits: int, iterations: int = 15) -> torch.Tensor:
    """Replace ``weight``'s values in place by their nearest of ``2**bits`` k-means centroids."""
    import torch

    # on the weight's own grid (bf16, fp16): the stored float32 codebook then decodes exactly
    centroids = torch.unique(kmeans_1d(weight, 2 ** bits, iterations).to(weight.dtype)).to(weight.dtype)
    mids = ((centroids[1:].double() + centroids[:-1].double()) / 2)
    flat = weight.data.view(-1) if weight.is_contiguous() else None
    with torch.no_grad():
        if flat is None:
            weight.copy_(centroids[torch.bucketize(weight.double(), mids)])
            return weight
        for start in range(0, flat.numel(), CHUNK):
            part = flat[start:start + CHUNK]
            part.copy_(centroids[torch.bucketize(part.double(), mids)])
    return weight


# ---------------------------------------------------------------------------- cross_layer
def find_blocks(names: Iterable[str]) -> tuple[str, dict[int, list[str]]]:
    """The numbered blocks of a model: ``(prefix, {index: [tensor names after "prefix.index."]})``.

    Among the dotted prefixes followed by an index (``encoder.layer``, ``transformer.h``,
    ``model.layers``), the one holding the most tensors over at least two indices.
    """
    found: dict[str, dict[int, list[str]]] = {}
    for name in names:
        m = _NUMBERED.match(name)
        if m:
            found.setdefault(m[1], {}).setdefault(int(m[2]), []).append(m[3])
    found = {p: layers for p, layers in found.items() if len(layers) >= 2}
    if not found:
        raise SqueezeError("share cross_layer: the model has no numbered transformer blocks")
    prefix = max(found, key=lambda p: sum(len(v) for v in found[p].values()))
    return prefix, dict(sorted(found[prefix].items()))


def even_groups(layers: list[int], groups: int) -> list[list[int]]:
    """``layers`` cut into ``groups`` consecutive runs of near-equal length (longer runs first)."""
    if not 1 <= groups <= len(layers):
        raise SqueezeError(f"share cross_layer: groups = {groups}, but the model has "
                           f"{len(layers)} blocks")
    size, extra = divmod(len(layers), groups)
    out, start = [], 0
    for g in range(groups):
        end = start + size + (1 if g < extra else 0)
        out.append(layers[start:end])
        start = end
    return out


def _signature(shapes: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted((k, tuple(v)) for k, v in shapes.items()))


def _check_compatible(prefix: str, groups: list[list[int]],
                      shapes: dict[int, dict[str, Any]]) -> None:
    for group in groups:
        for member in group[1:]:
            if _signature(shapes[member]) != _signature(shapes[group[0]]):
                raise SqueezeError(f"share cross_layer: blocks {prefix}.{group[0]} and "
                                   f"{prefix}.{member} hold different tensors or shapes; they "
                                   "cannot share one copy")


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest relative Frobenius distance ``‖a−b‖/‖b‖`` over the blocks' weight matrices."""
    keys = [k for k in b if b[k].ndim >= 2] or list(b)
    worst = 0.0
    for k in keys:
        ref = b[k].double()
        worst = max(worst, float((a[k].double() - ref).norm() / ref.norm().clamp_min(1e-30)))
    return worst


def _tie_block_(member: Any, rep: Any) -> None:
    """Point every parameter and persistent buffer of ``member`` at ``rep``'s counterpart."""
    for sub_name, sub in member.named_modules():
        twin = rep.get_submodule(sub_name) if sub_name else rep
        for pname, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[pname] = twin._parameters[pname]
        for bname, buf in list(sub._buffers.items()):
            if buf is not None and bname not in sub._non_persistent_buffers_set:
                sub._buffers[bname] = twin._buffers[bname]


# ---------------------------------------------------------------------------- tie
def _vocab_names(meta: ModelMeta) -> tuple[str | None, str | None]:
    """Input embedding and output layer tensor names of a meta (by kind and vocabulary shape)."""
    vocab = meta.config.get("vocab_size")
    embeddings = [f"{m.name}.weight" for m in meta.modules.values()
                  if m.kind == "Embedding" and f"{m.name}.weight" in meta.tensors
                  and meta.tensors[f"{m.name}.weight"].shape[0] == vocab]
    if not embeddings:
        return None, None
    shape = meta.tensors[embeddings[0]].shape
    heads = [f"{m.name}.weight" for m in meta.modules.values()
             if m.kind == "Linear" and f"{m.name}.weight" in meta.tensors
             and meta.tensors[f"{m.name}.weight"].shape == shape]
    head = "lm_head.weight" if "lm_head.weight" in heads else (heads[-1] if heads else None)
    return embeddings[0], head


def _drop_tensors(meta: ModelMeta, names: set[str]) -> None:
    for name in names:
        meta.tensors.pop(name, None)
    for mod_name in list(meta.modules):
        mod = meta.modules[mod_name]
        mod.tensors = [t for t in mod.tensors if t not in names]
        if not mod.tensors:
            del meta.modules[mod_name]


# ---------------------------------------------------------------------------- technique
class Share(Technique):
    name = "share"
    description = (
        "Store fewer distinct weights. method \"cluster\": k-means each selected weight into "
        "2^bits shared values, stored as bits-bit indices plus a small codebook (about bits/32 of "
        "float32). method \"tie\": a causal LM's output layer reuses the input embedding matrix. "
        "method \"cross_layer\": consecutive transformer blocks share one set of parameters "
        "(ALBERT style); `groups` sets how many distinct blocks remain, or `threshold` groups "
        "blocks whose weights are that close. cross_layer loads with squeezelang.load only.")
    methods = ("cluster", "tie", "cross_layer")
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "method": {"type": "string", "enum": list(methods), "default": "cluster",
                       "description": "\"cluster\" (k-means weight sharing), \"tie\" (output layer "
                                      "= input embedding) or \"cross_layer\" (shared blocks)."},
            "bits": {"type": "integer", "minimum": 2, "maximum": 8, "default": 4,
                     "description": "cluster only: each tensor keeps 2^bits distinct values."},
            "iterations": {"type": "integer", "minimum": 1, "maximum": 100, "default": 15,
                           "description": "cluster only: Lloyd iterations at most."},
            "include": {"type": "array", "items": {"type": "string"}, "default": list(BLOCKS),
                        "description": "cluster only: globs of linear layers and embeddings to "
                                       "cluster (default: the numbered transformer blocks)."},
            "exclude": {"type": "array", "items": {"type": "string"}, "default": [],
                        "description": "cluster only: globs of module names to leave alone."},
            "threshold": {"type": "number", "exclusiveMinimum": 0, "default": 0.5,
                          "description": "cross_layer only: a block joins the previous block's "
                                         "group when every weight matrix is within this relative "
                                         "Frobenius distance of the group's first block. "
                                         "Exclusive with `groups`."},
            "groups": {"type": "integer", "minimum": 1,
                       "description": "cross_layer only: distinct blocks to keep; the blocks are "
                                      "cut into this many consecutive, near-equal groups."},
            "average": {"type": "boolean", "default": True,
                        "description": "cross_layer only: a group's shared block is the mean of "
                                       "its blocks (false: its first block as is)."},
        },
    }
    knobs = (Knob("bits", 2, 8, compresses="down", integer=True,
                  description="bits of a cluster index (2^bits shared values per tensor)"),)
    produces = frozenset({"clustered", "shared"})
    refuses = frozenset({"quantized"})
    example = 'stage cluster: share { method = "cluster", bits = 4 }'

    # ------------------------------------------------------------------ parameters
    def _method(self, params: dict[str, Any]) -> str:
        return params.get("method") or self.methods[0]

    def produces_for(self, params: dict[str, Any]) -> frozenset[str]:
        return frozenset({"cluster": {"clustered"}, "cross_layer": {"shared"}}.get(
            self._method(params), set()))

    def stores_for(self, params: dict[str, Any]) -> frozenset[str]:
        return frozenset({"cluster": {"clustered"}, "cross_layer": {"shared-layers"}}.get(
            self._method(params), set()))

    def defaults_for(self, params: dict[str, Any]) -> dict[str, Any]:
        """Only the defaults of the chosen method's parameters (no `threshold` beside `groups`)."""
        method = self._method(params)
        used = set(USES.get(method, ()))
        if params.get("groups") is not None:
            used.discard("threshold")
        values = {k: p["default"] for k, p in self.schema["properties"].items()
                  if k in used and "default" in p}
        return {"method": method, **values}

    def defaults(self) -> dict[str, Any]:
        return self.defaults_for({})

    def check(self, params: dict[str, Any]) -> list[tuple[str | None, str]]:
        method = self._method(params)
        if method not in USES:
            return [("method", f"unknown share method '{method}'")]
        errors: list[tuple[str | None, str]] = [
            (key, f"'{key}' does not apply to share method '{method}'")
            for key in params if key != "method" and key not in USES[method]]
        if method == "cross_layer" and params.get("groups") is not None \
                and params.get("threshold") is not None:
            errors.append(("groups", "give one of `groups` or `threshold`, not both"))
        return errors

    def _resolved(self, params: dict[str, Any]) -> dict[str, Any]:
        params = {**self.defaults_for(params), **params}
        problems = self.check(params)
        if problems:
            raise SqueezeError("share: " + "; ".join(m for _, m in problems))
        return params

    # ------------------------------------------------------------------ estimate
    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        """Exact for cluster, tie and cross_layer with `groups`; with `threshold` the groups depend
        on the weights, so it assumes no block is shared and says so in ``meta.notes``."""
        params = self._resolved(params)
        out = meta.copy()
        method = params["method"]
        if method == "cluster":
            for mod in out.select(CLUSTER_KINDS, params.get("include"), params.get("exclude", ())):
                t = out.tensors.get(f"{mod.name}.weight")
                if t is None:
                    continue  # tied to a tensor owned by another module
                _cluster_codec_allowed(f"{mod.name}.weight", t.codec)
                t.codec = {"cluster": {"bits": int(params["bits"])}}
        elif method == "tie":
            if out.task != "causal-lm":
                raise SqueezeError(f"share tie: needs a causal LM, not a {out.task} model")
            if out.config.get("tie_word_embeddings"):
                raise SqueezeError("share tie: the output layer is already tied to the input "
                                   "embedding")
            embedding, head = _vocab_names(out)
            if head is None:
                raise SqueezeError("share tie: the model has no output layer shaped like its "
                                   "input embedding")
            _drop_tensors(out, {head})
            out.config["tie_word_embeddings"] = True
        else:
            prefix, layers = find_blocks(out.tensors)
            if params.get("groups") is None:
                out.notes.append("share cross_layer: which blocks fall within the threshold "
                                 "depends on the weights; estimated as no block shared")
            else:
                groups = even_groups(list(layers), int(params["groups"]))
                shapes = {i: {s: out.tensors[f"{prefix}.{i}.{s}"].shape for s in names}
                          for i, names in layers.items()}
                _check_compatible(prefix, groups, shapes)
                record = self._record(prefix, groups)
                if record["groups"]:
                    _drop_tensors(out, {f"{prefix}.{m}.{s}" for g in record["groups"]
                                        for m in g[1:] for s in layers[m]})
                    out.add_edit(record)
        out.states |= self.produces_for(params)
        return out

    def _record(self, prefix: str, groups: list[list[int]]) -> dict[str, Any]:
        return {"technique": self.name, "method": "cross_layer", "blocks": prefix,
                "groups": [g for g in groups if len(g) > 1]}

    # ------------------------------------------------------------------ apply
    def apply_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        params = self._resolved(params)
        {"cluster": self._cluster_, "tie": self._tie_,
         "cross_layer": self._cross_layer_}[params["method"]](handle, params, ctx)

    def _cluster_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        import torch

        from squeezelang.plugin import select_modules

        bits, iterations = int(params["bits"]), int(params["iterations"])
        targets = select_modules(handle.model, CLUSTER_KINDS, params.get("include"),
                                 params.get("exclude", ()))
        if not targets:
            raise SqueezeError("share cluster: include/exclude select no linear layer or embedding")
        names = {}
        for name, module in targets:
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or id(weight) in names:
                continue  # a weight tied to one already selected is clustered once
            _cluster_codec_allowed(f"{name}.weight", handle.codecs.get(f"{name}.weight"))
            names[id(weight)] = (name, weight)
        for name, weight in ctx.progress(list(names.values()), desc="cluster"):
            cluster_weight_(weight, bits, iterations)
            handle.codecs[f"{name}.weight"] = {"cluster": {"bits": bits}}
        ctx.log(f"clustered {len(names)} weights into {2 ** bits} values each")

    def _tie_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        model = handle.model
        if handle.task != "causal-lm":
            raise SqueezeError(f"share tie: needs a causal LM, not a {handle.task} model")
        head = model.get_output_embeddings()
        embedding = model.get_input_embeddings()
        if head is None or embedding is None:
            raise SqueezeError("share tie: the model has no output layer to tie")
        if head.weight is embedding.weight:
            raise SqueezeError("share tie: the output layer is already tied to the input embedding")
        if tuple(head.weight.shape) != tuple(embedding.weight.shape):
            raise SqueezeError(f"share tie: the output layer {tuple(head.weight.shape)} and the "
                               f"input embedding {tuple(embedding.weight.shape)} differ in shape")
        head_name = next(n for n, m in model.named_modules() if m is head)
        head.weight = embedding.weight
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = True
        handle.codecs.pop(f"{head_name}.weight", None)  # its values are gone; it stores nothing
        ctx.log(f"tied '{head_name}' to the input embedding")

    def _cross_layer_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        import torch

        model = handle.model
        state = model.state_dict()
        prefix, layers = find_blocks(state)
        tensors = {i: {s: state[f"{prefix}.{i}.{s}"] for s in names} for i, names in layers.items()}
        shapes = {i: {s: t.shape for s, t in ts.items()} for i, ts in tensors.items()}
        if params.get("groups") is not None:
            groups = even_groups(list(layers), int(params["groups"]))
            _check_compatible(prefix, groups, shapes)
        else:
            groups, threshold = [], float(params["threshold"])
            for i in layers:
                rep = groups[-1][0] if groups else None
                if rep is not None and _signature(shapes[i]) == _signature(shapes[rep]) \
                        and _distance(tensors[i], tensors[rep]) < threshold:
                    groups[-1].append(i)
                else:
                    groups.append([i])
        record = self._record(prefix, groups)
        if not record["groups"]:
            ctx.log("share cross_layer: no blocks are close enough to share; nothing changed")
            return
        members = {f"{prefix}.{m}.{s}" for g in record["groups"] for m in g[1:] for s in layers[m]}
        if params["average"]:
            coded = sorted(f"{prefix}.{i}.{s}" for g in record["groups"] for i in g
                           for s in layers[i] if handle.codecs.get(f"{prefix}.{i}.{s}"))
            if coded:
                raise SqueezeError(f"share cross_layer: '{coded[0]}' is already encoded "
                                   f"({handle.codecs[coded[0]]}); averaging would leave its "
                                   "codec's grid — share layers first, or set average = false")
        with torch.no_grad():
            for group in record["groups"]:
                if params["average"]:
                    for s, rep_tensor in tensors[group[0]].items():
                        if rep_tensor.is_floating_point():
                            rep_tensor.copy_(torch.stack([tensors[i][s] for i in group]).mean(0))
                rep_block = model.get_submodule(f"{prefix}.{group[0]}")
                for m in group[1:]:
                    _tie_block_(model.get_submodule(f"{prefix}.{m}"), rep_block)
        for name in members:
            handle.codecs.pop(name, None)
        handle.edits.append(record)
        kept = len(layers) - sum(len(g) - 1 for g in record["groups"])
        ctx.log(f"share cross_layer: {len(layers)} blocks now hold {kept} distinct copies")

    def rebuild_(self, model: Any, record: dict[str, Any]) -> Any:
        if record.get("method") != "cross_layer":
            raise SqueezeError(f"share: no rebuild for method '{record.get('method')}'")
        from squeezelang.plugin import get_module

        prefix = record.get("blocks")
        for group in record.get("groups", []):
            rep = get_module(model, f"{prefix}.{group[0]}")
            for member in group[1:]:
                _tie_block_(get_module(model, f"{prefix}.{member}"), rep)
        return model


def _cluster_codec_allowed(name: str, spec: dict[str, Any] | None) -> None:
    if spec and set(spec) - {"cluster"}:
        raise SqueezeError(f"share cluster: '{name}' is already stored as {spec}; the cluster "
                           "codec combines with nothing else")


@hookimpl
def register_techniques(registry: Any) -> None:
    registry.add(Share())
