"""The saved ``model.onnx`` run by an ONNX Runtime session, behind a transformers-like model.

Imported by ``OnnxFormat.load`` only (it imports torch, numpy and onnxruntime at module level).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from squeezelang.plugin import RuntimeCounts, RuntimeModel

from squeezelang_plugins.onnx_format.integer import ROLES_KEY



class OnnxRuntimeModel(RuntimeModel):
    """An ``onnxruntime.InferenceSession`` on the CPU; its inputs are fed by name (token types,
    when the graph takes them and none are given, are zeros)."""

    runtime = "onnxruntime"

    def __init__(self, session: Any, config: Any, counts: RuntimeCounts) -> None:
        super().__init__(config, counts)
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]
        self.outputs = [o.name for o in session.get_outputs()]

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        given = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "token_type_ids": token_type_ids if token_type_ids is not None
                 else torch.zeros_like(input_ids)}
        feed = {name: given[name].detach().cpu().numpy().astype(np.int64, copy=False)
                for name in self.inputs}
        values = self.session.run(self.outputs, feed)
        return {name: torch.from_numpy(np.asarray(v)) for name, v in zip(self.outputs, values)}


def session(path: Path, threads: int) -> Any:
    """A CPU session with every graph optimization, on ``threads`` intra-op threads that do not
    spin while idle (they would take the CPU from whatever is measured next)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _nonzero_codes(array: np.ndarray, role: dict[str, Any]) -> int:
    """Nonzero codes of a stored code tensor (4-bit pairs unpacked; zero: the stored zero code)."""
    values = array.astype(np.int16)
    if role.get("bits") == 4:
        values = np.stack([values & 0x0F, values >> 4], axis=-1)
    return int((values != int(role.get("zero", 0))).sum())


def counts(model: Any) -> RuntimeCounts:
    """What the graph's initializers hold: weight elements (codes at their logical shape, not
    scales, zero points or buffers), the nonzero ones, and the bytes of every initializer."""
    from onnx import TensorProto, numpy_helper

    roles = {}
    for prop in model.metadata_props:
        if prop.key == ROLES_KEY:
            roles = json.loads(prop.value)
    out = RuntimeCounts()
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        out.memory += int(array.nbytes)
        role = roles.get(init.name, {})
        if role.get("role") == "codes":
            out.params += int(np.prod(role["shape"]))
            out.nonzero += _nonzero_codes(array, role)
        elif not role and init.data_type == TensorProto.FLOAT:
            out.params += int(array.size)
            out.nonzero += int(np.count_nonzero(array))
    return out


def load_runtime_model(path: Path, threads: int) -> OnnxRuntimeModel:
    """The model of ``path`` (``model.onnx`` beside its ``config.json``) on ``threads`` threads."""
    import onnx
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path.parent), local_files_only=True,
                                        trust_remote_code=False)
    return OnnxRuntimeModel(session(path, threads), config, counts(onnx.load(str(path))))
