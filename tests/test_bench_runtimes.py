"""The ``runtimes`` suite's pure parts: the recipes it runs (a spec copied with its output redirected,
its own ONNX options kept) and its targets judged on rows. Nothing is exported or run here."""
from pathlib import Path

import pytest

import squeezelang
from benchmarks import runtimes


def test_a_spec_for_onnx_keeps_its_own_output_options(tmp_path):
    if not runtimes.STSB_DEV.is_file():
        pytest.skip(f"the spec reads STS-B dev, which is not at {runtimes.STSB_DEV}")
    copy = runtimes.spec_as("minilm-onnx", "onnx", tmp_path / "out")
    try:
        text = copy.read_text()
        assert f'output "{tmp_path / "out"}"' in text
        assert 'float_activations = ["encoder.layer.[0-1].intermediate.dense"]' in text
        plan = squeezelang.check(copy)
        assert plan.output_format == "onnx" and plan.output_dir == str(tmp_path / "out")
    finally:
        copy.unlink(missing_ok=True)


def test_a_torch_spec_is_written_for_the_format(tmp_path):
    copy = runtimes.spec_as("minilm-fast", "gguf", tmp_path / "out", ', type = "F32"')
    try:
        assert f'output "{tmp_path / "out"}" {{ format = "gguf", type = "F32" }}' in copy.read_text()
        assert copy.parent == runtimes.SPECS  # beside the spec: its relative data paths hold
    finally:
        copy.unlink(missing_ok=True)


def _onnx(name, **fields):
    return {"name": name, "part": "onnx", **fields}


def test_onnx_targets_are_judged_on_the_rows():
    rows = [_onnx("int8-onnx", size_ratio=0.254, drop=-0.01, latency_ms=10.5, latency_ratio=0.37),
            _onnx("onnxruntime-dynamic-int8", size_ratio=0.257, drop=0.33, latency_ms=12.8,
                  latency_ratio=0.45),
            _onnx("w8a8-onnx", size_ratio=0.254, drop=0.12, latency_ms=10.1, latency_ratio=0.35),
            _onnx("fast-onnx", size_ratio=0.18, drop=0.75, latency_ms=4.8, latency_ratio=0.169),
            _onnx("all-onnx", error="boom")]
    int8, w8a8, fast, every = runtimes.onnx_targets(rows)
    assert int8.met is True and "10.50 ms vs peer 12.80 ms" in int8.measured
    assert w8a8.met is True and "10.10 ms vs 10.50 ms; drop 0.12 vs -0.01" in w8a8.measured
    assert fast.met is False and "x0.169" in fast.measured
    assert every.met is None  # a failed row is "not measured", never met
    rows[0]["drop"] = 0.11
    assert runtimes.onnx_targets(rows)[0].met is False


def test_gguf_targets_need_a_lower_loss_at_no_larger_size():
    rows = [{"name": "gptq-int4-q4_0", "part": "gguf", "val_loss": 1.4966, "size_bytes": 455936,
             "runtime": "llama.cpp"},
            {"name": "llamacpp-q4_0", "part": "gguf", "val_loss": 1.5005, "size_bytes": 460160},
            {"name": "gptq-int8-q8_0", "part": "gguf", "val_loss": 1.4913, "size_bytes": 900000,
             "runtime": "llama.cpp"},
            {"name": "llamacpp-q8_0", "part": "gguf", "val_loss": 1.4914, "size_bytes": 853376}]
    q4, q8 = runtimes.gguf_targets(rows)
    assert q4.met is True
    assert q8.met is False  # lower loss, but a larger file


def test_results_go_under_benchmarks_results():
    assert runtimes.RESULTS == Path(runtimes.__file__).parent / "results"
