"""Built-in data sources: ``text`` (one example a line), ``csv`` and ``jsonl``.

Rows are dicts of column -> value. Values stay as the file holds them (CSV fields are strings, JSON
values keep their JSON type); the metric that reads a numeric column converts it and names the data
set and row when it cannot. ``columns`` reads no further than the first example (so that
``squeeze check``, which calls it for every declared data set, refuses an empty file); ``load`` reads
everything and names the file and line of the first bad one (wrong field count, broken JSON, bytes
that are not UTF-8).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import IO, Any, Iterator

from squeezelang.plugin import DataSource, SqueezeError, hookimpl

_PATH = {"type": "string", "description": "the file (relative to the recipe)"}
_LIMIT = {"type": "integer", "minimum": 1, "description": "read at most this many examples"}
_NAMES = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
          "uniqueItems": True}


def _open(path: str, newline: str | None = None) -> IO[str]:
    """Open a UTF-8 text file (a leading byte-order mark is dropped), or raise naming it."""
    file = Path(path).expanduser()
    try:
        if file.is_dir():
            raise SqueezeError(f"{path}: is a directory, not a data file")
        return file.open(encoding="utf-8-sig", newline=newline)
    except FileNotFoundError:
        raise SqueezeError(f"{path}: no such data file") from None
    except OSError as exc:
        raise SqueezeError(f"{path}: cannot read the data file: {exc.strerror or exc}") from None


def _not_utf8(path: str, exc: UnicodeDecodeError) -> SqueezeError:
    """The error for a file that is not UTF-8, naming the first line that does not decode.

    Text is decoded in chunks, so the line being read when the error surfaced is not the one at
    fault; the file is scanned again, as bytes, to find it.
    """
    number = 0
    with Path(path).expanduser().open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                break
    return SqueezeError(f"{path}:{number}: not valid UTF-8 text ({exc.reason}); save the file as "
                        "UTF-8")


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of every non-blank line, without its line ending."""
    with _open(path) as fh:
        try:
            for number, line in enumerate(fh, start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield number, line
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, exc) from None


def _empty(path: str, what: str) -> SqueezeError:
    """The error for a data file without a single example (refused by ``squeeze check``)."""
    return SqueezeError(f"{path}: holds no {what}; a data set needs at least one example")


