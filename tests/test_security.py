"""Security: no pickle, no remote code, no code from recipes, no writes outside the output directory.

- Weights are read only through safetensors; the source never calls ``pickle.load``, ``torch.load``
  without ``weights_only=True``, ``eval``/``exec``/``__import__``, and never turns on
  ``trust_remote_code`` (an AST scan of ``squeezelang/`` and ``plugins/``, not a regex).
- A recipe cannot turn on remote code, import a module or run code: the language has no import,
  ``use`` only checks that a distribution is installed, plugins come from entry points or
  ``--plugin``.
- A model directory that ships code (``auto_map``) loads without running it; one with only a pickle
  (``pytorch_model.bin``) is refused without unpickling it.
- Output confinement: everything a run writes is inside the output directory or its hidden siblings
  (``.<out>.tmp-*`` staging, ``.<out>.squeeze-work``) next to it; symlinks in the model directory are
  never followed to write, nor to copy files from outside it; an output that would replace an input is
  refused.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest

import squeezelang
from squeezelang.cli import main
from squeezelang.errors import ExecutionError, OutputError, RecipeErrors, SqueezeError
from squeezelang.hooks.sources import OutputFormat

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.joinpath("squeezelang").rglob("*.py"), *ROOT.joinpath("plugins").rglob("*.py")])
#: Modules allowed to import a module by name: the lazy public API (a fixed table) and the plugin
#: manager (``--plugin MODULE``, given on the command line or to the API, never by a recipe).
#: Modules that import by name: the lazy public API and plugin-author surface (fixed tables of our
#: own modules) and the plugin manager (installed entry points, or a module named on the command line).
IMPORT_BY_NAME = {"squeezelang/__init__.py", "squeezelang/plugin.py", "squeezelang/hooks/manager.py"}
SENTENCES = "a man is playing a guitar\nthe cat sits on the mat\na dog runs in the park\n"


# ---------------------------------------------------------------------------- the source
def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(tree: ast.AST, rel: str) -> list[str]:
    """Every call in ``tree`` that could run code from a file or a recipe, as ``line: what``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve",
                                          "joblib"):
                    found.append(f"{node.lineno}: imports {name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        short = name.rsplit(".", 1)[-1]
        if name in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"):
            found.append(f"{node.lineno}: {name}()")
        if name.endswith(("pickle.load", "pickle.loads", "pickle.Unpickler")):
            found.append(f"{node.lineno}: {name}()")
        if name == "torch.load" and not _is_const(_keyword(node, "weights_only"), True):
            found.append(f"{node.lineno}: torch.load without weights_only=True")
        if short == "import_module" and rel not in IMPORT_BY_NAME:
            found.append(f"{node.lineno}: {name}()")
        remote = _keyword(node, "trust_remote_code")
        if remote is not None and not _is_const(remote, False):
            found.append(f"{node.lineno}: trust_remote_code not False")
        receiver = name.rsplit(".", 2)[-2] if name.count(".") else ""
        transformers_call = short == "from_pretrained" or (
            short == "from_config" and (receiver == "cls" or receiver.startswith("Auto")))
        if transformers_call and not _is_const(remote, False):
            found.append(f"{node.lineno}: {name}() without trust_remote_code=False")
        if short == "from_pretrained" and not _is_const(_keyword(node, "local_files_only"), True):
            found.append(f"{node.lineno}: {name}() without local_files_only=True")
        if name in ("os.system", "os.popen") or name.startswith("subprocess."):
            found.append(f"{node.lineno}: {name}()")
    return found


def test_the_scan_finds_what_it_looks_for():
    bad = '''
import pickle
torch.load(f)
torch.load(f, weights_only=False)
eval("1")
exec(text)
AutoModel.from_pretrained(d, trust_remote_code=True, local_files_only=True)
AutoModel.from_pretrained(d)
importlib.import_module(name)
'''
    found = unsafe_calls(ast.parse(bad), "x.py")
    assert {int(f.split(":")[0]) for f in found} == set(range(2, 10)), found
    good = '''
torch.load(f, weights_only=True)
model.eval()
AutoModel.from_pretrained(d, local_files_only=True, trust_remote_code=False)
# eval(x) pickle.load(f) in a comment
"exec(x) in a string"
'''
    assert unsafe_calls(ast.parse(good), "x.py") == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_unsafe_call_in_the_source(path: Path):
    rel = path.relative_to(ROOT).as_posix()
    found = unsafe_calls(ast.parse(path.read_text(encoding="utf-8"), str(path)), rel)
    assert not found, f"{rel}: " + "; ".join(found)


# ---------------------------------------------------------------------------- recipes run no code
@pytest.fixture()
def workspace(tmp_path: Path, tiny_bert_dir: Path) -> Path:
    shutil.copytree(tiny_bert_dir, tmp_path / "model")
    (tmp_path / "calib.txt").write_text(SENTENCES, encoding="utf-8")
    return tmp_path


@pytest.fixture()
def evil_module(tmp_path: Path, monkeypatch) -> Path:
    """An importable module ``evil_mod`` that writes a marker file when imported; the marker's path."""
    marker = tmp_path / "IMPORTED"
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "evil_mod.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    monkeypatch.syspath_prepend(str(lib))
    monkeypatch.delitem(sys.modules, "evil_mod", raising=False)
    return marker


def check(capsys, recipe: Path) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["check", str(recipe)])
    return code, capsys.readouterr().err


