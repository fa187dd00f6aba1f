"""Everything a plugin may use, in one documented module: ``from squeezelang.plugin import …``.

The built-in plugins in ``plugins/`` import from here and nowhere else, exactly as a third-party
plugin would; names that are not listed here are the engine's own and may change without notice.

Importing this module imports no torch: each name is loaded on first use, so a plugin module may
import what it needs at module level and still keep ``squeeze check`` light.

Groups (see docs/plugins.md for how each is used):

- hooks and plugin objects: ``hookimpl``, ``Technique``, ``Knob``, ``Candidate``, ``Metric``,
  ``DataSource``, ``ModelSource``, ``OutputFormat``, ``ModelFamily``; ``installed`` (whether an
  optional runtime can be imported, without importing it);
- a family's torch-free layout (what ``squeeze plan`` computes tensors from): ``Layout``,
  ``TaskLayout``, ``LayoutModule``, ``linear``;
- errors: ``SqueezeError`` (a problem the user can fix), ``ExecutionError``;
- what a stage or metric receives: ``StageContext``, ``MeasureContext``, ``ModelHandle``, ``TASKS``;
- estimates: ``ModelMeta``, ``TensorMeta``, ``ModuleMeta``, ``meta_from_model``,
  ``measured_overhead``, ``artifact_bytes``;
- storage codecs: ``merge``, ``stored_bytes``, ``layout``, ``quantize_weight``,
  ``quantize_weight_``, ``on_grid``, ``CODES``, ``NM_MAX_M``, ``FP8_E4M3``;
- selecting and replacing modules: ``select_modules``, ``get_module``, ``set_module``, ``kind_of``,
  ``output_axis``, ``LINEAR_KINDS``, ``BLOCKS``, and the replacement layers ``LowRankLinear``,
  ``Int8DynamicLinear``, ``W8A8Linear`` (with ``activation_grid``), ``linear_weight``;
- model families and structure: ``family_of``, ``sizes``, ``shrunk_config``, ``resized_meta``,
  ``reshape_``, ``drop_layers_``, ``choose_heads``, ``nearest_heads``, ``layer_modules``,
  ``block_module``, ``get_path``; where a per-channel scale folds (AWQ, SmoothQuant):
  ``scale_pairs``, ``ScalePair``, ``fold_scales_``;
- calibration and forward passes: ``calibration_texts``, ``collect``, ``input_stats``,
  ``input_ranges``, ``InputRange``, ``gptq_quantize`` (``gptq_rows``: a run of rows at a time),
  ``by_block``, ``block_stats``, ``encode``,
  ``logits``, ``lm_loss``, ``lm_loss_counted``, ``LmLoss``, ``mean_pool``, ``pad_id``,
  ``length_limit``, ``max_positions``, ``outputs_for_fidelity``;
- offloaded models (``offload = true``: weights read from files one unit at a time):
  ``resident`` (keep modules in memory while a stage changes them), ``is_offloaded``,
  ``onload_seconds`` (what a timed pass subtracts), ``compute_device``;
- per-layer allocation: ``costs``, ``Candidates``, ``allocate``, ``describe``;
- data-parallel training under ``torchrun``: ``World``, ``world``, ``is_main``, ``barrier``,
  ``share``, ``any_rank``, ``data_parallel`` (DDP or FSDP), ``ensure_process_group``,
  ``counterparts`` (a model's parameters as the student ``data_parallel`` yields holds them);
- other runtimes (output formats whose ``load`` runs the artifact elsewhere): ``RuntimeModel``,
  ``RuntimeOutput``, ``RuntimeCounts``; the engine's own codes of quantized weights:
  ``quantized_weights``, ``QuantizedWeight``;
- model directories: ``load_model``, ``save_model``, ``copy_aux_files``, ``standard_model``, ``AFTER_LOAD``, ``read_config``,
  ``load_tokenizer``, ``from_config``, ``load_pretrained``, ``config_dtype``, ``checkpoint_dtype``,
  ``cached_meta``, ``cached_json``, ``cache_key``, ``layout_meta_of``.
"""
from __future__ import annotations

