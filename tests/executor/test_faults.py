"""Faults: kills at random points, a full disk, an unwritable output, plugins that raise.

The kill test runs ``squeeze run`` as a subprocess on a four-stage recipe, kills it (SIGKILL or
SIGINT) at seeded random points -- after a delay spread over a reference run's wall time, or when a
checkpoint, the staging directory or a publish backup appears -- reruns the same command until it
succeeds, and requires the very bytes and report of an uninterrupted run. While each attempt runs,
the output directory is polled: it is only ever the previous complete output or the new complete
one. ``SQUEEZE_FAULT_POINTS`` (default 3) sets how many kill points are tried and
``SQUEEZE_FAULT_SEED`` (default 0) which ones.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from squeezelang import cli

FAULT_POINTS = int(os.environ.get("SQUEEZE_FAULT_POINTS", "3"))
FAULT_SEED = int(os.environ.get("SQUEEZE_FAULT_SEED", "0"))
RESUME_HINT = "run the same command again to resume"

RECIPE = '''
recipe "faults"
model = hf("{model}", task = "embedding")
data calib = text("calib.txt")
metric faithful = fidelity(calib)
metric latency = latency(seq = 8, warmup = 0, repeats = 1)
stage sparse:  prune     {{ method = "magnitude", ratio = 0.3 }}
stage heal:    distill   {{ teacher = original, data = calib, steps = 6, batch_size = 4 }}
stage lowrank: factorize {{ method = "svd", rank = 8 }}
stage int8:    quantize  {{ scheme = "int8" }}
constraints {{
    size <= 90%
    faithful >= 0.5
}}
'''
STAGES = ("sparse", "heal", "lowrank", "int8")
#: Report keys that differ between runs by nature: wall times, latency, the memory and CPU time
#: used, and whether it resumed.
VOLATILE = frozenset({"timings", "seconds", "measure_seconds", "resources", "resumed_after", "latency"})
#: Files whose bytes must equal the uninterrupted run's (everything but the two reports).
REPORTS = frozenset({"report.json", "report.md"})


# ------------------------------------------------------------------------------------------ helpers
def file_hashes(directory: Path, skip: frozenset[str] = REPORTS) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``directory`` except ``skip``."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in skip}


def normalised(value: Any, paths: dict[str, str] | None = None) -> Any:
    """``report.json`` without what legitimately varies (timings, latency, resumption, paths)."""
    if isinstance(value, dict):
        return {k: normalised(v, paths) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [normalised(v, paths) for v in value]
    if isinstance(value, str) and paths:
        for old, new in paths.items():
            value = value.replace(old, new)
    return value


def report_of(out: Path) -> Any:
    return normalised(json.loads((out / "report.json").read_text()), {str(out): "<out>"})


def siblings(out: Path) -> list[str]:
    """Hidden siblings of ``out``: work, staging and backup directories."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}*"))


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.squeeze-work"


def completed_prefix(out: Path) -> list[str]:
    """The stages a rerun can resume after: the checkpointed prefix recorded in ``state.json``."""
    state = work_dir(out) / "state.json"
    try:
        data = json.loads(state.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    done = {c["stage"] for c in data.get("completed", []) if (work_dir(out) / c["dir"]).is_dir()}
    prefix = []
    for name in STAGES:
        if name not in done:
            break
        prefix.append(name)
    return prefix


def write_recipe(directory: Path, model_dir: Path, sentences: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sentences, directory / "calib.txt")
    recipe = directory / "faults.squeeze"
    recipe.write_text(RECIPE.format(model=model_dir))
    return recipe


def command(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "squeezelang.cli", "run", str(recipe), "-o", str(out), "--force",
            *extra]


def environment(*paths: Path) -> dict[str, str]:
    pythonpath = os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": pythonpath}


# ------------------------------------------------------------------------------------------ reference
@dataclass
class Reference:
    recipe: Path
    out: Path
    seconds: float
    hashes: dict[str, str]
    report: Any
    names: frozenset[str]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert_dir: Path) -> Reference:
    """One uninterrupted CLI run: what every interrupted-then-resumed run must reproduce."""
    from conftest import SENTENCES

    ws = tmp_path_factory.mktemp("faults")
    sentences = ws / "sentences.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n")
    recipe = write_recipe(ws, tiny_bert_dir, sentences)
    out = ws / "ref" / "out"
    started = time.monotonic()
    done = subprocess.run(command(recipe, out), capture_output=True, text=True, cwd=ws,
                          env=environment(), timeout=600)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert siblings(out) == []
    return Reference(recipe, out, seconds, file_hashes(out), report_of(out),
                     frozenset(os.listdir(out)))


