"""Load a model directory written by ``save_model`` (or any transformers checkpoint) as a ``ModelHandle``.

Without ``squeeze.json`` the directory is a plain checkpoint, loaded with ``from_pretrained``. With
it: the model is built from ``config.json``; edits are replayed through their technique's
``rebuild_`` — those whose record says ``"when": "after_load"`` (runtime conversions such as dynamic
int8 kernels, which need the loaded weights) after the state dict is loaded, the others (structural
changes such as low-rank factors) before; the stored tensors are decoded through their codecs and
loaded strictly. Only safetensors are read: never ``torch.load`` or pickle.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from squeezelang.errors import SqueezeError
from squeezelang.models import codec, hf
from squeezelang.models.handle import ModelHandle

if TYPE_CHECKING:
    import torch

    from squeezelang.hooks.registry import Registries

SQUEEZE_FILE = "squeeze.json"
AFTER_LOAD = "after_load"
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                      "spiece.model", "tokenizer.model", "sentencepiece.bpe.model")
_TASK_SUFFIXES = (("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"),
                  ("ForMaskedLM", "masked-lm"), ("ForSequenceClassification", "classification"))


def task_from_config(config: dict[str, Any]) -> str:
    """The task a checkpoint was saved for, from ``config.architectures`` (default ``embedding``)."""
    for arch in config.get("architectures") or ():
        for suffix, task in _TASK_SUFFIXES:
            if str(arch).endswith(suffix):
                return task
    return "embedding"


def read_squeeze_json(directory: Path) -> dict[str, Any] | None:
    """The parsed ``squeeze.json`` of ``directory``, ``None`` if absent; ``SqueezeError`` if invalid."""
    path = Path(directory) / SQUEEZE_FILE
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SqueezeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != codec.FORMAT_NAME:
        raise SqueezeError(f"{path}: not a squeezelang model file (format is not "
                           f"'{codec.FORMAT_NAME}')")
    version = doc.get("version")
    if not isinstance(version, int) or version > codec.FORMAT_VERSION:
        raise SqueezeError(f"{path}: format version {version!r} is newer than this squeezelang "
                           f"understands ({codec.FORMAT_VERSION}); upgrade squeezelang")
    for key, kind in (("codecs", dict), ("edits", list), ("states", list)):
        if not isinstance(doc.get(key, kind()), kind):
            raise SqueezeError(f"{path}: '{key}' must be a JSON {kind.__name__}")
    for i, rec in enumerate(doc.get("edits", [])):
        if not isinstance(rec, dict) or not isinstance(rec.get("technique"), str):
            raise SqueezeError(f"{path}: edit #{i + 1} has no 'technique'")
    return doc


def load_model(directory: Path, registries: Registries | None = None,
               task: str | None = None, offload: bool = False,
               overlay_root: Path | None = None) -> ModelHandle:
    """Load ``directory`` as a ``ModelHandle`` (eval mode) with its codecs, edits and states.

    ``offload``: the weights stay in the files and are read (decoded) one unit at a time as the
    model runs (``models.offload``); a model whose edits need its loaded weights (runtime kernels
    built after loading) is loaded whole."""
    from squeezelang.models import offload as offloading

    directory = Path(directory)
    if not directory.is_dir():
        raise SqueezeError(f"{directory}: not a directory")
    config = hf.read_config(directory)
    doc = read_squeeze_json(directory)
    tokenizer = _tokenizer(directory)
    if doc is None:
        task = task or task_from_config(config)
        model = (offloading.load_offloaded(directory, task, overlay_root=overlay_root) if offload
                 else hf.load_pretrained(directory, task))
        return ModelHandle(model=model, tokenizer=tokenizer, task=task, source_dir=directory)
    task = task or doc.get("task") or task_from_config(config)
    codecs = {k: v for k, v in doc.get("codecs", {}).items() if v}
    edits = list(doc.get("edits", []))
    before = [r for r in edits if r.get("when") != AFTER_LOAD]
    after = [r for r in edits if r.get("when") == AFTER_LOAD]
    if edits and registries is None:
        from squeezelang.hooks.manager import default_registries

        registries = default_registries()
    with parameters_on_meta():  # the weights come from the file: no allocation, no random init
        model = _build(directory, task)
        for record in before:
            model = _technique(registries, record, directory).rebuild_(model, record)
    if offload and not after:
        model = offloading.load_offloaded(directory, task, codecs=codecs,
                                          overlay_root=overlay_root, model=model)
        return ModelHandle(model=model, tokenizer=tokenizer, task=task, source_dir=directory,
                           codecs=codecs, edits=edits, states=set(doc.get("states", [])))
    tied = tied_parameters(model)
    stored = read_weights(directory)
    state = decode_state(model, stored, codecs, directory, tied)
    for name, tensor in state.items():
        problem = nonfinite(tensor)
        if problem:
            raise SqueezeError(f"{directory / 'model.safetensors'}: tensor '{name}' holds {problem}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise SqueezeError(f"{directory / 'model.safetensors'}: weights do not fit the model: {exc}") from None
    del state
    retie_(model, tied)
    for record in after:
        model = _technique(registries, record, directory).rebuild_(model, record)
    model.eval()
    return ModelHandle(model=model, tokenizer=tokenizer, task=task, source_dir=directory,
                       codecs=codecs, edits=edits, states=set(doc.get("states", [])))


def _build(directory: Path, task: str) -> Any:
    """A fresh model of the directory's (unpacked) config, to load the decoded weights into."""
    try:
        config = hf.config_from_dict(hf.read_config(directory))
    except SqueezeError:
        raise
    except Exception as exc:
        raise SqueezeError(f"{directory / 'config.json'}: cannot read the config: "
                           f"{type(exc).__name__}: {exc}") from None
    return hf.from_config(config, task)


