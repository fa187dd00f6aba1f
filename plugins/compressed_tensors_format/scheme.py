"""What compressed-tensors can hold, and the ``quantization_config`` that describes it (no torch).

vLLM serves weight-only integer quantization (``WNA16``) of linear layers stored as
``pack-quantized``: symmetric codes of 4 or 8 bits packed into int32 words, one scale per output
channel (strategy ``channel``) or per run of ``group_size`` inputs (strategy ``group``). The
engine's codes fit: they are symmetric in ``-qmax .. qmax`` (int4: -7..7 inside compressed-tensors'
-8..7). A per-tensor scale is written as a channel scale repeated on every row (the same codes and
values; vLLM's kernels have no per-tensor weight-only path). FP8 E4M3 weights (``scheme = "fp8"``)
are stored ``float-quantized``, as llm-compressor's FP8 schemes write them: the float8 codes as
the layer's ``weight`` (``torch.float8_e4m3fn``) and ``weight_scale``, one per output channel
(strategy ``channel``) or one for the tensor (strategy ``tensor``), weight-only
(``input_activations`` null).

This module turns the tags a stage stores (``Technique.stores_for``) into refusals for
``squeeze check``, and the schemes of the packed layers into the ``quantization_config`` of
``config.json`` — one config group per distinct scheme, the layers left in float in ``ignore``.
"""
from __future__ import annotations

from dataclasses import dataclass

#: The code widths vLLM's compressed-tensors WNA16 kernels take.
BITS = (4, 8)
#: The compressed-tensors storage format of the packed layers, by code type.
FORMATS = {"int": "pack-quantized", "float": "float-quantized"}
#: The format named at the top of a config whose groups use several.
MIXED = "mixed-precision"
#: Tags a stage may store that compressed-tensors has no layout for, with why.
UNSUPPORTED = {
    "low-rank": "factorized (low-rank) layers are not a standard transformers architecture, and "
                "compressed-tensors stores plain linear layers",
    "clustered": "codebook (clustered) weights have no compressed-tensors layout; quantize the "
                 "layers instead",
    "shared-layers": "layers shared between blocks are not a standard transformers architecture",
    "static-activations": "int8 activations with static scales (scheme \"w8a8\") are not written "
                          "in this format yet (use format = \"onnx\" or \"squeeze\")",
}


@dataclass(frozen=True, order=True)
class Scheme:
    """How one packed layer is quantized: code ``bits``, ``strategy`` (``"group"``,
    ``"channel"``, or ``"tensor"`` for float codes), ``group_size`` (group strategy only) and the
    code ``type`` (``"int"``, or ``"float"``: FP8 E4M3)."""

    bits: int
    strategy: str
    group_size: int | None = None
    type: str = "int"

    @property
    def format(self) -> str:
        """The compressed-tensors format its layers are stored in."""
        return FORMATS[self.type]

    def weights(self) -> dict[str, object]:
        """The scheme's ``weights`` entry (compressed-tensors ``QuantizationArgs``)."""
        return {"num_bits": self.bits, "type": self.type, "symmetric": True,
                "strategy": self.strategy, "group_size": self.group_size, "dynamic": False,
                "actorder": None, "block_structure": None, "observer": None,
                "observer_kwargs": {}}


def refusals(stages: list[tuple[str, frozenset[str]]], conv1d: bool) -> list[tuple[str | None, str]]:
    """What the stages store that the format cannot hold, as ``(stage, reason)``; ``conv1d``: the
    model's family keeps its projections as GPT-2 ``Conv1D`` (``[in, out]``)."""
    out: list[tuple[str | None, str]] = []
    for name, stored in stages:
        out += [(name, why) for tag, why in UNSUPPORTED.items() if tag in stored]
        widths = sorted(int(t.split(":", 1)[1]) for t in stored if t.startswith("bits:"))
        odd = [b for b in widths if b not in BITS]
        if odd:
            out.append((name, f"compressed-tensors packs 4- or 8-bit codes for vLLM's kernels, not "
                              f"{', '.join(map(str, odd))}-bit ones: quantize with bits = [4, 8]"))
        elif (widths or "fp8" in stored) and conv1d:
            out.append((name, "compressed-tensors and vLLM quantize torch.nn.Linear layers "
                              "([out, in]), and this model's projections are GPT-2 Conv1D "
                              "([in, out]): use format = \"squeeze\""))
    return out


def quantization_config(schemes: dict[str, Scheme], ignore: list[str]) -> dict[str, object]:
    """The ``quantization_config`` of ``config.json`` for packed layers (``{module: Scheme}``) and
    the linear layers left in float (``ignore``): one config group per scheme, targeting every
    ``Linear`` when one scheme covers them all (as llm-compressor writes it), else its layers by
    name."""
    by_scheme: dict[Scheme, list[str]] = {}
    for module, scheme in sorted(schemes.items()):
        by_scheme.setdefault(scheme, []).append(module)
    single = len(by_scheme) == 1
    groups = {f"group_{i}": {"targets": ["Linear"] if single else modules,
                             "weights": scheme.weights(), "input_activations": None,
                             "output_activations": None, "format": scheme.format}
              for i, (scheme, modules) in enumerate(sorted(by_scheme.items()))}
    formats = {scheme.format for scheme in by_scheme}
    return {"quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else MIXED,
            "quantization_status": "compressed", "config_groups": groups,
            "ignore": sorted(ignore), "kv_cache_scheme": None, "global_compression_ratio": None}
