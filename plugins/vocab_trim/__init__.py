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
unknown token, as any unknown word always did. A BPE tokenizer (byte-level or byte fallback) keeps
its split because the kept set is closed under its merges (``bpe``). Unigram tokenizers are refused:
their pieces' scores decide the split, and cutting them is not proved to keep it.

One concept a module: ``ids`` collects the kept ids, ``bpe`` closes them under a BPE tokenizer's
merges, ``tokenizer`` rewrites the tokenizer files, ``embeddings`` cuts the model's rows and config
ids; this module holds the technique and re-exports the names other modules use.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import Candidate, SqueezeError, Technique, hookimpl
from squeezelang_plugins.vocab_trim.embeddings import trim_embeddings_
from squeezelang_plugins.vocab_trim.ids import CONFIG_TOKEN_IDS, collect_ids, config_values, kept_ids
from squeezelang_plugins.vocab_trim.tokenizer import SUPPORTED_MODELS, check_same_split, trimmed_tokenizer

if TYPE_CHECKING:
    from squeezelang.plugin import ModelHandle, ModelMeta, StageContext

__all__ = ["CONFIG_TOKEN_IDS", "SUPPORTED_MODELS", "VocabTrim", "check_same_split", "collect_ids",
           "config_values", "kept_ids", "register_techniques", "trim_embeddings_", "trimmed_tokenizer"]


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
        from squeezelang.plugin import cache_key, cached_json

        def count() -> int:
            from squeezelang.plugin import load_tokenizer, read_config
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