# ------------------------------------------------------------------------------------------ kills
@dataclass
class Trigger:
    """When to send ``sig``: after ``delay`` seconds, or ``delay`` after ``event`` was seen."""

    sig: int
    event: str  # "time", "checkpoint-write", "checkpoint-done", "staging", "publish"
    delay: float
    stage: int = 0  # for checkpoint events: which stage's checkpoint

    def describe(self) -> str:
        name = signal.Signals(self.sig).name
        if self.event == "time":
            return f"{name} at {self.delay:.1f}s"
        where = f"{self.event}[{STAGES[self.stage]}]" if self.event.startswith("checkpoint") \
            else self.event
        return f"{name} {self.delay:.2f}s after {where}"


@dataclass
class Attempt:
    trigger: Trigger | None
    returncode: int
    stdout: str
    stderr: str
    landed: str  # where the signal found the run ("finished" if it ended first)
    resumable: list[str] = field(default_factory=list)  # checkpointed stages left for the rerun


def random_trigger(rng: random.Random, ref_seconds: float, first: bool) -> Trigger:
    sig = rng.choice((signal.SIGKILL, signal.SIGINT))
    event = rng.choice(("time", "time", "checkpoint-write", "checkpoint-done", "staging", "publish"))
    if event == "time":
        # Not before the interpreter reaches the CLI's handler (SIGINT) and within the run's span;
        # a resumed run is shorter, so a later kill in a chain aims earlier.
        span = ref_seconds if first else 0.6 * ref_seconds
        return Trigger(sig, event, rng.uniform(max(1.0, 0.05 * span), 0.95 * span))
    if event == "checkpoint-write":
        return Trigger(sig, event, 0.0, rng.randrange(len(STAGES)))
    if event == "checkpoint-done":
        return Trigger(sig, event, rng.uniform(0.0, 1.0), rng.randrange(len(STAGES)))
    if event == "staging":
        return Trigger(sig, event, rng.choice((0.0, rng.uniform(0.0, 1.0))))
    return Trigger(sig, event, 0.0)


def snapshot(out: Path) -> set[str]:
    """The checkpoints, staging and backup directories there are now (events are new ones)."""
    return {p.name for p in work_dir(out).glob("*stage-*")} | set(siblings(out))


def event_seen(trigger: Trigger, out: Path, ref_names: frozenset[str], before: set[str],
               listing_before: frozenset[str] | None) -> bool:
    def new(directory: Path, pattern: str) -> bool:
        return any(p.name not in before for p in directory.glob(pattern))

    work = work_dir(out)
    if trigger.event == "checkpoint-write":
        prefix = f"stage-{trigger.stage:02d}-"
        return new(work, f".{prefix}*.tmp-*") or new(work, f"{prefix}*")
    if trigger.event == "checkpoint-done":
        return new(work, f"stage-{trigger.stage:02d}-*")
    if trigger.event == "staging":
        return new(out.parent, f".{out.name}.tmp-*")
    if trigger.event == "publish":
        return new(out.parent, f".{out.name}.old-*") or \
            (listing_before != ref_names and _listing(out) == ref_names)
    raise AssertionError(trigger.event)


def _listing(out: Path) -> frozenset[str] | None:
    try:
        return frozenset(os.listdir(out))
    except FileNotFoundError:
        return None


def where(out: Path, stdout_file: Path, ref_names: frozenset[str],
          listing_before: frozenset[str] | None) -> str:
    """Where a run is now, from its files and its stage lines on stdout."""
    parent, work = out.parent, work_dir(out)
    if any(parent.glob(f".{out.name}.old-*")):
        return "publish"
    if listing_before != ref_names and _listing(out) == ref_names:
        if "artifacts written to" in stdout_file.read_text():
            return "exit after success"
        return "after publish (removing the work directory, printing the report)"
    if any(parent.glob(f".{out.name}.tmp-*")):
        return "save/reload/verify"
    writes = sorted(p.name for p in work.glob(".stage-*.tmp-*"))
    if writes:
        return f"checkpoint write {writes[-1].split('.tmp-')[0].lstrip('.')}"
    lines = [ln for ln in stdout_file.read_text().splitlines() if ln.startswith("stage ")]
    if lines:
        return f"in {lines[-1].split(':')[0]}"  # "stage 2/4 'heal'" (running or being measured)
    if work.exists():
        return "load/measure original"
    return "startup"


