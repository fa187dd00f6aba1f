"""The in-memory model as stages see it: the torch module plus what it takes to save it back."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("embedding", "causal-lm", "masked-lm", "classification")


@dataclass
class ModelHandle:
    """A loaded model with its tokenizer and storage annotations.

    ``codecs`` maps a state-dict tensor name to how it is stored on disk (see ``models.codec``): a
    stage that quantizes or sparsifies a weight keeps the *dequantized* values in the module (so every
    in-memory measurement already sees the loss) and records the codec, which encodes those values
    losslessly when saved. ``edits`` lists non-standard structural changes, each a dict with at least
    ``"technique"``, that the technique's ``rebuild_`` replays when the saved model is loaded.
    ``source_dir`` is the input model directory whose other files (tokenizer, sentence-transformers
    ``modules.json``, pooling config) are copied next to the saved weights.
    """

    model: Any
    tokenizer: Any
    task: str
    source_dir: Path | None = None
    codecs: dict[str, dict[str, Any]] = field(default_factory=dict)
    edits: list[dict[str, Any]] = field(default_factory=list)
    states: set[str] = field(default_factory=set)
    #: Tokenizer files rewritten by a stage (``vocab_trim``): saved instead of the source's copies.
    tokenizer_changed: bool = False

    @property
    def config(self) -> Any:
        return self.model.config
