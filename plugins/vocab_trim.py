"""The built-in ``vocab_trim`` technique: keep only the tokens a task's data uses.

Every text of the ``data`` set is tokenized; the tokens it produces, every special and added token,
the ids the model's config names (pad, bos, eos, …), ``keep_frequent`` low-id tokens and the tokens
of ``keep`` make up the new vocabulary, in their original order. The input embedding rows, the
output layer (tied or not) and its bias are cut to those rows, ``config.vocab_size`` shrinks, and the
tokenizer is rewritten to number the kept tokens ``0 … n-1``. The result is a standard architecture
that loads with plain ``transformers``.

Why outputs do not change: a WordLevel tokenizer looks words up; a WordPiece tokenizer splits a word
greedily, longest known prefix first. Every piece it produced with the full vocabulary is still
known, and no longer prefix can have appeared, so a text made of kept tokens tokenizes to the same
pieces — and the same rows — as before. A word that cannot be covered by kept pieces becomes the
unknown token, as any unknown word always did.

A BPE tokenizer (GPT-2, Llama 3, Qwen2; Llama 2 and Gemma with byte fallback) starts from single
symbols and applies its merges in rank order. The kept set is closed under the merges: its base
alphabet is kept (the 256 byte symbols of a ByteLevel tokenizer, the ``<0x00>`` … ``<0xFF>`` tokens
of a byte-fallback one), and whenever a merge's result is kept both its parts are, recursively.
Only merges whose parts and result are all kept stay, in their original order. A kept text's merges
all survive and no surviving merge was unavailable before, so it splits exactly as before; any other
text still tokenizes (into bytes or shorter pieces, or the unknown token where the tokenizer has
neither). Unigram tokenizers are refused: their pieces' scores decide the split, and cutting them
is not proved to keep it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from squeezelang import hookimpl
from squeezelang.errors import SqueezeError
from squeezelang.hooks.technique import Candidate, Technique

if TYPE_CHECKING:
    from squeezelang.executor.context import StageContext
    from squeezelang.models.handle import ModelHandle
    from squeezelang.models.meta import ModelMeta

#: Tokenizer models whose vocabulary can be cut without changing how kept text is split.
SUPPORTED_MODELS = ("WordPiece", "WordLevel", "BPE")
#: Config keys holding token ids that must survive (and be renumbered).
CONFIG_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                    "mask_token_id", "unk_token_id", "decoder_start_token_id")
#: Placeholder tokens that no text produces (BERT's ``[unused7]``); ``keep_frequent`` skips them.
_PLACEHOLDER = re.compile(r"^(\[unused\d+\]|<unused\d+>)$")

# ---------------------------------------------------------------------------- tokenizer files
def _tokenizer_json(tokenizer: Any, directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Save ``tokenizer`` into ``directory``; return its parsed ``tokenizer.json`` and config."""
    try:
        tokenizer.save_pretrained(str(directory))
    except Exception as exc:
        raise SqueezeError(f"vocab_trim: cannot save the tokenizer: {type(exc).__name__}: {exc}") from None
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise SqueezeError("vocab_trim needs a fast tokenizer (tokenizer.json); "
                           f"{type(tokenizer).__name__} has none")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    return json.loads(path.read_text(encoding="utf-8")), config


def _check_model(doc: dict[str, Any]) -> dict[str, Any]:
    """The ``model`` of a ``tokenizer.json`` document, if ``vocab_trim`` can cut it safely."""
    model = doc.get("model") or {}
    kind = model.get("type")
    if kind == "Unigram":
        raise SqueezeError("vocab_trim cannot trim a Unigram (SentencePiece) tokenizer: its pieces' "
                           "scores decide how text splits, and cutting them is not proved to keep "
                           "the split; it supports WordPiece, WordLevel and BPE tokenizers")
    if kind not in SUPPORTED_MODELS:
        raise SqueezeError(f"vocab_trim supports WordPiece, WordLevel and BPE tokenizers; this one "
                           f"is {kind or 'of an unknown kind'}")
    if kind == "BPE" and model.get("dropout"):
        raise SqueezeError("vocab_trim: the BPE tokenizer has dropout, so its splits are random")
    if kind == "BPE" and (_byte_level(doc) or model.get("byte_fallback")):
        return model  # every text splits into kept byte symbols at worst
    if not model.get("unk_token") or model["unk_token"] not in model.get("vocab", {}):
        what = ("BPE tokenizer is neither byte-level nor falls back to bytes and" if kind == "BPE"
                else "tokenizer")
        raise SqueezeError(f"vocab_trim: the {what} has no unknown token, so text outside the kept "
                           "vocabulary could not be tokenized")
    return model