def attempt(recipe: Path, out: Path, logs: Path, trigger: Trigger | None, prev_names: frozenset[str],
            ref_names: frozenset[str], n: int) -> Attempt:
    """Run the command once; kill it at ``trigger``; check the output invariant all along."""
    stdout_file, stderr_file = logs / f"{n}.out", logs / f"{n}.err"
    before, listing_before = snapshot(out), _listing(out)
    allowed = {ref_names, prev_names} if prev_names else {ref_names}
    with open(stdout_file, "w") as so, open(stderr_file, "w") as se:
        proc = subprocess.Popen(command(recipe, out), stdout=so, stderr=se, cwd=recipe.parent,
                                env=environment())
        started, seen_at, landed = time.monotonic(), None, "finished"
        try:
            while proc.poll() is None:
                listing = _listing(out)
                if listing is None:
                    # Absent only between publish's two renames, with the old output as a backup.
                    assert not prev_names or any(out.parent.glob(f".{out.name}.old-*")) \
                        or _listing(out) is not None, "the previous output vanished"
                else:
                    assert listing in allowed, f"partial output visible: {sorted(listing)}"
                now = time.monotonic()
                if trigger is not None and seen_at is None:
                    if trigger.event == "time":
                        seen_at = started
                    elif event_seen(trigger, out, ref_names, before, listing_before):
                        seen_at = now
                # SIGINT before the interpreter reaches the CLI is Python's, not ours: not before 1 s.
                if seen_at is not None and now - seen_at >= trigger.delay and now - started >= 1.0:
                    landed = where(out, stdout_file, ref_names, listing_before)
                    proc.send_signal(trigger.sig)
                    break
                time.sleep(0.003)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode == 0 and not landed.startswith(("after publish", "exit after")):
        landed = "finished"
    return Attempt(trigger, proc.returncode, stdout_file.read_text(), stderr_file.read_text(),
                   landed, completed_prefix(out))


def check_killed(a: Attempt, out: Path, prev_hashes: dict[str, str] | None, ref: Reference) -> None:
    """What a killed attempt must leave: a clean exit on SIGINT, an intact or complete output."""
    assert a.trigger is not None
    if a.returncode == 0 or "artifacts written to" in a.stdout:
        # It finished before the signal took effect, or the signal came while the interpreter exited
        # (a SIGINT then is Python's own: -SIGINT, after our success).
        assert a.returncode in (0, -signal.SIGINT, -signal.SIGKILL), a.stderr[-3000:]
        assert file_hashes(out) == ref.hashes
        return
    if a.trigger.sig == signal.SIGINT:
        assert a.returncode == 130, (a.landed, a.returncode, a.stderr[-3000:])
        assert RESUME_HINT in a.stderr and "Traceback" not in a.stderr, a.stderr[-3000:]
        assert not any(out.parent.glob(f".{out.name}.tmp-*")), "SIGINT left a staging directory"
    else:
        assert a.returncode == -signal.SIGKILL, (a.returncode, a.stderr[-3000:])
    if out.exists():
        hashes = file_hashes(out, skip=frozenset())
        if prev_hashes is not None and hashes == prev_hashes:
            return
        assert file_hashes(out) == ref.hashes, f"{a.landed}: output is neither the old nor the new one"
    else:
        assert prev_hashes is None or any(out.parent.glob(f".{out.name}.old-*")), \
            f"{a.landed}: the previous output is gone"


def kill_plans(ref_seconds: float) -> list[tuple[bool, list[Trigger]]]:
    """Seeded kill points: (with a previous output?, triggers of the attempts before the last)."""
    rng = random.Random(FAULT_SEED)
    plans = []
    for i in range(FAULT_POINTS):
        chain = [random_trigger(rng, ref_seconds, first=True)]
        if rng.random() < 0.3:  # killed again while resuming
            chain.append(random_trigger(rng, ref_seconds, first=False))
        plans.append((rng.random() < 0.5, chain))
    return plans