import importlib
from typing import Any

#: name -> (module, attribute in it)
_EXPORTS: dict[str, tuple[str, str]] = {}


def _export(module: str, *names: str, **renamed: str) -> None:
    for name in names:
        _EXPORTS[name] = (module, name)
    for name, attribute in renamed.items():
        _EXPORTS[name] = (module, attribute)


_export("squeezelang", "hookimpl")
_export("squeezelang.errors", "SqueezeError", "ExecutionError")
_export("squeezelang.hooks.technique", "Technique", "Knob", "Candidate")
_export("squeezelang.hooks.metric", "Metric")
_export("squeezelang.hooks.sources", "DataSource", "ModelSource", "OutputFormat", "installed")
_export("squeezelang.hooks.family", "ModelFamily", "Layout", "TaskLayout", "LayoutModule", "linear")
_export("squeezelang.hooks.context", "StageContext", "MeasureContext")
_export("squeezelang.models.handle", "ModelHandle", "TASKS")
_export("squeezelang.models.meta", "ModelMeta", "TensorMeta", "ModuleMeta", "meta_from_model",
        "measured_overhead")
_export("squeezelang.models.size", "artifact_bytes")
_export("squeezelang.models.codec", "merge", "stored_bytes", "layout", "quantize_weight",
        "quantize_weight_", "on_grid", "CODES", "NM_MAX_M", "FP8_E4M3")
_export("squeezelang.models.select", "select_modules", "get_module", "set_module", "kind_of",
        "output_axis", "LINEAR_KINDS", "BLOCKS")
_export("squeezelang.models.layers", "LowRankLinear", "Int8DynamicLinear", "W8A8Linear",
        "activation_grid", "linear_weight")
_export("squeezelang.models.surgery", "family_of", "sizes", "shrunk_config", "resized_meta",
        "reshape_", "drop_layers_", "choose_heads", "nearest_heads", "layer_modules",
        "block_module", "get_path")
_export("squeezelang.models.scale_pairs", "scale_pairs", "ScalePair", "fold_scales_")
_export("squeezelang.models.calibrate", "calibration_texts", "collect")
_export("squeezelang.models.linear_stats", "input_stats", "gptq_quantize", "gptq_rows", "by_block")
_export("squeezelang.models.block_inputs", "block_stats")
_export("squeezelang.models.input_ranges", "input_ranges", "InputRange")
_export("squeezelang.models.forward", "encode", "logits", "lm_loss", "lm_loss_counted", "LmLoss",
        "max_positions", "outputs_for_fidelity", "mean_pool", "pad_id", "length_limit")
_export("squeezelang.models.sensitivity", "costs", "Candidates")
_export("squeezelang.models.offload", "resident", "is_offloaded", "onload_seconds", "compute_device")
_export("squeezelang.models.allocate", "allocate", "describe")
_export("squeezelang.models.distributed", "World", "world", "is_main", "barrier", "share", "any_rank",
        "data_parallel", "ensure_process_group")
_export("squeezelang.models.sharded", "counterparts")
_export("squeezelang.models.load", "load_model", "AFTER_LOAD")
_export("squeezelang.models.save", "save_model", "copy_aux_files")
_export("squeezelang.models.standard", "standard_model")
_export("squeezelang.models.runtime", "RuntimeModel", "RuntimeOutput", "RuntimeCounts")
_export("squeezelang.models.quant_view", "quantized_weights", "QuantizedWeight")
_export("squeezelang.models.hf", "read_config", "load_tokenizer", "from_config", "load_pretrained",
        "config_dtype", "checkpoint_dtype")
_export("squeezelang.models.meta_cache", "cached_meta", "cached_json", "cache_key")
_export("squeezelang.models.layout_meta", layout_meta_of="meta_of")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Load ``name`` from the module that defines it, on first use (and keep it)."""
    if name not in _EXPORTS:
        raise AttributeError(f"squeezelang.plugin has no '{name}' (the plugin-author surface is "
                             f"listed in its docstring and docs/plugins.md)")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