def _byte_level(doc: dict[str, Any]) -> bool:
    """Whether the tokenizer maps bytes to symbols (a ``ByteLevel`` pre-tokenizer or normalizer)."""
    def has(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        return isinstance(node, list) and any(has(v) for v in node)

    return has(doc.get("pre_tokenizer")) or has(doc.get("normalizer"))


def _byte_symbols() -> list[str]:
    """The 256 symbols a ``ByteLevel`` tokenizer writes bytes as (GPT-2's ``bytes_to_unicode``)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _merges(model: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(left, right, result)`` of every merge, in rank order (either JSON form of a merge)."""
    prefix = len(model.get("continuing_subword_prefix") or "")
    out = []
    for merge in model.get("merges") or []:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        out.append((left, right, left + right[prefix:]))  # as tokenizers' BPE builds the result
    return out


def _bpe_closure(model: dict[str, Any], doc: dict[str, Any], ids: set[int]) -> set[int]:
    """``ids`` with the base alphabet and, recursively, both parts of every merge making a kept id."""
    vocab: dict[str, int] = model["vocab"]
    base = _byte_symbols() if _byte_level(doc) else []
    if model.get("byte_fallback"):
        base += [f"<0x{b:02X}>" for b in range(256)]
    kept = ids | {vocab[t] for t in base if t in vocab}
    parts: dict[int, list[int]] = {}
    for left, right, result in _merges(model):
        if result in vocab and left in vocab and right in vocab:
            parts.setdefault(vocab[result], []).extend((vocab[left], vocab[right]))
    todo = list(kept)
    while todo:
        for part in parts.get(todo.pop(), ()):
            if part not in kept:
                kept.add(part)
                todo.append(part)
    return kept


def kept_ids(tokenizer: Any, texts: Iterable[str], keep_frequent: int = 0,
             keep: Iterable[str] = (), config: Any = None,
             generation_config: Any = None) -> list[int]:
    """The sorted token ids to keep: those of ``texts``, specials, config ids, frequent and ``keep``.

    ``keep_frequent`` keeps that many of the lowest ids besides (skipping ``[unusedN]``
    placeholders): WordPiece ``vocab.txt`` files list tokens roughly by frequency, so low ids are a
    cheap stand-in for common words the data did not happen to contain. ``config`` and
    ``generation_config`` are objects or the dicts of their JSON files. A BPE tokenizer's ids are
    closed under its merges (see the module's docstring).
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        doc, _ = _tokenizer_json(tokenizer, Path(tmp))
    config_ids = config_values(config, generation_config)

    def encode(batch: list[str], special: bool) -> list[list[int]]:
        return tokenizer(batch, add_special_tokens=special)["input_ids"]

    return collect_ids(doc, getattr(tokenizer, "all_special_ids", []), config_ids, encode, texts,
                       keep_frequent, keep)


def collect_ids(doc: dict[str, Any], special_ids: Iterable[int | None],
                config_ids: Iterable[Any], encode: Callable[[list[str], bool], list[list[int]]],
                texts: Iterable[str], keep_frequent: int,
                keep: Iterable[str]) -> list[int]:
    """``kept_ids`` from its parts: the ``tokenizer.json`` document ``doc``, the tokenizer's special
    ids, the config's token ids and ``encode(texts, add_special_tokens) -> ids per text``."""
    model = _check_model(doc)
    vocab: dict[str, int] = model["vocab"]
    ids: set[int] = {vocab[model["unk_token"]]} if model.get("unk_token") in vocab else set()
    ids.update(int(t["id"]) for t in doc.get("added_tokens", []))
    if isinstance(doc.get("padding"), dict) and doc["padding"].get("pad_id") is not None:
        ids.add(int(doc["padding"]["pad_id"]))
    ids.update(_post_processor_ids(doc.get("post_processor")))
    ids.update(int(i) for i in special_ids if i is not None)
    ids.update(_token_ids(config_ids))
    texts = [str(t) for t in texts]
    if texts:
        for row in encode(texts, True):
            ids.update(int(i) for i in row)
    if keep_frequent > 0:
        by_id = sorted((i, t) for t, i in vocab.items() if not _PLACEHOLDER.match(t))
        ids.update(i for i, _ in by_id[:keep_frequent])
    for item in keep:
        if item in vocab:
            ids.add(vocab[item])
        else:
            ids.update(int(i) for i in encode([str(item)], False)[0])
    if model["type"] == "BPE":
        ids = _bpe_closure(model, doc, ids)
    return sorted(ids)


def config_values(*configs: Any) -> list[Any]:
    """The values of ``CONFIG_TOKEN_IDS`` in each config (an object, a dict or ``None``)."""
    return [(c.get(key) if isinstance(c, dict) else getattr(c, key, None))
            for c in configs if c is not None for key in CONFIG_TOKEN_IDS]


def _token_ids(values: Iterable[Any]) -> list[int]:
    """The token ids among config values: an id, or a list of ids (Llama 3's ``eos_token_id``)."""
    flat = [v for value in values for v in (value if isinstance(value, (list, tuple)) else [value])]
    return [v for v in flat if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def _post_processor_ids(proc: Any) -> set[int]:
    """The special-token ids a ``tokenizers`` post-processor inserts."""
    if not isinstance(proc, dict):
        return set()
    kind = proc.get("type")
    if kind == "TemplateProcessing":
        return {int(i) for spec in proc.get("special_tokens", {}).values() for i in spec.get("ids", [])}
    if kind in ("BertProcessing", "RobertaProcessing"):
        return {int(proc[k][1]) for k in ("sep", "cls") if k in proc}
    if kind == "Sequence":
        return set().union(*(_post_processor_ids(p) for p in proc.get("processors", [])))
    return set()


def _remap_post_processor(proc: Any, remap: dict[int, int]) -> Any:
    """Renumber the special-token ids a ``tokenizers`` post-processor holds."""
    if not isinstance(proc, dict):
        return proc
    kind = proc.get("type")
    if kind == "TemplateProcessing":
        for spec in proc.get("special_tokens", {}).values():
            spec["ids"] = [remap[int(i)] for i in spec.get("ids", [])]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            if key in proc:
                proc[key] = [proc[key][0], remap[int(proc[key][1])]]
    elif kind == "Sequence":
        proc["processors"] = [_remap_post_processor(p, remap) for p in proc.get("processors", [])]
    return proc


def trimmed_tokenizer(tokenizer: Any, ids: list[int], directory: Path) -> Any:
    """Write ``tokenizer`` restricted to ``ids`` (renumbered in order) into ``directory``; load it.

    Rewrites ``tokenizer.json`` (vocabulary, BPE merges, added tokens, post-processor and padding ids),
    ``tokenizer_config.json`` (``added_tokens_decoder``) and, for WordPiece, ``vocab.txt`` (so the
    tokenizer class finds the same vocabulary whichever file it reads); the normalizer,
    pre-tokenizer and decoder settings are kept as they are. The saved model later gets what the
    loaded tokenizer's ``save_pretrained`` writes (transformers 5: ``tokenizer.json`` and
    ``tokenizer_config.json``).
    """
    from transformers import AutoTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    doc, config = _tokenizer_json(tokenizer, directory)
    model = _check_model(doc)
    remap = {old: new for new, old in enumerate(ids)}
    by_id = {i: t for t, i in model["vocab"].items()}
    model["vocab"] = {by_id[old]: remap[old] for old in ids if old in by_id}
    if model["type"] == "BPE":
        vocab = model["vocab"]
        model["merges"] = [raw for raw, (left, right, result) in zip(model.get("merges") or [],
                                                                     _merges(model))
                           if left in vocab and right in vocab and result in vocab]
    added = {int(t["id"]) for t in doc.get("added_tokens", [])}
    unknown = [old for old in ids if old not in by_id and old not in added]
    if unknown:
        raise SqueezeError(f"vocab_trim: ids {unknown[:5]} are neither in the vocabulary nor "
                           "added tokens")
    for token in doc.get("added_tokens", []):
        token["id"] = remap[int(token["id"])]
    doc["post_processor"] = _remap_post_processor(doc.get("post_processor"), remap)
    padding = doc.get("padding")
    if isinstance(padding, dict) and padding.get("pad_id") is not None:
        padding["pad_id"] = remap[int(padding["pad_id"])]
    (directory / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    if isinstance(config.get("added_tokens_decoder"), dict):
        config["added_tokens_decoder"] = {str(remap[int(k)]): v for k, v in
                                          config["added_tokens_decoder"].items()}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False),
                                                         encoding="utf-8")
    if model["type"] == "WordPiece":
        ordered = sorted(model["vocab"], key=model["vocab"].__getitem__)
        (directory / "vocab.txt").write_text("\n".join(ordered) + "\n", encoding="utf-8")
    for stale in ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model",
                  "sentencepiece.bpe.model", *(() if model["type"] == "WordPiece" else ("vocab.txt",))):
        (directory / stale).unlink(missing_ok=True)
    try:
        new = AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                            trust_remote_code=False)
    except Exception as exc:
        raise SqueezeError(f"vocab_trim: the trimmed tokenizer does not load: "
                           f"{type(exc).__name__}: {exc}") from None
    if len(new) != len(ids):
        raise SqueezeError(f"vocab_trim: the trimmed tokenizer has {len(new)} tokens, not {len(ids)}")
    return new