def test_killed_runs_resume_to_the_same_result(reference: Reference, tmp_path: Path, capsys):
    ref = reference
    tally: list[str] = []
    for point, (with_previous, chain) in enumerate(kill_plans(ref.seconds)):
        # Beside the reference's output, so that the lock file's relative paths are the same.
        out, logs = ref.recipe.parent / f"p{point}" / "out", tmp_path / f"logs{point}"
        shutil.rmtree(out.parent, ignore_errors=True)
        logs.mkdir(parents=True)
        prev_hashes, prev_names = None, frozenset()
        if with_previous:  # a complete earlier output that must survive until the new one replaces it
            shutil.copytree(ref.out, out)
            (out / "PREVIOUS").write_text("an earlier run")
            prev_hashes, prev_names = file_hashes(out, skip=frozenset()), frozenset(os.listdir(out))
        before: Attempt | None = None
        first = len(tally)
        # The kills of this point, then the same command again until it is not killed: it must succeed.
        for n, trigger in enumerate([*chain, None]):
            a = attempt(ref.recipe, out, logs, trigger, prev_names, ref.names, n)
            if before is not None and (a.returncode == 0 or "\nstage " in "\n" + a.stdout):
                if before.resumable:
                    assert f"resuming after stage '{before.resumable[-1]}'" in a.stdout, a.stdout
                else:
                    assert "resuming after" not in a.stdout, a.stdout
            if trigger is None:
                assert a.returncode == 0, a.stderr[-3000:]
                break
            tally.append(f"point {point}{' (previous output)' if with_previous else ''}: "
                         f"{trigger.describe()} -> {a.landed}, exit {a.returncode}, "
                         f"resumable after {a.resumable[-1] if a.resumable else '-'}")
            check_killed(a, out, prev_hashes, ref)
            if a.returncode == 0:
                break
            before = a
        assert file_hashes(out) == ref.hashes, f"point {point}: the model files differ"
        assert report_of(out) == ref.report, f"point {point}: the report differs"
        assert siblings(out) == [], f"point {point}: left behind {siblings(out)}"
        if "SQUEEZE_FAULT_POINTS" not in os.environ:
            continue
        with capsys.disabled():  # progress, for long runs with SQUEEZE_FAULT_POINTS
            if point == 0:
                print(f"\nkills (seed {FAULT_SEED}, reference run {ref.seconds:.1f}s):", end="")
            print("".join(f"\n  {line}" for line in tally[first:]), end="", flush=True)


# ------------------------------------------------------------------------------------------ in process
SMALL = '''
recipe "small"
model = hf("{model}", task = "embedding")
data calib = text("calib.txt")
metric faithful = fidelity(calib)
metric latency = latency(seq = 8, warmup = 0, repeats = 1)
{metrics}
stage sparse: prune {{ method = "magnitude", ratio = 0.3 }}
{stages}
stage int8: quantize {{ scheme = "int8" }}
constraints {{ size <= 90% }}
{output}
'''


def small_recipe(directory: Path, model_dir: Path, sentences: Path, stages: str = "",
                 metrics: str = "", output: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sentences, directory / "calib.txt")
    recipe = directory / "small.squeeze"
    recipe.write_text(SMALL.format(model=model_dir, stages=stages, metrics=metrics, output=output))
    return recipe


def run_cli(capsys, recipe: Path, out: Path, *extra: str) -> tuple[int, str]:
    """``squeeze run RECIPE -o OUT --force -q`` in this process: its exit code and stderr.

    An exception the CLI does not turn into a message would escape ``main`` and fail the test, so
    "no traceback" is part of every call.
    """
    capsys.readouterr()
    code = cli.main(["run", str(recipe), "-o", str(out), "--force", "-q", *extra])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def previous(tmp_path_factory, tiny_bert_dir: Path) -> Path:
    """A complete earlier output of the small recipe: what a failed run must leave untouched."""
    from conftest import SENTENCES

    ws = tmp_path_factory.mktemp("previous")
    sentences = ws / "sentences.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n")
    out = ws / "out"
    assert cli.main(["run", str(small_recipe(ws, tiny_bert_dir, sentences)), "-o", str(out), "-q"]) == 0
    return out