def _technique(registries: Any, record: dict[str, Any], directory: Path) -> Any:
    name = record["technique"]
    technique = registries.techniques.get(name)
    if technique is None:
        raise SqueezeError(f"{directory / SQUEEZE_FILE}: the model was edited by technique '{name}', "
                           "which no installed plugin provides")
    return technique


def _tokenizer(directory: Path) -> Any:
    if any((directory / f).exists() for f in _TOKENIZER_MARKERS):
        return hf.load_tokenizer(directory)
    return None


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's top-level ``*.safetensors`` files, each in memory of its
    own: a tensor mapped from the file would keep the whole file mapped, and resident, for as
    long as any one of them lives (a norm weight the model keeps as stored, say), and a tensor
    dropped once decoded (``decode_state``) gives its memory back."""
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise SqueezeError(f"{directory}: no model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            try:
                tensors = load_file(str(path), backend="pread")
            except TypeError:  # safetensors before 0.8 only maps: copy each tensor out
                tensors = {name: t.clone() for name, t in load_file(str(path)).items()}
        except Exception as exc:
            raise SqueezeError(f"{path}: cannot read the weights: {type(exc).__name__}: {exc}") from None
        out.update(tensors)
    return out


def nonfinite(tensor: torch.Tensor) -> str | None:
    """What is wrong with a floating tensor holding NaN or Inf (``"2 NaN of 4,096 values"``), or None."""
    import torch

    if not tensor.is_floating_point() or tensor.device.type == "meta":
        return None
    if tensor.element_size() == 1:  # float8 (compressed-tensors' FP8 weights): torch checks no
        tensor = tensor.float()     # finiteness in it; float32 holds its values exactly
    # a finite sum means every value is finite (NaN and Inf carry through a sum); only a sum
    # that is not (values that overflow it, or a real NaN / Inf) needs the full test
    if bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all()):
        return None
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    found = " and ".join(f"{n:,} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n)
    return f"{found} of {tensor.numel():,} values"


def check_weight_files(directory: Path) -> None:
    """Refuse unreadable ``*.safetensors`` files and weights holding NaN or Inf, naming file and tensor.

    Called before a model is built from the files, so that a truncated download or a diverged
    checkpoint is reported as such before any work starts. Reads one tensor at a time.
    """
    from safetensors import safe_open

    for path in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    problem = nonfinite(f.get_tensor(name))
                    if problem:
                        raise SqueezeError(f"{path}: tensor '{name}' holds {problem}; the "
                                           "checkpoint is corrupt (or its training diverged)")
        except SqueezeError:
            raise
        except Exception as exc:  # safetensors' own errors: truncated file, bad header, bad dtype
            raise SqueezeError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                               f"{type(exc).__name__}: {exc}") from None


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """A context in which modules create their parameters on the meta device (buffers stay real:
    the non-persistent ones, which no file holds, keep the values their module computed)."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module: Any, name: str, param: Any) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"),
                                                          requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def tied_parameters(model: Any) -> dict[str, str]:
    """``{alias: first name}`` of parameters registered under several names (tied weights)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def retie_(model: Any, tied: dict[str, str]) -> None:
    """Make each alias the same parameter as its first name again (``assign`` loading gave each
    name a parameter of its own)."""
    from squeezelang.models.select import get_module

    for alias, name in tied.items():
        owner, _, attr = alias.rpartition(".")
        source_owner, _, source_attr = name.rpartition(".")
        source = getattr(get_module(model, source_owner) if source_owner else model, source_attr)
        setattr(get_module(model, owner) if owner else model, attr, source)


def decode_state(model: Any, stored: dict[str, torch.Tensor], codecs: dict[str, Any],
                 directory: Path, tied: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict decoded from ``stored``; tied aliases (``tied``, else those sharing
    storage in the model) filled from their first name.

    ``stored`` is consumed: each stored tensor leaves it once decoded, so that the stored and the
    decoded weights of the whole model are never in memory together."""
    from squeezelang.models.save import _aliases

    expected = model.state_dict()
    aliases = tied if tied is not None else _aliases(expected)
    where = directory / "model.safetensors"
    unknown = sorted(set(codecs) - set(expected))
    if unknown:
        raise SqueezeError(f"{directory / SQUEEZE_FILE}: codecs for tensors the model does not have: "
                           f"{', '.join(unknown[:5])}")
    state: dict[str, torch.Tensor] = {}
    missing = []
    for name, ref in expected.items():
        spec = codecs.get(name)
        names = codec.stored_names(name, spec)
        if all(n in stored for n in names):
            try:
                state[name] = codec.decode(name, stored, spec, ref.shape, ref.dtype)
            except SqueezeError as exc:
                raise SqueezeError(f"{where}: {exc}") from None
            for n in names:
                del stored[n]
        elif name in aliases:
            continue  # filled below from the tensor it is tied to
        else:
            missing.append(name)
    for alias, first in aliases.items():
        if alias not in state:
            if first not in state:
                missing.append(alias)
            else:
                state[alias] = state[first]
    if missing:
        raise SqueezeError(f"{where}: missing tensor(s) {', '.join(missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    extra = sorted(stored)
    if extra:
        raise SqueezeError(f"{where}: unexpected tensor(s) {', '.join(extra[:5])}"
                           + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    return state
