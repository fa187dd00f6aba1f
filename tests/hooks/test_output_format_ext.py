"""Output formats as an extension point: options checked against the format's schema, refusals at
the stage that stores what the format cannot hold, measurements on what the format's own ``load``
runs, ``size`` over the format's ``model_files``, and the lock file keeping the options."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import squeezelang
from squeezelang import hookimpl
from squeezelang.errors import RecipeErrors
from squeezelang.hooks.sources import OutputFormat

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class HalfCopy(OutputFormat):
    """Float weights in one safetensors file at a chosen precision, run by a RuntimeModel that
    holds its own copy of the network (standing in for another runtime)."""

    name = "halfcopy"
    runtime = "halfcopy-runtime"
    model_files = ("weights.safetensors", "config.json")
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"precision": {"type": "string", "enum": ["float16", "float32"],
                                           "default": "float32"}}}
    saved_with: dict = {}

    def check(self, options, stages, task, config):
        return [(name, "low-rank layers are not a standard architecture")
                for name, stored in stages if "low-rank" in stored]

    def save(self, handle, directory, options):
        import torch
        from safetensors.torch import save_file

        type(self).saved_with = dict(options)
        dtype = getattr(torch, options["precision"])
        state = {k: v.detach().to(dtype).contiguous() for k, v in handle.model.state_dict().items()}
        save_file(state, str(Path(directory) / "weights.safetensors"))
        handle.model.config.save_pretrained(directory)
        handle.tokenizer.save_pretrained(directory)
        (Path(directory) / "notes.txt").write_text("not part of the model\n" * 1000)
        return sorted(p.name for p in Path(directory).iterdir())

    def load(self, directory, task, options, threads):
        from safetensors.torch import load_file

        from squeezelang.plugin import (ModelHandle, RuntimeCounts, RuntimeModel, from_config,
                                        load_tokenizer, read_config)
        from transformers import AutoConfig

        class Runner(RuntimeModel):
            runtime = "halfcopy-runtime"

            def __init__(self, config, net, counts):
                super().__init__(config, counts)
                self.net = net

            def run(self, input_ids, attention_mask, token_type_ids):
                out = self.net(input_ids=input_ids, attention_mask=attention_mask)
                return {"last_hidden_state": out.last_hidden_state.float()}

        read_config(directory)
        config = AutoConfig.from_pretrained(directory)
        net = from_config(config, task)
        state = load_file(str(Path(directory) / "weights.safetensors"))
        net.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        net.eval()
        counts = RuntimeCounts(params=sum(v.numel() for v in state.values()),
                               nonzero=sum(int((v != 0).sum()) for v in state.values()),
                               memory=sum(v.numel() * v.element_size() for v in state.values()))
        return ModelHandle(model=Runner(config, net, counts), tokenizer=load_tokenizer(directory),
                           task=task, source_dir=Path(directory))


@hookimpl
def register_output_formats(registry):
    registry.add(HalfCopy())


PLUGINS = [sys.modules[__name__]]

RECIPE = '''recipe "halfcopy"
model = hf("{model}", task = "embedding")
data calib = text("{data}")
metric faithful = fidelity(calib)
metric nz = nonzero()
{stages}
output "out" {{ format = "halfcopy"{options} }}
'''


def _recipe(tmp_path, model, data, stages="stage q: quantize { scheme = \"int8\" }", options=""):
    path = tmp_path / "r.squeeze"
    path.write_text(RECIPE.format(model=model, data=data, stages=stages, options=options))
    return path


def _errors(path):
    with pytest.raises(RecipeErrors) as info:
        squeezelang.check(path, plugins=PLUGINS)
    return info.value.errors


def test_options_are_checked_against_the_formats_schema(tmp_path, tiny_bert_dir, sentences_file):
    errs = _errors(_recipe(tmp_path, tiny_bert_dir, sentences_file, options=", precison = \"float16\""))
    assert errs[0].message == "unknown output option 'precison' for format 'halfcopy'"
    assert "precision" in (errs[0].hint or "")
    assert errs[0].span.line == 7
    errs = _errors(_recipe(tmp_path, tiny_bert_dir, sentences_file, options=", precision = \"int3\""))
    assert errs[0].message == "'precision' must be one of \"float16\", \"float32\""
    assert (errs[0].span.line, errs[0].span.column) == (7, 49)
    plan = squeezelang.check(_recipe(tmp_path, tiny_bert_dir, sentences_file), plugins=PLUGINS)
    assert plan.output_format == "halfcopy" and plan.output_options == {"precision": "float32"}


def test_a_stage_the_format_cannot_hold_is_refused_at_the_stage(tmp_path, tiny_bert_dir,
                                                                 sentences_file):
    stages = 'stage lr: factorize { rank = 0.5 }\nstage q: quantize { scheme = "int8" }'
    errs = _errors(_recipe(tmp_path, tiny_bert_dir, sentences_file, stages=stages))
    assert len(errs) == 1
    assert errs[0].message == ("stage 'lr': output format 'halfcopy' cannot hold this: low-rank "
                               "layers are not a standard architecture")
    assert (errs[0].span.line, errs[0].span.column) == (6, 11)  # the technique's name


def test_stores_for_names_what_each_stage_leaves(registries):
    tech = registries.techniques.get
    assert tech("quantize").stores_for({"scheme": "int4", "group_size": 32}) == \
        {"int4", "bits:4", "group:32"}
    assert tech("quantize").stores_for({"scheme": "int8-dynamic", "granularity": "tensor"}) == \
        {"int8", "bits:8", "int8-kernels", "per-tensor"}
    assert tech("quantize").stores_for({"scheme": "mixed", "bits": [3, 4], "group_size": 64}) == \
        {"mixed", "bits:3", "bits:4", "group:64"}
    assert tech("prune").stores_for({"method": "magnitude"}) == {"sparse"}
    assert tech("prune").stores_for({"method": "nm"}) == {"n:m"}
    assert tech("prune").stores_for({"method": "activation"}) == frozenset()
    assert tech("factorize").stores_for({}) == {"low-rank"}
    assert tech("share").stores_for({"method": "cluster"}) == {"clustered"}
    assert tech("distill").stores_for({}) == frozenset()


def test_metrics_run_on_what_the_format_loads(tmp_path, tiny_bert_dir, sentences_file):
    recipe = _recipe(tmp_path, tiny_bert_dir, sentences_file, options=', precision = "float16"')
    result = squeezelang.run(recipe, output=tmp_path / "out", plugins=PLUGINS)
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert HalfCopy.saved_with == {"precision": "float16"}
    assert report["output"]["runtime"] == "halfcopy-runtime"
    assert report["output"]["options"] == {"precision": "float16"}
    assert type(result.model).__name__ == "Runner"
    # size: only the format's model files (not notes.txt, not the tokenizer)
    expected = (out / "weights.safetensors").stat().st_size + (out / "config.json").stat().st_size
    assert report["metrics"]["size"]["final"] == expected
    # params from the runtime's counts: every stored tensor (buffers included), not torch's modules
    from safetensors.torch import load_file

    state = load_file(str(out / "weights.safetensors"))
    assert report["metrics"]["params"]["final"] == sum(v.numel() for v in state.values())
    # fidelity measured through the runtime: float16 weights move the embeddings a little
    assert 0.99 < report["metrics"]["faithful"]["final"] < 1.0
    assert "run by halfcopy-runtime" in (out / "report.md").read_text()
    lock = (out / "recipe.lock.squeeze").read_text()
    assert 'format = "halfcopy"' in lock and 'precision = "float16"' in lock
    squeezelang.check(out / "recipe.lock.squeeze", plugins=PLUGINS)


def test_a_format_written_before_options_still_saves(tmp_path, tiny_bert_dir, sentences_file):
    class Old(OutputFormat):
        name = "old"

        def save(self, handle, directory):
            from squeezelang.plugin import save_model

            return save_model(handle, directory)

    from squeezelang.models.load import load_model

    handle = load_model(tiny_bert_dir)
    files = Old().write(handle, tmp_path, {})
    assert "model.safetensors" in files
