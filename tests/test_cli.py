"""The command line as a user meets it: output format, exit codes, and a torch-free check."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from squeezelang.cli import main

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, model: Path, body: str) -> Path:
    path = tmp_path / "r.squeeze"
    path.write_text(f'model = hf("{model}", task = "embedding")\n' + body, encoding="utf-8")
    return path


def test_check_ok(tmp_path, tiny_bert_dir, capsys):
    path = write(tmp_path, tiny_bert_dir, 'stage p: prune { ratio = 0.5 }\n')
    assert main(["check", str(path)]) == 0
    assert "ok" in capsys.readouterr().out


def test_check_error_format(tmp_path, tiny_bert_dir, capsys):
    path = write(tmp_path, tiny_bert_dir, 'stage p: prun { ratio = 0.5 }\n')
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2:10: error: unknown technique 'prun'" in err
    assert "stage p: prun { ratio = 0.5 }" in err
    assert "\n" + " " * 8 + "|          ^^^^" in err or "^^^^" in err
    assert "did you mean 'prune'" in err
    assert "Traceback" not in err


def test_check_syntax_error(tmp_path, tiny_bert_dir, capsys):
    path = write(tmp_path, tiny_bert_dir, 'stage p: prune { ratio = }\n')
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2:" in err and "error:" in err and "Traceback" not in err


def test_check_missing_file(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope.squeeze")]) == 2
    assert "nope.squeeze" in capsys.readouterr().err


def test_check_does_not_import_torch(tmp_path, tiny_bert_dir):
    path = write(tmp_path, tiny_bert_dir, 'data d = text("d.txt")\nmetric f = fidelity(d)\n'
                                          'stage p: prune { ratio = 0.5 }\nconstraints { size <= 50% }\n')
    (tmp_path / "d.txt").write_text("hello\n")
    code = ("import sys; from squeezelang.cli import main; rc = main(['check', sys.argv[1]]); "
            "heavy = [m for m in ('torch', 'transformers', 'numpy', 'scipy') if m in sys.modules]; "
            "print(rc, heavy)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout + out.stderr


def test_plan_json_predicts_size(tmp_path, tiny_bert_dir, capsys):
    path = write(tmp_path, tiny_bert_dir, 'stage p: prune { ratio = 0.5 }\nstage q: quantize { scheme = "int8" }\n'
                                          'constraints { size <= 1% }\n')
    assert main(["plan", str(path), "--json"]) == 1  # refused: fixed settings cannot reach 1%
    data = json.loads(capsys.readouterr().out)  # the prediction that shows why comes first
    stages = data["prediction"]["stages"]
    assert [s["stage"] for s in stages] == ["p", "q"]
    assert stages[0]["size_bytes"] > stages[1]["size_bytes"]
    assert data["prediction"]["constraints"][0]["met"] is False  # flagged before running
    assert data["plan"]["stages"][0]["params"]["method"] == "magnitude"


def test_plan_text(tmp_path, tiny_bert_dir, capsys):
    path = write(tmp_path, tiny_bert_dir, 'stage p: prune { ratio = 0.5 }\nconstraints { size <= 1% }\n')
    assert main(["plan", str(path)]) == 1
    out = capsys.readouterr().out
    assert "stage 1 'p': prune (magnitude)" in out and "PREDICTED NOT MET" in out


def test_run_exit_codes(tmp_path, tiny_bert_dir, capsys):
    path = write(tmp_path, tiny_bert_dir, 'stage p: prune { ratio = 0.5 }\nconstraints { size <= 90% }\n')
    assert main(["run", str(path), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert main(["run", str(path), "-o", str(tmp_path / "out"), "-q"]) == 2  # refused: not empty
    assert "--force" in capsys.readouterr().err
    # dense zeros: the estimates do not predict this format's size, so it is measured, and not met
    path = write(tmp_path, tiny_bert_dir, 'stage p: prune { ratio = 0.5 }\nconstraints { size <= 1% }\n'
                                          'output "o" { format = "dense" }\n')
    assert main(["run", str(path), "-o", str(tmp_path / "out2"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "constraint not met: size <= 1%" in err
    # human units; a relative bound both as a share of the original and in bytes
    assert re.search(r"size <= 1% \(measured [\d.]+ [KM]B = [\d.]+% of the original [\d.]+ [KM]B; "
                     r"bound [\d.]+ [KM]B = 1\.0%\)", err), err


def test_plugins_lists_schemas_and_knobs(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("prune", "factorize", "quantize", "fidelity", "spearman", "csv", "hf"):
        assert name in out
    assert "knobs: ratio" in out
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    prune = next(t for t in data["techniques"] if t["name"] == "prune")
    assert prune["schema"]["additionalProperties"] is False
    families = {f["name"]: f for f in data["model_families"]}
    assert {"bert", "gpt2", "llama", "qwen3", "gemma3_text"} <= set(families)
    assert families["llama"]["model_types"] == ["llama"]


def test_explain(capsys):
    assert main(["explain", "prune"]) == 0
    assert "ratio" in capsys.readouterr().out
    assert main(["explain", "prun"]) == 2
    assert "did you mean 'prune'" in capsys.readouterr().err


def test_console_script_installed():
    out = subprocess.run([str(Path(sys.executable).parent / "squeeze"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "exit codes" in out.stdout


def test_version_without_torch():
    import importlib.metadata

    code = ("import sys; from squeezelang.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit as exc:\n    code = exc.code\n"
            "print(code, [m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [f"squeeze {importlib.metadata.version('squeezelang')}", "0 []"]


def test_tilde_is_the_home_directory_and_outputs_get_user_modes(tmp_path, tiny_bert_dir, monkeypatch,
                                                                 capsys):
    import os
    import shutil
    import stat

    from squeezelang_plugins.sources import HfSource

    home = tmp_path / "home"
    shutil.copytree(tiny_bert_dir, home / "model")
    (home / "calib.txt").write_text("one sentence\nanother sentence\n")
    monkeypatch.setenv("HOME", str(home))
    recipe = tmp_path / "recipes" / "r.squeeze"
    recipe.parent.mkdir()
    recipe.write_text('model = hf("~/model", task = "embedding")\ndata calib = text("~/calib.txt")\n'
                      'metric faithful = fidelity(calib)\nstage p: prune { ratio = 0.5 }\n'
                      'output "~/out"\n')
    assert main(["check", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["plan", str(recipe), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["model"]["args"]["path"] == str(home / "model")
    assert plan["data"][0]["args"]["path"] == str(home / "calib.txt")
    assert plan["output_dir"] == str(home / "out")
    assert HfSource().locate({"path": "~/model"}) == home / "model"
    old = os.umask(0o027)
    try:
        assert main(["run", str(recipe), "-o", "~/o2", "-q"]) == 0
    finally:
        os.umask(old)
    out = home / "o2"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()} == {0o640}
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_dir()} <= {0o750}
