"""The tokenizer as GGUF metadata (``tokenizer.ggml.*``), read from a transformers fast tokenizer.

Three shapes of ``tokenizer.json`` are written, as ``convert_hf_to_gguf.py`` writes them:

- byte-level BPE (GPT-2, Llama 3, Qwen): ``tokenizer.ggml.model = "gpt2"`` with the tokens as they
  are (already byte-level encoded) and the merges; the pre-tokenizer (``tokenizer.ggml.pre``) is
  recognised from its split pattern (``PRE_TOKENIZERS``), else ``"default"``;
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma): ``"llama"`` with token
  scores ``-id`` (the merge order of such vocabularies; tokenizer.json keeps no scores) and
  ``<0xNN>`` tokens typed as bytes;
- any other vocabulary (word- or character-level, like the test models' tokenizer): ``"gpt2"``
  with each token byte-level encoded and no merges, so llama.cpp's own tokenizer splits text into
  bytes and merges none: exact for a character-level vocabulary over ASCII, an approximation of
  a word-level one. llama.cpp refuses a ``gpt2`` vocabulary without merges, so such a vocabulary
  gets the one merge ``INERT_MERGE``, of two strings that no merge produces: it never applies.
  squeezelang's measurements feed the transformers tokenizer's ids to llama.cpp, so they never
  depend on llama.cpp's tokenization.

Vocabulary slots the tokenizer does not fill (a model whose ``vocab_size`` is padded) become
unused ``[PADn]`` tokens, as in ``convert_hf_to_gguf.py``.
"""
from __future__ import annotations

import json
from typing import Any

from squeezelang.plugin import SqueezeError

#: A merge that never applies (both sides are several characters, and no merge makes them).
INERT_MERGE = "<no-merges> <no-merges>"
#: llama.cpp's token types (``llama_token_type``).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
           r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
#: split patterns of byte-level pre-tokenizers -> llama.cpp's name for them
PRE_TOKENIZERS = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _spec(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SqueezeError("format 'gguf' needs a fast tokenizer (tokenizer.json) to write the "
                           f"vocabulary; {type(tokenizer).__name__} is not one")
    return json.loads(backend.to_str())


def _mentions(node: Any, kind: str) -> bool:
    """Whether a tokenizer.json component (or a sequence of them) is or holds ``kind``."""
    if isinstance(node, dict):
        return node.get("type") == kind or any(_mentions(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, kind) for v in node)
    return False


def _pre(spec: dict[str, Any]) -> str:
    """llama.cpp's name of a byte-level pre-tokenizer, from its split pattern."""
    text = json.dumps(spec.get("pre_tokenizer"))
    for pattern, name in PRE_TOKENIZERS.items():
        if json.dumps(pattern)[1:-1] in text:
            return name
    return "gpt-2" if _mentions(spec.get("pre_tokenizer"), "ByteLevel") else "default"


def _merges(spec: dict[str, Any]) -> list[str]:
    merges = spec["model"].get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def vocabulary(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """``model``, ``pre``, ``tokens``, ``types``, ``scores`` (or None), ``merges`` of a tokenizer
    for a model of ``vocab_size`` token rows."""
    spec = _spec(tokenizer)
    kind = spec["model"]["type"]
    byte_level = _mentions(spec.get("pre_tokenizer"), "ByteLevel") or _mentions(
        spec.get("decoder"), "ByteLevel")
    spm = kind == "BPE" and bool(spec["model"].get("byte_fallback"))
    if kind == "Unigram":
        raise SqueezeError("format 'gguf' does not write Unigram (SentencePiece unigram) "
                           "tokenizers yet")
    encode = None if byte_level or spm else bytes_to_unicode()
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    special |= set(getattr(tokenizer, "all_special_ids", []) or [])
    added = {i for i in (tokenizer.get_added_vocab() or {}).values()}
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(reverse) > vocab_size:
        raise SqueezeError(f"the tokenizer has {len(reverse)} tokens and the model "
                           f"{vocab_size} token rows")
    tokens, types = [], []
    for i in range(vocab_size):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added or i in special:
            tokens.append(text)
            types.append(CONTROL if i in special else USER_DEFINED)
        else:
            if encode is not None:
                text = "".join(encode[b] for b in text.encode("utf-8"))
            tokens.append(text)
            types.append(BYTE if spm and _is_byte(text) else NORMAL)
    return {"model": "llama" if spm else "gpt2", "pre": "default" if spm or encode else _pre(spec),
            "tokens": tokens, "types": types,
            "scores": [-float(i) for i in range(vocab_size)] if spm else None,
            "merges": _merges(spec) if kind == "BPE" and not spm else []}


def _is_byte(text: str) -> bool:
    return len(text) == 6 and text.startswith("<0x") and text.endswith(">")


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Write ``tokenizer``'s vocabulary and special tokens into a ``gguf.GGUFWriter``."""
    vocab = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if vocab["scores"] is not None:
        writer.add_token_scores(vocab["scores"])
    if vocab["model"] == "gpt2":
        writer.add_token_merges(vocab["merges"] or [INERT_MERGE])
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            getattr(writer, f"add_{role}_token_id")(token_id)
    for role in ("bos", "eos"):
        flag = getattr(tokenizer, f"add_{role}_token", None)
        if isinstance(flag, bool):
            getattr(writer, f"add_add_{role}_token")(flag)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
