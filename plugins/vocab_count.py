"""The tokens ``vocab_trim`` keeps, found from the tokenizer files with the ``tokenizers`` library.

Planning a ``vocab_trim`` stage predicts the trimmed size exactly by tokenizing the stage's data.
Loading the tokenizer through transformers imports torch (about 3 s, most of a first plan); the
``tokenizers`` library that does the tokenizing underneath loads in milliseconds. This reads what
transformers would hand it — ``tokenizer.json``, the special tokens named in
``tokenizer_config.json`` / ``special_tokens_map.json``, the token ids in ``config.json`` with the
config class's defaults and those of ``generation_config.json`` — and collects the ids with the
same code as the stage itself (``vocab_trim.collect_ids``). ``tests/plugins/test_vocab_count.py``
and ``test_vocab_trim_bpe.py`` check that both give the same ids.

Where the files say something transformers would act on and this does not model (a model family
whose token-id defaults its ``ModelFamily.config_defaults`` do not give, tokens added outside
``tokenizer.json``, a special token it cannot find, a BPE tokenizer whose class rebuilds its
pipeline from the vocabulary and merges rather than reading ``tokenizer.json`` as it is), it
answers ``None`` and the caller loads the tokenizer through transformers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

#: The config's token ids that transformers keeps; their defaults are the family's
#: ``config_defaults`` (a family that does not give all three: ``None``).
TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id")
#: Tokenizer classes that use ``tokenizer.json`` as it is (others may rebuild a BPE pipeline).
AS_SAVED = (None, "PreTrainedTokenizerFast", "TokenizersBackend")
#: ``tokenizer_config.json`` keys that name one special token each.
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token")


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(token: Any) -> str | None:
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _special_tokens(config: dict[str, Any]) -> list[str] | None:
    """The special tokens transformers would list in ``all_special_tokens``, or ``None``."""
    tokens: list[str] = []
    for key in SPECIAL_KEYS:
        if config.get(key) is None:
            continue
        content = _content(config[key])
        if content is None:
            return None
        tokens.append(content)
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key) or []
        if not isinstance(extra, list):
            return None
        for item in extra:
            content = _content(item)
            if content is None:
                return None
            tokens.append(content)
    return tokens


def _token_defaults(config: dict[str, Any]) -> dict[str, Any] | None:
    """The token ids the config class of ``config``'s family fills in, or ``None`` if not known."""
    from squeezelang.plugin import SqueezeError, family_of

    try:
        known = family_of(config).config_defaults
    except SqueezeError:  # no registered family
        return None
    if not all(key in known for key in TOKEN_KEYS):
        return None
    return {key: known[key] for key in TOKEN_KEYS}


def direct_kept_ids(directory: Path, texts: Iterable[str], keep_frequent: int,
                    keep: Iterable[str]) -> list[int] | None:
    """``vocab_trim.kept_ids`` of the model in ``directory`` without transformers, or ``None``."""
    from squeezelang_plugins.vocab_trim import SUPPORTED_MODELS, collect_ids, config_values

    path = directory / "tokenizer.json"
    try:
        config = _read(directory / "config.json")
        doc = _read(path)
        tokenizer_config = _read(directory / "tokenizer_config.json")
        special_map = _read(directory / "special_tokens_map.json")
        generation = _read(directory / "generation_config.json")
    except (OSError, ValueError):
        return None
    defaults = _token_defaults(config) if isinstance(config, dict) else None
    files = (doc, tokenizer_config, special_map, generation)
    kind = (doc.get("model") or {}).get("type") if isinstance(doc, dict) else None
    if (defaults is None or not all(isinstance(d, dict) for d in files) or kind not in SUPPORTED_MODELS
            or (kind == "BPE" and tokenizer_config.get("tokenizer_class") not in AS_SAVED)):
        return None
    added = {t.get("content"): int(t["id"]) for t in doc.get("added_tokens", [])}
    declared = tokenizer_config.get("added_tokens_decoder") or {}
    if any(_content(token) not in added for token in declared.values()):
        return None  # transformers would add tokens that tokenizer.json does not hold
    vocab = doc["model"].get("vocab") or {}
    specials = _special_tokens({**special_map, **tokenizer_config})
    if specials is None or any(t not in added and t not in vocab for t in specials):
        return None
    special_ids = [added.get(t, vocab.get(t)) for t in specials]
    config_ids = config_values({**defaults, **config}, generation or None)
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
    except Exception:  # a file the library cannot read: transformers will say what is wrong
        return None
    # transformers turns off the truncation and padding a tokenizer.json may carry when a call
    # asks for neither, as vocab_trim's calls do
    tokenizer.no_truncation()
    tokenizer.no_padding()

    def encode(batch: list[str], special: bool) -> list[list[int]]:
        return [e.ids for e in tokenizer.encode_batch(batch, add_special_tokens=special)]

    return collect_ids(doc, special_ids, config_ids, encode, texts, keep_frequent, keep)
