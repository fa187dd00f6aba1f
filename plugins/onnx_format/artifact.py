"""Write the ONNX artifact: ``model.onnx`` (with ``model.onnx.data`` past 2 GB), ``config.json``
and the tokenizer, so that ``onnxruntime.InferenceSession(dir/model.onnx)`` and
``AutoTokenizer.from_pretrained(dir)`` need nothing else."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezelang.plugin import SqueezeError

from squeezelang_plugins.onnx_format import FP8
from squeezelang_plugins.onnx_format.integer import ROLES_KEY, WIDTHS, block_size_problem

if TYPE_CHECKING:
    from squeezelang.plugin import ModelHandle, QuantizedWeight

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
#: The oldest ONNX Runtime with every kernel the graph may use.
MIN_ONNXRUNTIME = (1, 23)
#: Past this many bytes of weights the tensors go to ``DATA_FILE`` (protobuf stops at 2 GiB).
EXTERNAL_BYTES = 2**31 - 2**26


def needs_runtime() -> None:
    """Raise the install hint when onnx or onnxruntime is missing, or onnxruntime too old for the
    kernels the graph uses (``GatherBlockQuantized`` on uint8 codes, 8-bit ones: 1.23)."""
    from squeezelang_plugins.onnx_format import OnnxFormat

    OnnxFormat().require_extra("onnx", "onnx", "onnxruntime")
    import onnxruntime

    version = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_ONNXRUNTIME:
        raise SqueezeError(f"format onnx needs onnxruntime >= "
                           f"{'.'.join(map(str, MIN_ONNXRUNTIME))}, not {onnxruntime.__version__}: "
                           "pip install -U 'squeezelang[onnx]'")


def refuse_codecs(handle: ModelHandle) -> None:
    """Refuse, by tensor, what ``check`` refuses by stage: clustered weights."""
    for name, spec in sorted(handle.codecs.items()):
        if isinstance(spec, dict) and spec.get("cluster"):
            raise SqueezeError(f"format onnx: '{name}' is clustered (a codebook); ONNX Runtime has "
                               "no kernel for it")


def refuse_weights(weights: dict[str, QuantizedWeight]) -> None:
    """Refuse, by tensor, widths and groups the integer kernels cannot take."""
    for name, weight in sorted(weights.items()):
        if weight.code_format is not None:
            raise SqueezeError(f"format onnx: '{name}' holds {weight.code_format} codes: {FP8}")
        if weight.bits not in WIDTHS:
            raise SqueezeError(f"format onnx: '{name}' has {weight.bits}-bit codes; ONNX Runtime's "
                               "integer kernels take 4- and 8-bit weights")
        if weight.group is not None:
            problem = block_size_problem(int(weight.group))
            if problem:
                raise SqueezeError(f"format onnx: '{name}': {problem}")
        elif weight.bits != 8:
            raise SqueezeError(f"format onnx: '{name}' has {weight.bits}-bit codes without groups; "
                               "MatMulInteger takes 8-bit codes")


def _values(handle: ModelHandle, weights: dict[str, QuantizedWeight]) -> dict[str, Any]:
    """Each quantized weight's float32 value, as the traced float copy holds it."""
    state = handle.model.state_dict()
    return {name: state[name].detach().cpu().float().numpy() for name in weights}


def graph(handle: ModelHandle, options: dict[str, Any]) -> Any:
    """The traced graph of ``handle`` with its quantized weights as integer kernels."""
    import onnx

    from squeezelang.plugin import quantized_weights

    from squeezelang_plugins.onnx_format.dedupe import dedupe_, inline_identities_
    from squeezelang_plugins.onnx_format.export import buffer_names, float_model, trace

    refuse_codecs(handle)
    weights = quantized_weights(handle)
    refuse_weights(weights)
    model = float_model(handle)
    with tempfile.TemporaryDirectory(prefix="squeeze-onnx-") as tmp:
        path = Path(tmp) / MODEL_FILE
        trace(handle, model, path, int(options.get("opset", 18)))
        proto = onnx.load(str(path))
    inline_identities_(proto.graph)
    proto, roles = _rewritten(handle, model, proto, weights, options)
    dedupe_(proto.graph)
    present = {init.name for init in proto.graph.initializer}
    roles.update({name: {"role": "buffer"} for name in buffer_names(model) & present})
    proto.metadata_props.add(key=ROLES_KEY, value=json.dumps(roles, sort_keys=True))
    proto.producer_name = "squeezelang"
    return proto


def _rewritten(handle: ModelHandle, model: Any, proto: Any, weights: dict[str, QuantizedWeight],
               options: dict[str, Any]) -> tuple[Any, dict[str, dict[str, Any]]]:
    """The graph with its quantized weights as integer kernels, and the roles of the initializers
    written: from the graph with fused attention (``fusion``) when the family has one, it computes
    what the plain graph computes and its projections fit ``QAttention``; else from the plain one."""
    from squeezelang_plugins.onnx_format.export import example_inputs, input_names
    from squeezelang_plugins.onnx_format.fusion import fused, same_outputs
    from squeezelang_plugins.onnx_format.integer import rewrite_
    from squeezelang_plugins.onnx_format.qattention import Unfusable
    from squeezelang_plugins.onnx_format.static import grids

    args = (weights, _values(handle, weights), options.get("activations", "dynamic"),
            options.get("float_activations", []), grids(handle))
    candidate = None
    if options.get("fuse_attention", True):
        candidate = fused(proto, handle.model.config)
    if candidate is not None:
        inputs = input_names(handle)
        feeds = {name: t.numpy() for name, t in zip(inputs, example_inputs(model, inputs))}
        if same_outputs(proto, candidate, feeds):
            try:
                return candidate, rewrite_(candidate.graph, *args)
            except Unfusable:
                pass
    return proto, rewrite_(proto.graph, *args)


def write_model(proto: Any, directory: Path) -> None:
    """``model.onnx``, its tensors in ``model.onnx.data`` if they pass ``EXTERNAL_BYTES``."""
    import onnx

    total = sum(len(init.raw_data) for init in proto.graph.initializer)
    path = directory / MODEL_FILE
    try:
        if total > EXTERNAL_BYTES:
            onnx.save_model(proto, str(path), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
        else:
            onnx.save_model(proto, str(path))
    except (OSError, ValueError) as exc:
        raise SqueezeError(f"{path}: cannot write the ONNX model: {exc}") from None


def write_config(handle: ModelHandle, directory: Path) -> None:
    """The model's ``config.json``, naming float32 (the graph's dtype)."""
    config = json.loads(handle.model.config.to_json_string(use_diff=True))
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                           encoding="utf-8")


def save(handle: ModelHandle, directory: Path, options: dict[str, Any]) -> list[str]:
    """Write the artifact into ``directory``; return the relative paths written."""
    needs_runtime()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    before = {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}
    proto = graph(handle, options)
    write_model(proto, directory)
    write_config(handle, directory)
    if handle.tokenizer is not None:
        handle.tokenizer.save_pretrained(str(directory))
    after = [p for p in directory.rglob("*") if p.is_file()]
    return sorted(p.relative_to(directory).as_posix() for p in after
                  if before.get(p) != p.stat().st_mtime_ns)
