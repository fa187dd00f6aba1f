"""Trial backends: worker processes and Ray give the serial results, in job order, and survive failures."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import replace
from pathlib import Path

import pytest

import squeezelang
from squeezelang.errors import SqueezeError
from squeezelang.hooks.manager import build_registries, plugin_manager
from squeezelang.hooks.technique import Technique
from squeezelang.search.workers import TrialJob, open_backend

RATIOS = (0.2, 0.5, 0.8)


@pytest.fixture(scope="module")
def plans(tmp_path_factory, tiny_bert_dir):
    """Fixed plans pruning the tiny BERT at each of ``RATIOS``, with one quality metric and size."""
    from conftest import SENTENCES

    directory = tmp_path_factory.mktemp("workers")
    (directory / "calib.txt").write_text("\n".join(SENTENCES) + "\n")
    result = []
    for ratio in RATIOS:
        path = directory / f"r{ratio}.squeeze"
        path.write_text(f'''
model = hf("{tiny_bert_dir}", task = "embedding")
data calib = text("calib.txt")
metric faithful = fidelity(calib)
stage sparse: prune {{ ratio = {ratio} }}
constraints {{ faithful >= 0.9, size <= 90% }}
''')
        result.append(squeezelang.check(path))
    return result


def jobs_for(plans, scratch: Path, original=None) -> list[TrialJob]:
    return [TrialJob(i + 1, plan, str(scratch / f"trial-{i + 1}"), original) for i, plan in enumerate(plans)]


def broken(plan):
    """``plan`` with a stage parameter its technique cannot use (the run fails in the stage)."""
    stage = plan.stages[0]
    return replace(plan, stages=(replace(stage, params={**stage.params, "ratio": "lots"}),))


@pytest.fixture(scope="module")
def serial_outcomes(plans, registries, tmp_path_factory):
    with open_backend("serial", 1, registries) as backend:
        return backend.run(jobs_for(plans, tmp_path_factory.mktemp("serial")))


@pytest.fixture(scope="module")
def process_backend(registries):
    with open_backend("process", 2, registries, threads=1) as backend:
        yield backend


def assert_same(outcomes, expected):
    assert [o.index for o in outcomes] == [e.index for e in expected]
    for got, want in zip(outcomes, expected):
        assert got.error is None, got.error
        assert got.metrics.keys() == want.metrics.keys()
        assert got.metrics["size"] == want.metrics["size"]
        assert got.metrics["faithful"] == pytest.approx(want.metrics["faithful"], abs=1e-6)
        assert got.verdicts == want.verdicts and got.ok == want.ok


def test_serial_outcomes_measure_the_saved_artifact(serial_outcomes, tmp_path):
    assert [o.index for o in serial_outcomes] == [1, 2, 3]
    sizes = [o.metrics["size"] for o in serial_outcomes]
    assert sizes == sorted(sizes, reverse=True)  # more pruned, smaller
    assert all(o.error is None and o.worker == f"pid {os.getpid()}" for o in serial_outcomes)
    assert set(serial_outcomes[0].verdicts) == {"faithful >= 0.9", "size <= 90%"}
    assert {o.original["size"] for o in serial_outcomes} == {serial_outcomes[0].original["size"]}
    assert serial_outcomes[0].original["size"] > sizes[0]


def test_process_workers_match_serial_in_job_order(process_backend, plans, serial_outcomes, tmp_path):
    assert (process_backend.name, process_backend.workers) == ("process", 2)
    jobs = jobs_for(plans, tmp_path)
    outcomes = process_backend.run(jobs[::-1])  # order is the jobs', not completion's
    assert_same(outcomes, serial_outcomes[::-1])
    workers = {o.worker for o in outcomes}
    assert all(w.startswith("pid ") and w != f"pid {os.getpid()}" for w in workers)
    assert not any(Path(j.output).exists() for j in jobs)  # every trial's artifact removed


def test_a_failing_trial_is_an_outcome_and_the_others_finish(process_backend, plans, serial_outcomes,
                                                             tmp_path):
    original = serial_outcomes[0].original  # measured once by the parent, reused by the workers
    jobs = jobs_for([plans[0], broken(plans[1]), plans[2]], tmp_path, original)
    first, failed, last = process_backend.run(jobs)
    assert failed.index == 2 and not failed.ok and failed.metrics == {}
    assert "stage 'sparse'" in failed.error and "builtin_prune" in failed.error
    assert_same([first, last], [serial_outcomes[0], serial_outcomes[2]])
    # the parent's figures are reused, except latency: each trial times the original again side
    # by side with its artifact (executor.measure.measure_paired)
    untimed = {k: v for k, v in original.items() if k != "latency"}
    for outcome in (first, last):
        assert {k: v for k, v in outcome.original.items() if k != "latency"} == untimed
        assert outcome.original["latency"] > 0


def test_plugin_objects_cannot_be_rebuilt_in_workers():
    class Extra(Technique):
        name = "extra_in_test"
        schema = {"type": "object", "additionalProperties": False, "properties": {}}

    class P:
        @squeezelang.hookimpl
        def register_techniques(self, registry):
            registry.add(Extra())

    regs = build_registries(plugin_manager([P()]))
    with pytest.raises(SqueezeError, match="technique 'extra_in_test'.*serial"):
        open_backend("process", 2, regs)
    assert open_backend("serial", 1, regs).name == "serial"


def test_plugin_modules_given_by_name_are_recorded_for_workers(registries):
    assert registries.extra == ()
    regs = build_registries(plugin_manager(["squeezelang_plugins.sources"], entry_points=False))
    assert regs.extra == ("squeezelang_plugins.sources",)


@pytest.mark.ray
def test_ray_tasks_on_a_local_instance_match_serial(plans, registries, serial_outcomes, tmp_path,
                                                    tiny_bert_dir):
    if importlib.util.find_spec("ray") is None:
        # CI installs the ray extra: a missing Ray there is a failure, not a skip
        assert not os.environ.get("CI"), "Ray is missing from the CI environment"
        pytest.skip('Ray is not installed (pip install "squeezelang[ray]")')
    from squeezelang.models.load import load_model

    handle = load_model(tiny_bert_dir)  # as squeezelang.run(model=...) would pass it: no source dir
    handle.source_dir = None
    with open_backend("ray", 2, registries, handle=handle, threads=1) as backend:
        shipped = Path(backend._model_dir)
        assert (shipped / "config.json").is_file()  # saved once for every worker to load
        outcomes = backend.run(jobs_for(plans, tmp_path))
        failed = backend.run(jobs_for([broken(plans[0])], tmp_path / "broken"))[0]
    assert not shipped.exists()
    assert_same(outcomes, serial_outcomes)
    assert all(o.worker.startswith("ray node ") for o in outcomes)
    assert "stage 'sparse'" in failed.error


def test_unknown_backend_is_refused(registries):
    with pytest.raises(SqueezeError, match="unknown backend 'dask'"):
        open_backend("dask", 1, registries)
