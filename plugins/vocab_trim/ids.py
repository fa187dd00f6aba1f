"""Collecting the token ids a trimmed vocabulary keeps."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable

from squeezelang_plugins.vocab_trim.bpe import bpe_closure
from squeezelang_plugins.vocab_trim.tokenizer import check_model, post_processor_ids, saved_tokenizer_json

#: Config keys holding token ids that must survive (and be renumbered).
CONFIG_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                    "mask_token_id", "unk_token_id", "decoder_start_token_id")
#: Placeholder tokens that no text produces (BERT's ``[unused7]``); ``keep_frequent`` skips them.
_PLACEHOLDER = re.compile(r"^(\[unused\d+\]|<unused\d+>)$")


def kept_ids(tokenizer: Any, texts: Iterable[str], keep_frequent: int = 0,
             keep: Iterable[str] = (), config: Any = None,
             generation_config: Any = None) -> list[int]:
    """The sorted token ids to keep: those of ``texts``, specials, config ids, frequent and ``keep``.

    ``keep_frequent`` keeps that many of the lowest ids besides (skipping ``[unusedN]``
    placeholders): WordPiece ``vocab.txt`` files list tokens roughly by frequency, so low ids are a
    cheap stand-in for common words the data did not happen to contain. ``config`` and
    ``generation_config`` are objects or the dicts of their JSON files. A BPE tokenizer's ids are
    closed under its merges (see ``vocab_trim.bpe``).
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        doc, _ = saved_tokenizer_json(tokenizer, Path(tmp))
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
    model = check_model(doc)
    vocab: dict[str, int] = model["vocab"]
    ids: set[int] = {vocab[model["unk_token"]]} if model.get("unk_token") in vocab else set()
    ids.update(int(t["id"]) for t in doc.get("added_tokens", []))
    if isinstance(doc.get("padding"), dict) and doc["padding"].get("pad_id") is not None:
        ids.add(int(doc["padding"]["pad_id"]))
    ids.update(post_processor_ids(doc.get("post_processor")))
    ids.update(int(i) for i in special_ids if i is not None)
    ids.update(token_ids(config_ids))
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
        ids = bpe_closure(model, doc, ids)
    return sorted(ids)


def config_values(*configs: Any) -> list[Any]:
    """The values of ``CONFIG_TOKEN_IDS`` in each config (an object, a dict or ``None``)."""
    return [(c.get(key) if isinstance(c, dict) else getattr(c, key, None))
            for c in configs if c is not None for key in CONFIG_TOKEN_IDS]


def token_ids(values: Iterable[Any]) -> list[int]:
    """The token ids among config values: an id, or a list of ids (Llama 3's ``eos_token_id``)."""
    flat = [v for value in values for v in (value if isinstance(value, (list, tuple)) else [value])]
    return [v for v in flat if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