REFUSED_RECIPES = [
    pytest.param('model = hf("model", trust_remote_code = true)\n',
                 "1:21: error: unknown parameter 'trust_remote_code'", id="trust-remote-code"),
    pytest.param('model = hf("model", trust_remote_code = "yes")\n', "trust_remote_code",
                 id="trust-remote-code-str"),
    pytest.param('use "evil_mod"\nmodel = hf("model")\n', "plugin distribution 'evil_mod' is not installed",
                 id="use-a-module"),
    pytest.param('use "os"\nmodel = hf("model")\n', "plugin distribution 'os' is not installed", id="use-os"),
    pytest.param('use "some_not_installed_dist"\nmodel = hf("model")\n',
                 "'some_not_installed_dist' is not installed", id="use-not-installed"),
    pytest.param('import evil_mod\nmodel = hf("model")\n', "error", id="import-statement"),
    pytest.param('model = hf(__import__("evil_mod"))\n', "error", id="dunder-import-call"),
    pytest.param('model = evil_mod("model")\n', "unknown model source 'evil_mod'", id="module-as-source"),
    pytest.param('model = hf("model")\nstage s: evil_mod { }\n', "unknown technique 'evil_mod'",
                 id="module-as-technique"),
    pytest.param('model = hf("model")\ndata d = text(eval("1"))\n', "error", id="eval-call"),
]


@pytest.mark.parametrize("text, message", REFUSED_RECIPES)
def test_a_recipe_cannot_import_or_run_code(capsys, workspace: Path, evil_module: Path, text: str,
                                            message: str):
    recipe = workspace / "r.squeeze"
    recipe.write_text(text, encoding="utf-8")
    code, err = check(capsys, recipe)
    assert code == 2 and message in err, err
    assert f"{recipe}:" in err and "Traceback" not in err
    capsys.readouterr()
    assert main(["run", str(recipe), "-o", str(workspace / "out")]) == 2
    assert not evil_module.exists() and "evil_mod" not in sys.modules
    assert not (workspace / "out").exists()


def test_only_an_explicit_plugin_flag_imports_a_module(capsys, workspace: Path, evil_module: Path):
    """The one way to bring code in is ``--plugin MODULE`` on the command line (or the API's plugins)."""
    recipe = workspace / "r.squeeze"
    recipe.write_text('model = hf("model")\n', encoding="utf-8")
    assert check(capsys, recipe)[0] == 0 and not evil_module.exists()
    capsys.readouterr()
    assert main(["check", str(recipe), "--plugin", "evil_mod"]) == 0
    assert evil_module.exists()


# ---------------------------------------------------------------------------- model directories
def _remote_code_model(model: Path, marker: Path, model_type: str = "bert") -> None:
    """Give ``model`` an ``auto_map`` pointing at modules that write ``marker`` when imported."""
    code = (f"open({str(marker)!r}, 'w').write('remote code ran')\n"
            "from transformers import BertConfig, BertModel, BertTokenizerFast\n"
            "class EvilConfig(BertConfig):\n    model_type = 'evil'\n"
            "class EvilModel(BertModel):\n    config_class = EvilConfig\n"
            "class EvilTokenizer(BertTokenizerFast):\n    pass\n")
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (model / name).write_text(code, encoding="utf-8")
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModel": "modeling_evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (model / "tokenizer_config.json").write_text(json.dumps(tok), encoding="utf-8")


def test_remote_code_in_a_known_architecture_is_never_run(capsys, workspace: Path):
    marker = workspace / "REMOTE_CODE_RAN"
    _remote_code_model(workspace / "model", marker)
    recipe = workspace / "r.squeeze"
    recipe.write_text('model = hf("model")\ndata calib = text("calib.txt")\n'
                      'metric f = fidelity(calib)\nstage q: quantize { scheme = "int8" }\n',
                      encoding="utf-8")
    for argv in (["check", str(recipe)], ["plan", str(recipe)],
                 ["run", str(recipe), "-q", "-o", str(workspace / "out")]):
        assert main(argv) == 0, capsys.readouterr().err
    model = squeezelang.load(workspace / "out")
    assert type(model).__name__ == "BertModel"
    assert not marker.exists()