class TextSource(DataSource):
    """``text(path, limit = N)``: one example a line, in a column named ``text``."""

    name = "text"
    description = "plain text, one example per line (blank lines skipped); column 'text'"
    schema = {"type": "object", "properties": {"path": _PATH, "limit": _LIMIT},
              "required": ["path"], "additionalProperties": False}

    def columns(self, args: dict[str, Any]) -> list[str]:
        for _ in _lines(args["path"]):  # the first example is enough
            return ["text"]
        raise _empty(args["path"], "example (the file is empty or every line is blank)")

    def load(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        limit = args.get("limit")
        rows = []
        for _, line in _lines(args["path"]):
            if limit is not None and len(rows) >= limit:
                break
            rows.append({"text": line})
        if not rows:
            raise _empty(args["path"], "example (the file is empty or every line is blank)")
        return rows


class CsvSource(DataSource):
    """``csv(path, columns = [...], delimiter = ",", header = bool, limit = N)``.

    With ``columns`` the file has no header row unless ``header = true`` (then the header row is
    skipped and ``columns`` renames its fields); without ``columns`` the header row names them.
    """

    name = "csv"
    description = ("comma-separated values with CSV quoting; 'columns' names the fields (the file "
                   "then has no header row unless header = true), else the header row does")
    schema = {
        "type": "object",
        "properties": {
            "path": _PATH,
            "columns": {**_NAMES, "description": "the names of the fields, in file order"},
            "delimiter": {"type": "string", "minLength": 1, "maxLength": 1, "default": ","},
            "header": {"type": "boolean", "description": "whether the first row is a header "
                       "(default: true without 'columns', false with them)"},
            "limit": _LIMIT,
        },
        "required": ["path"],
        "additionalProperties": False,
    }

    def _rows(self, args: dict[str, Any]) -> Iterator[tuple[int, list[str], list[str]]]:
        """``(line, names, fields)`` of each data row; the first item is the names alone."""
        path = args["path"]
        names = args.get("columns")
        header = args.get("header", names is None)
        if names is None and not header:
            raise SqueezeError(f"{path}: csv with header = false needs columns = [...] to name "
                               "its fields")
        with _open(path, newline="") as fh:
            # strict: an unclosed quote is an error, not the rest of the file swallowed as one field
            reader = csv.reader(fh, delimiter=args.get("delimiter", ","), strict=True)
            read = 0  # lines read up to the end of the last complete row
            try:
                first = True
                for fields in reader:
                    read = reader.line_num
                    if not fields or (len(fields) == 1 and not fields[0].strip()):
                        continue  # blank line
                    if first and header:
                        first = False
                        if names is None:
                            names = [f.strip() for f in fields]
                            if len(set(names)) != len(names) or "" in names:
                                raise SqueezeError(f"{path}:{reader.line_num}: the header row "
                                                   "has empty or repeated column names")
                        if len(fields) != len(names):
                            raise SqueezeError(
                                f"{path}:{reader.line_num}: the header row has {len(fields)} "
                                f"fields but columns names {len(names)}")
                        yield reader.line_num, names, []
                        continue
                    if first:
                        first = False
                        yield 0, names, []
                    if len(fields) != len(names):
                        raise SqueezeError(f"{path}:{reader.line_num}: expected {len(names)} "
                                           f"fields ({', '.join(names)}), found {len(fields)}")
                    yield reader.line_num, names, fields
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, exc) from None
            except csv.Error as exc:
                hint = "; a quote opened in this row is never closed" if "end of data" in str(exc) else ""
                raise SqueezeError(f"{path}:{read + 1}: bad CSV: {exc}{hint}") from None
        if first:
            raise SqueezeError(f"{path}: the file is empty" + (
                "" if names is not None else "; it needs a header row or columns = [...]"))

    def columns(self, args: dict[str, Any]) -> list[str]:
        rows = self._rows(args)
        _, names, _ = next(rows)  # the header (an empty file raises)
        try:
            next(rows)  # a data row must follow; a bad one is left for ``load`` to name
        except StopIteration:
            raise _empty(args["path"], "data row" + (" after the header" if args.get(
                "header", not args.get("columns")) else "")) from None
        except SqueezeError:
            pass
        finally:
            rows.close()
        return list(names)

    def load(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        limit = args.get("limit")
        rows: list[dict[str, Any]] = []
        for _, names, fields in self._rows(args):
            if not fields:
                continue
            if limit is not None and len(rows) >= limit:
                break
            rows.append(dict(zip(names, fields)))
        if not rows:
            raise _empty(args["path"], "data row" + (" after the header" if args.get(
                "header", not args.get("columns")) else ""))
        return rows


class JsonlSource(DataSource):
    """``jsonl(path, fields = [...], limit = N)``: one JSON object a line.

    ``fields`` selects the columns (every row must have them); without it the first object's keys
    are the columns and rows are kept whole.
    """

    name = "jsonl"
    description = ("JSON lines, one object per line; 'fields' selects the columns (default: the "
                   "first object's keys)")
    schema = {
        "type": "object",
        "properties": {
            "path": _PATH,
            "fields": {**_NAMES, "description": "the keys to read from every object"},
            "limit": _LIMIT,
        },
        "required": ["path"],
        "additionalProperties": False,
    }

    def _objects(self, path: str) -> Iterator[tuple[int, dict[str, Any]]]:
        for number, line in _lines(path):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SqueezeError(f"{path}:{number}: not valid JSON: {exc.msg} "
                                   f"(column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise SqueezeError(f"{path}:{number}: expected a JSON object, found "
                                   f"{type(obj).__name__}")
            yield number, obj

    def columns(self, args: dict[str, Any]) -> list[str]:
        for _, obj in self._objects(args["path"]):  # the first object is enough
            return list(args.get("fields") or obj)
        raise _empty(args["path"], "JSON object (the file is empty or every line is blank)")

    def load(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        path, fields, limit = args["path"], args.get("fields"), args.get("limit")
        rows: list[dict[str, Any]] = []
        for number, obj in self._objects(path):
            if limit is not None and len(rows) >= limit:
                break
            if fields:
                missing = [f for f in fields if f not in obj]
                if missing:
                    raise SqueezeError(f"{path}:{number}: the object has no "
                                       f"{', '.join(repr(m) for m in missing)}")
                obj = {f: obj[f] for f in fields}
            rows.append(obj)
        if not rows:
            raise _empty(path, "JSON object (the file is empty or every line is blank)")
        return rows


@hookimpl
def register_data_sources(registry: Any) -> None:
    registry.add(TextSource())
    registry.add(CsvSource())
    registry.add(JsonlSource())
