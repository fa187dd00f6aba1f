"""Reading a tokenizer's ``tokenizer.json`` and writing it back restricted to the kept ids."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from squeezelang.plugin import SqueezeError
from squeezelang_plugins.vocab_trim.bpe import bpe_merges, byte_level

#: Tokenizer models whose vocabulary can be cut without changing how kept text is split.
SUPPORTED_MODELS = ("WordPiece", "WordLevel", "BPE")


def saved_tokenizer_json(tokenizer: Any, directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
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


def check_model(doc: dict[str, Any]) -> dict[str, Any]:
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
    if kind == "BPE" and (byte_level(doc) or model.get("byte_fallback")):
        return model  # every text splits into kept byte symbols at worst
    if not model.get("unk_token") or model["unk_token"] not in model.get("vocab", {}):
        what = ("BPE tokenizer is neither byte-level nor falls back to bytes and" if kind == "BPE"
                else "tokenizer")
        raise SqueezeError(f"vocab_trim: the {what} has no unknown token, so text outside the kept "
                           "vocabulary could not be tokenized")
    return model


def post_processor_ids(proc: Any) -> set[int]:
    """The special-token ids a ``tokenizers`` post-processor inserts."""
    if not isinstance(proc, dict):
        return set()
    kind = proc.get("type")
    if kind == "TemplateProcessing":
        return {int(i) for spec in proc.get("special_tokens", {}).values() for i in spec.get("ids", [])}
    if kind in ("BertProcessing", "RobertaProcessing"):
        return {int(proc[k][1]) for k in ("sep", "cls") if k in proc}
    if kind == "Sequence":
        return set().union(*(post_processor_ids(p) for p in proc.get("processors", [])))
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
    doc, config = saved_tokenizer_json(tokenizer, directory)
    model = check_model(doc)
    remap = {old: new for new, old in enumerate(ids)}
    by_id = {i: t for t, i in model["vocab"].items()}
    model["vocab"] = {by_id[old]: remap[old] for old in ids if old in by_id}
    if model["type"] == "BPE":
        vocab = model["vocab"]
        model["merges"] = [raw for raw, (left, right, result) in zip(model.get("merges") or [],
                                                                     bpe_merges(model))
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