def with_previous(previous: Path, out: Path) -> dict[str, str]:
    """Put a copy of the earlier output at ``out``; return its exact file hashes."""
    shutil.copytree(previous, out)
    return file_hashes(out, skip=frozenset())


def assert_untouched(out: Path, before: dict[str, str] | None) -> None:
    """The failed run presented nothing: the previous output as it was, no staging left behind."""
    if before is None:
        assert not out.exists()
    else:
        assert file_hashes(out, skip=frozenset()) == before
    left = [name for name in siblings(out) if not name.endswith(".squeeze-work")]
    assert left == [], f"left behind: {left}"


def _partial_then(exc: OSError):
    """A writer that leaves half a file, then fails like a full disk."""
    def write(path: Path) -> None:
        Path(path).write_bytes(b"\0" * 64)
        raise exc
    return write


def _enospc(path: Any) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("where", ["checkpoint", "final weights", "state", "report"])
def test_full_disk_fails_cleanly_and_resumes(where: str, previous: Path, tmp_path: Path, capsys,
                                             monkeypatch, tiny_bert_dir: Path, sentences_file: Path):
    import safetensors.torch

    from squeezelang.executor import checkpoint, report

    recipe = small_recipe(tmp_path, tiny_bert_dir, sentences_file)
    out = tmp_path / "out"
    before = with_previous(previous, out)
    failed: list[Path] = []
    real_save, real_json = safetensors.torch.save_file, report.write_json

    def save_file(tensors, filename, metadata=None):
        staging = f".{out.name}.tmp-" in str(filename)
        if (where == "checkpoint" and not staging) or (where == "final weights" and staging):
            failed.append(Path(filename))
            _partial_then(_enospc(filename))(filename)
        return real_save(tensors, filename, metadata=metadata)

    def write_json(path, data):
        if (where == "state" and "completed" in data and data["completed"]) or \
                (where == "report" and path.name == "report.json"):
            failed.append(path)
            _partial_then(_enospc(path))(path.with_name(f".{path.name}.tmp"))
        return real_json(path, data)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(checkpoint, "write_json", write_json)
    monkeypatch.setattr(report, "write_json", write_json)
    code, err = run_cli(capsys, recipe, out)
    assert failed, "the fault was never reached"
    assert code == 3, err
    assert "No space left on device" in err and str(failed[0].parent) in err, err
    assert_untouched(out, before)
    monkeypatch.undo()  # the disk has room again: the same command resumes and succeeds
    code, err = run_cli(capsys, recipe, out)
    assert code == 0, err
    assert (out / "report.json").is_file() and not (out / "model.safetensors").read_bytes().startswith(b"\0")
    assert siblings(out) == []


def test_unwritable_output_parent_is_refused_before_any_work(previous: Path, tmp_path: Path, capsys,
                                                             tiny_bert_dir: Path, sentences_file: Path):
    if os.geteuid() == 0:
        pytest.skip("root writes into a mode 0o500 directory; see the simulated variants below")
    recipe = small_recipe(tmp_path, tiny_bert_dir, sentences_file)
    out = tmp_path / "locked" / "out"
    before = with_previous(previous, out)
    out.parent.chmod(0o500)
    try:
        code, err = run_cli(capsys, recipe, out)
        assert code == 2, err
        assert f"cannot write into {out.parent}" in err, err
        assert_untouched(out, before)
        assert siblings(out) == []
    finally:
        out.parent.chmod(0o700)


@pytest.mark.parametrize("fault", [errno.EACCES, errno.EROFS])
def test_unwritable_output_parent_simulated(fault: int, previous: Path, tmp_path: Path, capsys,
                                            monkeypatch, tiny_bert_dir: Path, sentences_file: Path):
    """Permission denied or a read-only file system where the output goes: refused up front when
    ``access`` says so (exit 2), a clean runtime error when the first write finds out (exit 3)."""
    import tempfile

    recipe = small_recipe(tmp_path, tiny_bert_dir, sentences_file)
    out = tmp_path / "locked" / "out"
    before = with_previous(previous, out)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == out.parent
                        else real_access(path, mode, **kw))
    code, err = run_cli(capsys, recipe, out)
    assert code == 2 and f"cannot write into {out.parent}" in err, err
    assert_untouched(out, before)
    assert siblings(out) == []
    monkeypatch.undo()

    # ``access`` says yes, every write says no (a file system remounted read-only, an ACL).
    def refuse(path: Any) -> OSError:
        return OSError(fault, os.strerror(fault), str(path))

    real_mkdir, real_mkdtemp = Path.mkdir, tempfile.mkdtemp

    def mkdir(self, *args, **kwargs):
        if self.parent == out.parent and not self.exists():
            raise refuse(self)
        return real_mkdir(self, *args, **kwargs)

    def mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == out.parent:
            raise refuse(dir)
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    code, err = run_cli(capsys, recipe, out)
    assert code == 3, err
    assert os.strerror(fault) in err and str(out.parent) in err, err
    assert_untouched(out, before)
    assert siblings(out) == []