# ---------------------------------------------------------------------------- model
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
        padding_idx = remap.get(emb.padding_idx) if emb.padding_idx is not None else None
        new_emb = torch.nn.Embedding(len(ids), emb.weight.shape[1], padding_idx=padding_idx,
                                     dtype=emb.weight.dtype, device=emb.weight.device)
        new_emb.weight.copy_(emb.weight[index])
        new_emb.weight.requires_grad_(emb.weight.requires_grad)
        model.set_input_embeddings(new_emb)
        replaced = {id(emb.weight): new_emb.weight}
        if out is not None:
            if not isinstance(out, torch.nn.Linear) or out.weight.shape[0] != rows:
                raise SqueezeError(f"vocab_trim: the output layer is a {type(out).__name__} of "
                                   f"shape {tuple(out.weight.shape)}, not a vocabulary projection")
            new_out = torch.nn.Linear(out.in_features, len(ids), bias=out.bias is not None,
                                      dtype=out.weight.dtype, device=out.weight.device)
            if out.weight is emb.weight:
                new_out.weight = new_emb.weight
            else:
                new_out.weight.copy_(out.weight[index])
                replaced[id(out.weight)] = new_out.weight
                old_params.add(id(out.weight))
            if out.bias is not None:
                new_out.bias.copy_(out.bias[index])
                replaced[id(out.bias)] = new_out.bias
                old_params.add(id(out.bias))
            model.set_output_embeddings(new_out)
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
        if left:
            raise SqueezeError(f"vocab_trim: do not know how to trim {', '.join(left[:5])} "
                               f"(a row per token outside the embedding and output layer)")
    model.config.vocab_size = len(ids)
    for key in CONFIG_TOKEN_IDS:
        for cfg in (model.config, getattr(model, "generation_config", None)):
            value = getattr(cfg, key, None) if cfg is not None else None
            if _token_ids([value]):
                setattr(cfg, key, _renumbered(value, remap, key))
    return [n for n, p in model.state_dict().items() if p.dim() >= 1 and p.shape[0] == len(ids)]


