"""The byte alphabet and merge closure that make a BPE vocabulary safe to cut.

A BPE tokenizer (GPT-2, Llama 3, Qwen2; Llama 2 and Gemma with byte fallback) starts from single
symbols and applies its merges in rank order. The kept set is closed under the merges: its base
alphabet is kept (the 256 byte symbols of a ByteLevel tokenizer, the ``<0x00>`` … ``<0xFF>`` tokens
of a byte-fallback one), and whenever a merge's result is kept both its parts are, recursively.
Only merges whose parts and result are all kept stay, in their original order. A kept text's merges
all survive and no surviving merge was unavailable before, so it splits exactly as before; any other
text still tokenizes (into bytes or shorter pieces, or the unknown token where the tokenizer has
neither).
"""
from __future__ import annotations

from typing import Any


def byte_level(doc: dict[str, Any]) -> bool:
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


def bpe_merges(model: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(left, right, result)`` of every merge, in rank order (either JSON form of a merge)."""
    prefix = len(model.get("continuing_subword_prefix") or "")
    out = []
    for merge in model.get("merges") or []:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        out.append((left, right, left + right[prefix:]))  # as tokenizers' BPE builds the result
    return out


def bpe_closure(model: dict[str, Any], doc: dict[str, Any], ids: set[int]) -> set[int]:
    """``ids`` with the base alphabet and, recursively, both parts of every merge making a kept id."""
    vocab: dict[str, int] = model["vocab"]
    base = _byte_symbols() if byte_level(doc) else []
    if model.get("byte_fallback"):
        base += [f"<0x{b:02X}>" for b in range(256)]
    kept = ids | {vocab[t] for t in base if t in vocab}
    parts: dict[int, list[int]] = {}
    for left, right, result in bpe_merges(model):
        if result in vocab and left in vocab and right in vocab:
            parts.setdefault(vocab[result], []).extend((vocab[left], vocab[right]))
    todo = list(kept)
    while todo:
        for part in parts.get(todo.pop(), ()):
            if part not in kept:
                kept.add(part)
                todo.append(part)
    return kept