FAULTY_PLUGIN = '''
"""Plugins that fail on purpose: a technique, a metric and an output format."""
from pathlib import Path

from squeezelang import hookimpl
from squeezelang.errors import SqueezeError
from squeezelang.hooks.metric import Metric
from squeezelang.hooks.sources import OutputFormat
from squeezelang.hooks.technique import Technique

FAULTS = ["runtime", "squeeze", "memory", "os"]


def fail(fault, where):
    if fault == "runtime":
        raise RuntimeError(f"boom in {where}")
    if fault == "squeeze":
        raise SqueezeError(f"refused in {where}")
    if fault == "memory":
        raise MemoryError(f"no memory left in {where}")
    raise OSError(5, "Input/output error", f"/dev/faulty-{where}")


class Faulty(Technique):
    name = "faulty"
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"fault": {"type": "string", "enum": FAULTS, "default": "runtime"}}}
    refuses = frozenset()

    def estimate(self, meta, params):
        return meta

    def apply_(self, handle, params, ctx):
        import torch

        with torch.no_grad():  # half-done work that must never be saved
            next(handle.model.parameters()).zero_()
        fail(params["fault"], "apply_")


class Broken(Metric):
    name = "broken"
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"fault": {"type": "string", "enum": FAULTS, "default": "runtime"},
                             "on": {"type": "string", "enum": ["original", "saved"],
                                    "default": "original"}}}

    def measure(self, handle, ctx, data, args):
        saved = ctx.artifact_dir is not None and ".tmp-" in ctx.artifact_dir.name
        if args.get("on", "original") == "original" or saved:
            fail(args.get("fault", "runtime"), "measure")
        return 1.0


class Partial(OutputFormat):
    name = "partial"

    def save(self, handle, directory):
        (Path(directory) / "model.safetensors").write_bytes(b"half a model")
        fail("runtime", "save")


@hookimpl
def register_techniques(registry):
    registry.add(Faulty())


@hookimpl
def register_metrics(registry):
    registry.add(Broken())


@hookimpl
def register_output_formats(registry):
    registry.add(Partial())
'''


@pytest.fixture()
def faulty_plugin(tmp_path: Path, monkeypatch) -> str:
    """The module name of FAULTY_PLUGIN, importable for ``--plugin``; forgotten afterwards."""
    directory = tmp_path / "plugin"
    directory.mkdir()
    (directory / "faulty_plugin.py").write_text(FAULTY_PLUGIN)
    monkeypatch.syspath_prepend(str(directory))
    yield "faulty_plugin"
    sys.modules.pop("faulty_plugin", None)