def test_remote_code_only_architecture_is_refused_without_running_it(capsys, workspace: Path):
    marker = workspace / "REMOTE_CODE_RAN"
    _remote_code_model(workspace / "model", marker, model_type="evil")
    recipe = workspace / "r.squeeze"
    recipe.write_text('model = hf("model")\nstage q: quantize { scheme = "int8" }\n', encoding="utf-8")
    capsys.readouterr()
    assert main(["plan", str(recipe)]) == 3
    assert main(["run", str(recipe), "-o", str(workspace / "out")]) == 3
    err = capsys.readouterr().err
    assert str(workspace / "model") in err and "Traceback" not in err
    with pytest.raises(SqueezeError):
        squeezelang.load(workspace / "model")
    assert not marker.exists() and not (workspace / "out").exists()


class _Payload:
    """Unpickling this writes a file: what a malicious ``pytorch_model.bin`` would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


def test_a_pickle_is_never_unpickled(capsys, workspace: Path):
    model = workspace / "model"
    marker = workspace / "UNPICKLED"
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    recipe = workspace / "r.squeeze"
    recipe.write_text('model = hf("model")\nstage q: quantize { scheme = "int8" }\n', encoding="utf-8")
    code, err = check(capsys, recipe)
    assert code == 2 and f"{model / 'pytorch_model.bin'}: pickle-based weights are never read" in err
    assert main(["run", str(recipe), "-o", str(workspace / "out")]) == 2
    with pytest.raises(SqueezeError):
        squeezelang.load(model)
    from squeezelang.models.load import load_model
    with pytest.raises(SqueezeError):
        load_model(model)
    assert not marker.exists()


# ---------------------------------------------------------------------------- output confinement
def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` -> a digest of what it is (file bytes, link target, directory)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {k for k in set(before) | set(after) if before.get(k) != after.get(k)}


RECIPE = '''model = hf("{model}")
data calib = text("{calib}")
metric f = fidelity(calib)
stage q: quantize {{ scheme = "int8" }}
{output}'''


def test_symlinks_and_odd_names_in_the_model_directory(workspace: Path):
    outside = workspace / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret", encoding="utf-8")
    (outside / "dir").mkdir()
    (outside / "dir" / "inner.txt").write_text("inner secret", encoding="utf-8")
    model = workspace / "model"
    (model / "README.md").write_text("readme", encoding="utf-8")
    os.symlink(outside / "secret.txt", model / "notes.txt")             # a file outside: skipped
    os.symlink("../outside/dir", model / "extra")                       # a directory outside: skipped
    os.symlink("README.md", model / "alias.md")                         # inside: copied as content
    os.symlink(".", model / "loop")                                     # a loop: not followed
    (model / "x..y.txt").write_text("dots", encoding="utf-8")           # dots in a name: a name
    (model / "..hidden").write_text("hidden", encoding="utf-8")         # hidden: skipped
    recipe = workspace / "r.squeeze"
    recipe.write_text(RECIPE.format(model="model", calib="calib.txt", output=""), encoding="utf-8")
    before_outside, before_model = snapshot(outside), snapshot(model)
    squeezelang.run(recipe, output=workspace / "out")
    out = workspace / "out"
    assert not [p for p in out.rglob("*") if p.is_symlink()]
    assert not (out / "notes.txt").exists() and not (out / "extra").exists()
    assert not (out / "loop").exists() and not (out / "..hidden").exists()
    assert (out / "alias.md").read_text() == "readme" and (out / "x..y.txt").read_text() == "dots"
    assert "secret" not in "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file()
                                   and p.suffix in (".txt", ".md", ".json"))
    assert snapshot(outside) == before_outside and snapshot(model) == before_model


def test_copying_never_writes_through_a_symlink_in_the_destination(tmp_path: Path, tiny_bert_dir: Path):
    """A destination prepared with symlinks (a file and a directory pointing outside) is not written
    through: the link is replaced by a plain file, or the file is skipped."""
    from squeezelang.models.save import copy_aux_files

    outside = tmp_path / "outside"
    (outside / "pool").mkdir(parents=True)
    (outside / "victim.txt").write_text("untouched", encoding="utf-8")
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside / "victim.txt", dest / "vocab.txt")
    os.symlink(outside / "pool", dest / "1_Pooling")
    before = snapshot(outside)
    copied = copy_aux_files(tiny_bert_dir, dest)
    assert "vocab.txt" in copied and not (dest / "vocab.txt").is_symlink()
    assert (dest / "vocab.txt").read_bytes() == (tiny_bert_dir / "vocab.txt").read_bytes()
    assert "1_Pooling/config.json" not in copied
    assert snapshot(outside) == before


def test_output_relative_to_the_recipe_may_climb_but_writes_only_there(workspace: Path):
    """``output "../../x"`` is relative to the recipe file (the spec); the run writes the output
    directory and nothing else (its staging and work siblings are gone when it succeeds)."""
    nested = workspace / "a" / "b"
    nested.mkdir(parents=True)
    recipe = nested / "r.squeeze"
    recipe.write_text(RECIPE.format(model="../../model", calib="../../calib.txt",
                                    output='output "../../x"\n'), encoding="utf-8")
    before = snapshot(workspace)
    result = squeezelang.run(recipe)
    assert result.output_dir == workspace / "x"
    assert result.report["output"]["dir"] == str(workspace / "x")
    assert {p.split("/")[0] for p in changed(before, snapshot(workspace))} == {"x"}


def test_output_through_a_symlink_writes_into_its_target(workspace: Path):
    """``-o LINK`` is resolved once: the artifacts go to the link's target, the link is kept, the
    staging and work directories are siblings of the target, and nothing else changes."""
    real = workspace / "real"
    real.mkdir()
    link = workspace / "link"
    os.symlink(real, link)
    recipe = workspace / "r.squeeze"
    recipe.write_text(RECIPE.format(model="model", calib="calib.txt", output=""), encoding="utf-8")
    before = snapshot(workspace)
    result = squeezelang.run(recipe, output=link)
    assert result.output_dir == real and link.is_symlink() and os.readlink(link) == str(real)
    assert (link / "report.json").is_file()
    assert {p.split("/")[0] for p in changed(before, snapshot(workspace))} == {"real"}


@pytest.mark.parametrize("target", ["model", ".", "calib.txt"], ids=["the-model", "the-recipe-dir",
                                                                    "a-data-file"])
def test_an_output_that_would_replace_an_input_is_refused(capsys, workspace: Path, target: str):
    recipe = workspace / "r.squeeze"
    recipe.write_text(RECIPE.format(model="model", calib="calib.txt", output=""), encoding="utf-8")
    before = snapshot(workspace)
    capsys.readouterr()
    assert main(["run", str(recipe), "-o", str(workspace / target), "--force"]) == 2
    err = capsys.readouterr().err
    assert "holds an input of the run" in err and "Traceback" not in err
    assert snapshot(workspace) == before
    with pytest.raises(OutputError, match="holds an input"):
        squeezelang.run(recipe, output=workspace / target, force=True)


class EvilFormat(OutputFormat):
    """An output format that tries to reach outside the artifact directory."""

    def __init__(self, name: str, how: str, outside: Path) -> None:
        self.name, self.how, self.outside = name, how, outside

    def save(self, handle, directory: Path) -> list[str]:
        from squeezelang.models.save import save_model

        files = save_model(handle, directory)
        if self.how == "symlink":
            os.symlink(self.outside, directory / "leak.txt")
            return files + ["leak.txt"]
        return files + ["../escaped.txt"]


class EvilFormatPlugin:
    def __init__(self, outside: Path) -> None:
        self.outside = outside

    @squeezelang.hookimpl
    def register_output_formats(self, registry):
        registry.add(EvilFormat("evil_symlink", "symlink", self.outside))
        registry.add(EvilFormat("evil_name", "name", self.outside))


@pytest.mark.parametrize("fmt", ["evil_symlink", "evil_name"])
def test_an_output_format_cannot_publish_outside_the_artifact(workspace: Path, fmt: str):
    secret = workspace / "secret.txt"
    secret.write_text("secret", encoding="utf-8")
    recipe = workspace / "r.squeeze"
    recipe.write_text(RECIPE.format(model="model", calib="calib.txt",
                                    output=f'output "out" {{ format = "{fmt}" }}\n'), encoding="utf-8")
    with pytest.raises(ExecutionError, match="wrote outside the artifact"):
        squeezelang.run(recipe, plugins=[EvilFormatPlugin(secret)])
    assert not (workspace / "out").exists()
    assert secret.read_text() == "secret"
    assert not [p for p in workspace.iterdir() if p.name.startswith(".out.tmp")]


def test_recipe_errors_are_recipe_errors(workspace: Path):
    """The API raises the same check-time errors (no code imported, nothing written)."""
    recipe = workspace / "r.squeeze"
    recipe.write_text('model = hf("model", trust_remote_code = true)\n', encoding="utf-8")
    with pytest.raises(RecipeErrors, match="1 error"):
        squeezelang.run(recipe, output=workspace / "out")
