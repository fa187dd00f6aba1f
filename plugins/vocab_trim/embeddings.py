"""Cutting a model's embedding and output rows, and its config's token ids, to the kept ids."""
from __future__ import annotations

from typing import Any

from squeezelang.plugin import SqueezeError
from squeezelang_plugins.vocab_trim.ids import CONFIG_TOKEN_IDS, token_ids


def trim_embeddings_(model: Any, ids: list[int]) -> list[str]:
    """Keep only rows ``ids`` of the input embedding, the output layer and vocabulary-sized biases.

    Returns the names of the state-dict tensors that changed shape. Tied weights stay tied.
    """
    import torch

    emb = model.get_input_embeddings()
    if not isinstance(emb, torch.nn.Embedding):
        raise SqueezeError(f"vocab_trim: the input embedding is a {type(emb).__name__}, "
                           "not an nn.Embedding")
    rows = emb.weight.shape[0]
    if ids[-1] >= rows:
        raise SqueezeError(f"vocab_trim: the tokenizer has id {ids[-1]} but the embedding only "
                           f"{rows} rows")
    index = torch.tensor(ids, dtype=torch.long)
    remap = {old: new for new, old in enumerate(ids)}
    out = model.get_output_embeddings()
    old_params = {id(emb.weight)}
    with torch.no_grad():
        # Resized in place, never replaced: the modules keep their class (Gemma's scaled
        # embedding multiplies its rows by sqrt(hidden) in forward; a plain nn.Embedding would not).
        tied = out is not None and out.weight is emb.weight
        # the old parameters stay referenced until the end: ``replaced`` is keyed by their ids,
        # and a freed id could be reused by a new parameter
        old = [emb.weight] + ([out.weight, out.bias] if out is not None else [])
        replaced = {id(emb.weight): _rows(emb.weight, index)}
        emb.weight = replaced[id(emb.weight)]
        emb.num_embeddings = len(ids)
        emb.padding_idx = remap.get(emb.padding_idx) if emb.padding_idx is not None else None
        if out is not None:
            if not isinstance(out, torch.nn.Linear) or out.weight.shape[0] != rows:
                raise SqueezeError(f"vocab_trim: the output layer is a {type(out).__name__} of "
                                   f"shape {tuple(out.weight.shape)}, not a vocabulary projection")
            if not tied:
                replaced[id(out.weight)] = _rows(out.weight, index)
                old_params.add(id(out.weight))
            out.weight = emb.weight if tied else replaced[id(out.weight)]
            if out.bias is not None:
                replaced[id(out.bias)] = _rows(out.bias, index)
                old_params.add(id(out.bias))
                out.bias = replaced[id(out.bias)]
            out.out_features = len(ids)
        # Parameters elsewhere that still have a row per token: shared copies, LM-head biases.
        left = []
        for mod_name, module in model.named_modules():
            for pname, p in list(module.named_parameters(recurse=False)):
                if id(p) in replaced:
                    setattr(module, pname, replaced[id(p)])
                elif p.dim() >= 1 and p.shape[0] == rows and "position" not in mod_name + pname:
                    if p.dim() == 1:
                        setattr(module, pname, torch.nn.Parameter(p[index].clone(),
                                                                  requires_grad=p.requires_grad))
                    else:
                        left.append(f"{mod_name}.{pname}")
        del old
        if left:
            raise SqueezeError(f"vocab_trim: do not know how to trim {', '.join(left[:5])} "
                               f"(a row per token outside the embedding and output layer)")
    model.config.vocab_size = len(ids)
    for key in CONFIG_TOKEN_IDS:
        for cfg in (model.config, getattr(model, "generation_config", None)):
            value = getattr(cfg, key, None) if cfg is not None else None
            if token_ids([value]):
                setattr(cfg, key, _renumbered(value, remap, key))
    return [n for n, p in model.state_dict().items() if p.dim() >= 1 and p.shape[0] == len(ids)]


def _rows(p: Any, index: Any) -> Any:
    """A new parameter holding the rows ``index`` of ``p`` (same dtype, device and grad flag)."""
    import torch

    return torch.nn.Parameter(p[index].clone(), requires_grad=p.requires_grad)


def _renumbered(value: Any, remap: dict[int, int], key: str) -> Any:
    """A config's token id (or list of ids) in the trimmed numbering."""
    if isinstance(value, (list, tuple)):
        return [_renumbered(v, remap, key) for v in value]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return value
    if value not in remap:
        raise SqueezeError(f"vocab_trim: the model's {key} {value} is not among the kept ids")
    return remap[value]
