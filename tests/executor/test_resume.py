"""Interrupted runs and searches: what is kept, what the message says, and what ``--force`` discards."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from squeezelang.cli import main
from squeezelang.errors import OutputError
from squeezelang.executor.artifacts import PUBLISHING, check_output_dir, work_dir
from squeezelang.executor.checkpoint import WorkDir

#: A technique that counts its runs in ``DIR/count`` and is interrupted (as by Ctrl-C) on the run
#: whose number ``DIR/stop_at`` holds.
STOP_PLUGIN = '''
from pathlib import Path
from squeezelang import hookimpl
from squeezelang.hooks.technique import Technique

class Stop(Technique):
    name = "stop"
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"dir": {"type": "string"}}, "required": ["dir"]}
    def estimate(self, meta, params):
        return meta
    def apply_(self, handle, params, ctx):
        count, stop = Path(params["dir"], "count"), Path(params["dir"], "stop_at")
        n = int(count.read_text()) + 1 if count.exists() else 1
        count.write_text(str(n))
        if stop.exists() and int(stop.read_text()) == n:
            raise KeyboardInterrupt

@hookimpl
def register_techniques(registry):
    registry.add(Stop())
'''


@pytest.fixture()
def stopper(tmp_path: Path, monkeypatch) -> Path:
    """The directory that drives the ``stop`` technique (its plugin module importable by name)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "stop_plugin.py").write_text(STOP_PLUGIN)
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    return ctl


def runs(ctl: Path) -> int:
    return int((ctl / "count").read_text())


def test_interrupt_names_what_is_kept_and_the_command_that_resumes(tmp_path: Path, tiny_bert_dir: Path,
                                                                   stopper: Path, capsys):
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(f'model = hf("{tiny_bert_dir}", task = "embedding")\n'
                      'stage sparse: prune { ratio = 0.5 }\n'
                      f'stage halt: stop {{ dir = "{stopper}" }}\n'
                      'constraints { size <= 90% }\n')
    out = tmp_path / "out"
    argv = ["run", str(recipe), "-o", str(out), "--plugin", "stop_plugin"]
    (stopper / "stop_at").write_text("1")
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"kept 1 completed stage checkpoint in {work_dir(out)}" in err
    assert f"run the same command again to resume:\n    {shlex.join(['squeeze', *argv])}" in err
    assert main(argv) == 0  # that very command: nothing blocks it, and it resumes
    assert "resuming after stage 'sparse'" in capsys.readouterr().out


def test_checkpoints_of_a_model_changed_since_are_not_resumed(tmp_path: Path, tiny_bert_dir: Path,
                                                              stopper: Path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    recipe = tmp_path / "r.squeeze"
    recipe.write_text(f'model = hf("{model}", task = "embedding")\n'
                      'stage sparse: prune { ratio = 0.5 }\n'
                      f'stage halt: stop {{ dir = "{stopper}" }}\n')
    out = tmp_path / "out"
    argv = ["run", str(recipe), "-o", str(out), "--plugin", "stop_plugin"]
    (stopper / "stop_at").write_text("1")
    assert main(argv) == 130
    capsys.readouterr()
    config = model / "config.json"
    config.write_text(config.read_text().replace("}", ', "note": "retrained"}', 1))
    assert main(argv) == 2  # the checkpoints are of the old weights: refused, not resumed
    assert "input files changed since" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    out_text = capsys.readouterr()
    assert "resuming" not in out_text.out and "discarding 1 completed stage checkpoint" in out_text.err


def test_interrupted_search_keeps_its_trials(tmp_path: Path, tiny_bert_dir: Path, sentences_file: Path,
                                             stopper: Path, capsys):
    recipe = tmp_path / "s.squeeze"
    recipe.write_text(f'model = hf("{tiny_bert_dir}", task = "embedding")\n'
                      f'data calib = text("{sentences_file}")\n'
                      'metric faithful = fidelity(calib)\n'
                      'stage sparse: prune { ratio = auto(0.1 .. 0.9) }\n'
                      f'stage halt: stop {{ dir = "{stopper}" }}\n'
                      'constraints { faithful >= 1.5 }\n'  # never met: every trial runs
                      'search { strategy = "grid", trials = 3 }\n')
    out = tmp_path / "out"
    argv = ["run", str(recipe), "-o", str(out), "--plugin", "stop_plugin"]
    (stopper / "stop_at").write_text("3")  # Ctrl-C in the third trial
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"kept 2 measured search trials in {work_dir(out)}" in err
    kept = json.loads((work_dir(out) / "trials.json").read_text())["trials"]
    before = sum(t["seconds"] for t in kept.values())
    assert len(kept) == 2 and before > 0
    (stopper / "stop_at").unlink()
    assert main(argv) == 1  # the constraint cannot be met, but the run completes
    said = capsys.readouterr()
    assert "2 trials of this recipe measured before" in said.out
    assert runs(stopper) == 3 + 2  # the third trial and the final run; the first two were not rerun
    report = json.loads((out / "report.json").read_text())
    assert len(report["trials"]) == 3
    timings = report["timings"]
    assert timings["total"] >= timings["search"] + timings["load"] + timings["save"]
    assert timings["search"] >= before  # the search's time (and its timeout) counts the kept trials
    assert "constraint not met: faithful >= 1.5 (measured " in said.err
    assert not work_dir(out).exists()


def _checkpointed(out: Path, fingerprint: str) -> WorkDir:
    """A work directory holding one completed stage of the recipe ``fingerprint``."""
    work = WorkDir(out)
    state = work.open(fingerprint, force=False)
    (work.path / "stage-00-sparse").mkdir()
    state.completed.append({"stage": "sparse", "dir": "stage-00-sparse"})
    work.save(state)
    return work


def test_force_says_which_checkpoints_it_discards(tmp_path: Path, capsys):
    work = _checkpointed(tmp_path / "out", "a" * 16)
    with pytest.raises(OutputError, match="different recipe"):
        work.open("b" * 16, force=False)
    state = work.open("b" * 16, force=True)
    assert state.completed == []
    assert (f"--force: discarding 1 completed stage checkpoint in {work.path}"
            in capsys.readouterr().err)


def test_force_keeps_and_resumes_the_same_recipes_checkpoints(tmp_path: Path, capsys):
    work = _checkpointed(tmp_path / "out", "a" * 16)
    assert [c["stage"] for c in work.open("a" * 16, force=True).completed] == ["sparse"]
    assert "--force: keeping 1 completed stage checkpoint" in capsys.readouterr().err


def test_force_says_it_replaces_the_previous_output(tmp_path: Path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    check_output_dir(out, force=True)
    assert f"--force: discarding the previous output {out} (1 file)" in capsys.readouterr().err


def test_a_run_stopped_while_publishing_is_resumed_without_force(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    with pytest.raises(OutputError, match="--force"):
        check_output_dir(out, force=False)
    work = _checkpointed(out, "a" * 16)
    work.mark_publishing()
    check_output_dir(out, force=False)  # the output is that run's own: the same command goes on
    work.remove()
    assert not work.path.exists()
