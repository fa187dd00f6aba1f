"""The ``llama_lm`` suite's pure parts: its rows' stages, its settings, the int4 target against
llm-compressor, where it finds llm-compressor, and what it changed in ``charlm`` and ``causal_lm``
(the GPT-2 cache key, a table row without latency). Nothing is trained or run here."""
import hashlib
import json
from dataclasses import asdict

import pytest

from benchmarks import causal_lm, charlm, llama_lm
from benchmarks.__main__ import parse

RATIOS = {"half": 0.42, "eq": 0.37}


def test_the_rows_are_causal_lms_and_quantization_and_mlp_pruning():
    stages = llama_lm.row_stages(RATIOS, llama_lm.FULL)
    assert list(stages)[:10] == list(causal_lm.row_stages(RATIOS))
    assert list(stages)[10:] == ["int8", "int4-gptq", "int4-gptq-linears", "mlp-50"]
    assert stages["int8"] == causal_lm.INT8
    assert 'scheme = "int4", method = "gptq", group_size = 128' in stages["int4-gptq"]
    assert "samples = 128" in stages["int4-gptq"] and "exclude" not in stages["int4-gptq"]
    assert 'exclude = ["model.embed_tokens", "lm_head"]' in stages["int4-gptq-linears"]
    assert 'target = ["mlp"], ratio = 0.5' in stages["mlp-50"]
    assert "ratio = 0.42" in stages["width-half+distill"]


def test_smoke_settings_reach_every_stage():
    stages = llama_lm.row_stages(RATIOS, llama_lm.SMOKE)
    assert "steps = 8, batch_size = 4" in stages["depth-half+distill"]
    assert "max_length = 64" in stages["depth-half+distill"]
    assert "group_size = 32" in stages["int4-gptq"] and "samples = 16" in stages["int4-gptq"]
    # the full run's distillation is causal_lm's
    assert causal_lm._distill() in llama_lm.row_stages(RATIOS, llama_lm.FULL)["width-half+distill"]


def test_the_llama_is_grouped_query_and_the_group_divides_its_widths():
    for s in (llama_lm.FULL, llama_lm.SMOKE):
        h = s.hyper
        assert h.arch == "llama" and h.heads > h.kv_heads > 0 and h.heads % h.kv_heads == 0
        assert h.d_model % s.group == 0 and h.inner % s.group == 0


def test_smoke_is_chosen_by_the_environment(monkeypatch):
    monkeypatch.delenv(llama_lm.SMOKE_ENV, raising=False)
    assert llama_lm.settings() is llama_lm.FULL
    monkeypatch.setenv(llama_lm.SMOKE_ENV, "1")
    assert llama_lm.settings() is llama_lm.SMOKE
    assert llama_lm.SMOKE.suffix and not llama_lm.FULL.suffix


def test_the_command_line_has_a_smoke_flag():
    assert parse(["llama_lm", "--smoke"]).smoke is True
    assert parse([]).smoke is False


def _row(name, val_loss, size):
    return {"name": name, "val_loss": val_loss, "size_bytes": size}


@pytest.mark.parametrize("rows, met, measured", [
    ([_row("int4-gptq", 1.48, 90), _row("int4-gptq-linears", 1.47, 120),
      _row("llmcompressor-gptq-w4a16", 1.49, 110)], True, "1.4800 (int4-gptq, 90 bytes)"),
    ([_row("int4-gptq", 1.52, 90), _row("llmcompressor-gptq-w4a16", 1.49, 110)], False, "int4-gptq"),
    # the better int4 row is larger than the peer's artifact: it is not the one judged
    ([_row("int4-gptq", 1.52, 90), _row("int4-gptq-linears", 1.40, 111),
      _row("llmcompressor-gptq-w4a16", 1.49, 110)], False, "int4-gptq,"),
    ([_row("int4-gptq", 1.50, 120), _row("llmcompressor-gptq-w4a16", 1.49, 110)], None,
     "no int4 row within"),
    ([_row("int4-gptq", 1.50, 90), {"name": "llmcompressor-gptq-w4a16", "error": "skipped: x"}],
     None, "did not run"),
])
def test_int4_is_judged_against_llm_compressor_at_equal_or_smaller_size(rows, met, measured):
    target = llama_lm.int4_target(rows)
    assert target.met is met
    assert measured in target.measured


def test_every_target_of_causal_lm_and_the_int4_one():
    names = [t.name for t in llama_lm.targets([])]
    assert names[:-1] == [t.name for t in causal_lm.targets([])]
    assert names[-1].startswith("(c) int4")


def test_llm_compressor_interpreter(monkeypatch, tmp_path):
    monkeypatch.setenv("SQUEEZE_BENCH_LLMC_PYTHON", "/opt/llmc/bin/python")
    assert llama_lm.llmc_python() == ("/opt/llmc/bin/python", "SQUEEZE_BENCH_LLMC_PYTHON")
    monkeypatch.delenv("SQUEEZE_BENCH_LLMC_PYTHON")
    monkeypatch.setattr(llama_lm.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(llama_lm, "LLMC_VENV", tmp_path / "nowhere")
    python, why = llama_lm.llmc_python()
    assert python is None and why.startswith("skipped: llm-compressor is not installed here")
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").write_text("")
    monkeypatch.setattr(llama_lm, "LLMC_VENV", tmp_path / "venv")
    assert llama_lm.llmc_python() == (str(tmp_path / "venv" / "bin" / "python"), str(tmp_path / "venv"))


def test_the_gpt2_cache_key_is_the_one_before_the_llama_fields():
    hyper = asdict(charlm.Hyper())
    for key in ("arch", "kv_heads", "inner"):
        del hyper[key]
    blob = json.dumps({"version": charlm.VERSION, "hyper": hyper, "data": "d"}, sort_keys=True)
    assert charlm.cache_key(charlm.Hyper(), "d") == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert charlm.cache_key(llama_lm.FULL.hyper, "d") != charlm.cache_key(charlm.Hyper(), "d")
    assert set(charlm.ARCHS) == {"gpt2", "llama"}


def test_a_row_without_latency_shows_a_dash():
    row = {"name": "llmcompressor-gptq-w4a16", "size_mb": 0.5, "size_ratio": 0.25, "params": 1000,
           "params_ratio": 1.0, "val_loss": 1.5, "perplexity": 4.48, "loss_change": 0.01,
           "loss_change_vs_control": None, "seconds": 3.0}
    line = causal_lm.table([row]).splitlines()[1]
    assert line.split()[5:9] == ["-", "-", "-", "-"]
