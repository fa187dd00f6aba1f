"""What a stage's ``apply_`` and a metric's ``measure`` receive: data, the original, seed, progress."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from squeezelang.errors import ExecutionError

if TYPE_CHECKING:
    from squeezelang.models.handle import ModelHandle


class DataStore:
    """The recipe's declared data sets, loaded on first use through their source plugins."""

    def __init__(self, loaders: dict[str, Callable[[], list[dict[str, Any]]]] | None = None) -> None:
        self._loaders = dict(loaders or {})
        self._rows: dict[str, list[dict[str, Any]]] = {}
        #: Where each data set comes from (its file), for messages about its rows.
        self.origins: dict[str, str] = {}

    def add(self, name: str, rows_or_loader: list[dict[str, Any]] | Callable[[], list[dict[str, Any]]],
            origin: str | None = None) -> None:
        if callable(rows_or_loader):
            self._loaders[name] = rows_or_loader
        else:
            self._rows[name] = list(rows_or_loader)
        if origin:
            self.origins[name] = origin

    def names(self) -> list[str]:
        return sorted(set(self._loaders) | set(self._rows))

    def rows(self, name: str) -> list[dict[str, Any]]:
        if name not in self._rows:
            if name not in self._loaders:
                raise ExecutionError(f"no data set named '{name}'")
            rows = self._loaders[name]()
            if not rows:
                where = f" ({self.origins[name]})" if name in self.origins else ""
                raise ExecutionError(f"data set '{name}'{where} is empty")
            self._rows[name] = rows
        return self._rows[name]

    def texts(self, name: str, renames: dict[str, str] | None = None,
              limit: int | None = None) -> list[str]:
        """Every text of a data set: its ``text`` column, or both ``a`` and ``b`` of a pair set."""
        renames = renames or {}
        rows = self.rows(name)
        text_col = renames.get("text", "text")
        cols = [text_col] if text_col in rows[0] else [
            renames.get(r, r) for r in ("a", "b") if renames.get(r, r) in rows[0]]
        if not cols:
            raise ExecutionError(f"data set '{name}' has no 'text' column nor 'a'/'b' columns "
                                 f"(it has {', '.join(rows[0])})")
        out = [str(r[c]) for r in rows for c in cols if r.get(c) not in (None, "")]
        return out[:limit] if limit else out


@dataclass
class Context:
    """Shared by stages (``apply_``) and metrics (``measure``) during one run."""

    data: DataStore = field(default_factory=DataStore)
    seed: int = 0
    threads: int = 2
    stage: str | None = None
    #: The saved artifact directory, for metrics measured on files (``size``).
    artifact_dir: Path | None = None
    #: Globs of the files in ``artifact_dir`` that hold the model (its format's ``model_files``);
    #: ``None``: a squeeze or transformers directory.
    artifact_files: tuple[str, ...] | None = None
    #: Loads the original model (the ``original`` of a recipe) once, on first call.
    original_loader: Callable[[], ModelHandle] | None = None
    #: Values computed once per run and reused (e.g. the original's reference outputs).
    cache: dict[Any, Any] = field(default_factory=dict)
    quiet: bool = False
    #: The input model's directory (set while planning, for estimates that read its tokenizer).
    model_dir: Path | None = None
    #: What each stage said through ``log`` (stage name -> messages), for its report record.
    logs: dict[str, list[str]] = field(default_factory=dict)
    #: What each metric said through ``log`` while it measured (metric name -> messages), from
    #: its latest measurement: the saved artifact's, for the report.
    metric_notes: dict[str, list[str]] = field(default_factory=dict)
    _original: ModelHandle | None = None

    def release_original(self) -> ModelHandle | None:
        """Forget the loaded original and hand it over (a later ``original()`` loads it again)."""
        handle, self._original = self._original, None
        return handle

    def original(self) -> ModelHandle:
        if self._original is None:
            if self.original_loader is None:
                raise ExecutionError("the original model is not available in this context")
            self._original = self.original_loader()
        return self._original

    def progress(self, iterable: Iterable[Any] | None = None, total: int | None = None,
                 desc: str = "") -> Any:
        """A progress bar on stderr (silent when ``quiet``)."""
        from tqdm.auto import tqdm

        label = f"{self.stage}: {desc}" if self.stage and desc else (desc or self.stage or "")
        return tqdm(iterable, total=total, desc=label, leave=False, file=sys.stderr,
                    disable=self.quiet, dynamic_ncols=True)

    def log(self, message: str) -> None:
        """Print a message (unless ``quiet``); a stage's messages also go into its report record."""
        if self.stage:
            self.logs.setdefault(self.stage, []).append(message)
        if not self.quiet:
            prefix = f"[{self.stage}] " if self.stage else ""
            print(prefix + message, file=sys.stderr)


# Stages and metrics receive the same object; the names document which side uses it.
StageContext = Context
MeasureContext = Context