PLUGIN_FAULTS = [
    # (id, recipe additions, with a previous output, what the message must say)
    ("technique RuntimeError", {"stages": 'stage boom: faulty { fault = "runtime" }'}, True,
     ["stage 'boom'", "plugin 'faulty_plugin'", "technique 'faulty' failed", "RuntimeError: boom in apply_"]),
    ("technique SqueezeError", {"stages": 'stage boom: faulty { fault = "squeeze" }'}, False,
     ["stage 'boom'", "plugin 'faulty_plugin'", "refused in apply_"]),
    ("technique MemoryError", {"stages": 'stage boom: faulty { fault = "memory" }'}, True,
     ["stage 'boom'", "plugin 'faulty_plugin'", "ran out of memory", "no memory left in apply_"]),
    ("technique OSError", {"stages": 'stage boom: faulty { fault = "os" }'}, False,
     ["stage 'boom'", "plugin 'faulty_plugin'", "/dev/faulty-apply_", "Input/output error"]),
    ("metric on the original", {"metrics": 'metric wobbly = broken(fault = "runtime")'}, True,
     ["metric 'wobbly'", "(broken", "plugin 'faulty_plugin'", "original", "boom in measure"]),
    ("metric SqueezeError on the saved model",
     {"metrics": 'metric wobbly = broken(fault = "squeeze", on = "saved")'}, True,
     ["metric 'wobbly'", "(broken)", "plugin 'faulty_plugin'", "saved", "refused in measure"]),
    ("metric MemoryError on the saved model",
     {"metrics": 'metric wobbly = broken(fault = "memory", on = "saved")'}, False,
     ["metric 'wobbly'", "plugin 'faulty_plugin'", "saved", "MemoryError"]),
    ("output format", {"output": 'output "out" { format = "partial" }'}, True,
     ["output format 'partial'", "plugin 'faulty_plugin'", "boom in save"]),
]


@pytest.mark.parametrize("additions, previous_output, expected",
                         [p[1:] for p in PLUGIN_FAULTS], ids=[p[0] for p in PLUGIN_FAULTS])
def test_plugin_that_raises_is_named_and_nothing_is_presented(
        additions: dict[str, str], previous_output: bool, expected: list[str], faulty_plugin: str,
        previous: Path, tmp_path: Path, capsys, tiny_bert_dir: Path, sentences_file: Path):
    recipe = small_recipe(tmp_path, tiny_bert_dir, sentences_file, **additions)
    out = tmp_path / "out"
    before = with_previous(previous, out) if previous_output else None
    code, err = run_cli(capsys, recipe, out, "--plugin", faulty_plugin)
    assert code == 3, err
    for part in expected:
        assert part in err, (part, err)
    assert "Traceback" not in err
    assert_untouched(out, before)


# ------------------------------------------------------------------------------------------ pieces
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_recover_cleans_after_killed_processes_only(tmp_path: Path):
    from squeezelang.executor.artifacts import recover

    out, dead = tmp_path / "out", dead_pid()
    for name in (f".out.tmp-{dead}-abc", f".out.trials-{dead}-abc", f".out.tmp-{os.getpid()}-abc",
                 ".out.squeeze-work", ".other.tmp-1-abc"):
        (tmp_path / name).mkdir()
    (tmp_path / f".out.old-{dead}").mkdir()
    (tmp_path / f".out.old-{dead}" / "report.json").write_text("{}")
    recover(out)  # killed between publish's two renames: the previous output comes back
    assert (out / "report.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".out.tmp-{os.getpid()}-abc", ".out.squeeze-work", ".other.tmp-1-abc", "out"])
    (tmp_path / f".out.old-{dead}").mkdir()
    recover(out)  # killed after them: the new output stays, the old one goes
    assert (out / "report.json").is_file() and not (tmp_path / f".out.old-{dead}").exists()


def test_interrupted_checkpoint_or_cleanup_is_never_resumed_from(tmp_path: Path, monkeypatch,
                                                                 tiny_bert_dir: Path):
    from squeezelang.executor import checkpoint
    from squeezelang.executor.checkpoint import WorkDir
    from squeezelang.models.load import load_model

    work = WorkDir(tmp_path / "out")
    state = work.open("f" * 16, force=False)
    handle = load_model(tiny_bert_dir, task="embedding")

    def dies_halfway(h, directory):
        (Path(directory) / "config.json").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setattr("squeezelang.models.save.save_model", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        work.checkpoint(handle, 0, "sparse")
    assert list(work.path.iterdir()) == [work.path / "state.json"]  # neither a checkpoint nor debris
    monkeypatch.undo()

    name = work.checkpoint(handle, 0, "sparse")
    state.completed.append({"stage": "sparse", "dir": name})
    work.save(state)
    assert [c["stage"] for c in work.open("f" * 16, force=False).completed] == ["sparse"]

    def dies_in_rmtree(path, ignore_errors=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", dies_in_rmtree)
    with pytest.raises(KeyboardInterrupt):
        work.remove()  # cut short after state.json went, with the checkpoint still there
    monkeypatch.undo()
    assert (work.path / name).is_dir()
    assert work.open("f" * 16, force=False).completed == []  # starts afresh, resumes from nothing