def _renumbered(value: Any, remap: dict[int, int], key: str) -> Any:
    """A config's token id (or list of ids) in the trimmed numbering."""
    if isinstance(value, (list, tuple)):
        return [_renumbered(v, remap, key) for v in value]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return value
    if value not in remap:
        raise SqueezeError(f"vocab_trim: the model's {key} {value} is not among the kept ids")
    return remap[value]


def check_same_split(old: Any, new: Any, ids: list[int], texts: list[str]) -> None:
    """Raise unless ``new`` splits every text as ``old`` did, in the trimmed numbering.

    The texts are the data the kept ids came from, so this holds by construction; it is checked
    because a tokenizer class may rebuild its pipeline from the rewritten files.
    """
    remap = {o: n for n, o in enumerate(ids)}
    for start in range(0, len(texts), 256):
        batch = texts[start:start + 256]
        before = old(batch, add_special_tokens=True)["input_ids"]
        after = new(batch, add_special_tokens=True)["input_ids"]
        for text, a, b in zip(batch, before, after):
            if [remap.get(i) for i in a] != list(b):
                raise SqueezeError(f"vocab_trim: the trimmed tokenizer splits {text[:60]!r} "
                                   "differently; the tokenizer was left unchanged")


# ---------------------------------------------------------------------------- technique
class VocabTrim(Technique):
    name = "vocab_trim"
    description = (
        "Keep only the vocabulary a task uses: the tokens of every text in `data`, every special "
        "token, the `keep_frequent` lowest-id (most frequent, for WordPiece) tokens and the tokens "
        "of `keep`. Cuts the embedding and output rows and rewrites the tokenizer, so the model "
        "stays a standard transformers model. Text made of kept tokens gives exactly the original "
        "outputs; other words split into smaller kept pieces (BPE) or become the unknown token "
        "(WordPiece, WordLevel). WordPiece, WordLevel and BPE tokenizers (byte-level or byte "
        "fallback); Unigram ones are refused.")
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "data": {"type": "string",
                     "description": "The data set whose texts define the vocabulary kept."},
            "keep_frequent": {"type": "integer", "minimum": 0, "default": 0,
                              "description": "Also keep this many of the lowest token ids (the "
                                             "most frequent, for WordPiece vocabularies)."},
            "keep": {"type": "array", "items": {"type": "string"}, "default": [],
                     "description": "Extra tokens, or strings whose tokens are kept."},
        },
        "required": ["data"],
    }
    data_params = {"data": "text|a,b"}

    def candidates(self, task: str) -> list[Candidate]:
        """Keep the compose data's tokens and the 8,000 lowest ids.

        Lossless only on texts made of kept tokens: quality is measured on other texts, whose
        words outside the compose data become the unknown token (all-MiniLM-L6-v2, STS-B: the
        tokens of 2,000 train rows alone turned 10.5% of the dev tokens into [UNK] and cost 6.7
        points of Spearman). With the lowest 8,000 ids kept too (in BERT's WordPiece order: the
        frequent words and the single-character pieces, so an unseen word splits into smaller
        pieces instead) 0.01% of the dev tokens are [UNK] and the cost is 0.9 points, for 30% of
        the vocabulary kept. Still lossy, so ranked after int8 quantization, before pruning.
        """
        return [Candidate("vocab_trim", {"keep_frequent": 8000}, risk=2.0, order=10,
                          needs_data=True)]
    example = "stage trim: vocab_trim { data = calib, keep_frequent = 2000 }"

    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        """Without the data the kept vocabulary is unknown: assume it unchanged (an upper bound)."""
        out = meta.copy()
        rows = int(out.config.get("vocab_size") or 0)
        out.notes.append(f"vocab_trim: the kept vocabulary depends on the texts of "
                         f"'{params.get('data')}'; size estimated with the full vocabulary of "
                         f"{rows} tokens (an upper bound)")
        return out

    def estimate_with(self, meta: ModelMeta, params: dict[str, Any], ctx: StageContext) -> ModelMeta:
        """Exact: tokenize the data with the input model's tokenizer (no weights are loaded)."""
        if ctx.model_dir is None or "vocab_size" not in meta.config:
            return self.estimate(meta, params)
        key = ("vocab_trim", str(ctx.model_dir), params.get("data"),
               int(params.get("keep_frequent", 0)), tuple(params.get("keep", ())))
        if key not in ctx.cache:
            ctx.cache[key] = self.kept_count(ctx.model_dir, ctx.data.texts(params["data"]),
                                             int(params.get("keep_frequent", 0)),
                                             [str(k) for k in params.get("keep", ())])
        return self.resize(meta, ctx.cache[key])

    def kept_count(self, model_dir: Path, texts: list[str], keep_frequent: int,
                   keep: list[str]) -> int:
        """How many tokens ``apply_`` keeps, kept in the planner's disk cache under the bytes of
        the model's tokenizer and config files, the texts and the parameters (a later plan then
        neither imports transformers nor tokenizes)."""
        from squeezelang.models.meta_cache import cache_key, cached_json

        def count() -> int:
            from squeezelang.models.hf import load_tokenizer, read_config
            from squeezelang_plugins.vocab_count import direct_kept_ids

            direct = direct_kept_ids(model_dir, texts, keep_frequent, keep)
            if direct is not None:  # the same ids, without importing transformers and torch
                return len(direct)
            from transformers import AutoConfig

            tokenizer = load_tokenizer(model_dir)
            config = AutoConfig.for_model(**read_config(model_dir))
            generation = model_dir / "generation_config.json"
            generation_config = (json.loads(generation.read_text(encoding="utf-8"))
                                 if generation.is_file() else None)
            return len(kept_ids(tokenizer, texts, keep_frequent, keep, config, generation_config))

        names = ("tokenizer", "special_tokens", "vocab", "merges", "config.json", "generation_config.json")
        files = [f"{p.name}\n".encode() + p.read_bytes() for p in sorted(model_dir.iterdir())
                 if p.is_file() and (p.name.startswith(names[:4]) or p.name in names[4:])]
        key = cache_key("vocab_trim", *files, "\0".join(texts), str(keep_frequent), "\0".join(keep))
        return int(cached_json("vocab_trim", key, count))

    def resize(self, meta: ModelMeta, new_rows: int) -> ModelMeta:
        """``meta`` with every vocabulary-sized tensor cut to ``new_rows`` rows."""
        out = meta.copy()
        rows = int(out.config.get("vocab_size") or 0)
        for name, t in out.tensors.items():
            if t.shape and t.shape[0] == rows and "position" not in name:
                t.shape = (new_rows,) + tuple(t.shape[1:])
        out.config["vocab_size"] = new_rows
        return out

    def apply_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        import tempfile

        if handle.tokenizer is None:
            raise SqueezeError("vocab_trim: the model has no tokenizer")
        texts = ctx.data.texts(params["data"])
        model = handle.model
        ids = kept_ids(handle.tokenizer, ctx.progress(texts, desc="tokenize"),
                       params.get("keep_frequent", 0), params.get("keep", ()), model.config,
                       getattr(model, "generation_config", None))
        before = len(handle.tokenizer)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = trimmed_tokenizer(handle.tokenizer, ids, Path(tmp))
        check_same_split(handle.tokenizer, tokenizer, ids, [str(t) for t in texts])
        trim_embeddings_(model, ids)
        handle.tokenizer = tokenizer
        handle.tokenizer_changed = True
        ctx.log(f"vocab_trim: kept {len(ids):,} of {before:,} tokens "
                f"({len(ids) / max(before, 1):.1%})")


@hookimpl
def register_techniques(registry: Any) -> None:
    registry.add(VocabTrim())
