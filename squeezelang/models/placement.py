"""Where a run computes: the device (``cpu``, ``cuda``, or ``auto``) and the dtype of the model's
floating tensors (``auto``: as stored, or ``float32``, ``bfloat16``, ``float16``).

Given in the recipe as engine arguments of the model source, ``model = hf("dir", task = …,
device = "auto", dtype = "bfloat16")``, or on the command line (``squeeze run --device cuda``),
which wins. The names are read torch-free (``squeeze check`` validates them); torch is imported
only to place a model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from squeezelang.errors import SqueezeError

if TYPE_CHECKING:
    from squeezelang.models.handle import ModelHandle

DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_DEVICE, DEFAULT_DTYPE = "cpu", "auto"
DEFAULT_OFFLOAD = False

#: The model source arguments the engine handles itself (every source takes them).
SCHEMA: dict[str, Any] = {
    "device": {"enum": list(DEVICES), "default": DEFAULT_DEVICE,
               "description": "where stages and metrics compute: cpu, cuda, or auto (cuda when "
                              "torch sees a GPU, else cpu)"},
    "dtype": {"enum": list(DTYPES), "default": DEFAULT_DTYPE,
              "description": "the dtype of the model's floating tensors while the stages run and "
                             "as saved: auto keeps the checkpoint's"},
    "offload": {"type": "boolean", "default": DEFAULT_OFFLOAD,
                "description": "keep the weights in their files and read them one block at a "
                               "time as they are used: memory about one block (and the stage's "
                               "work), for models larger than memory; slower"},
}


def resolve_device(name: str) -> str:
    """``name`` as a torch device type: ``auto`` picks ``cuda`` when torch sees a GPU; ``cuda``
    without one is refused with what to do."""
    import torch

    if name not in DEVICES:
        raise SqueezeError(f"unknown device '{name}': use one of {', '.join(DEVICES)}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        build = ("this torch is a CPU-only build (install its CUDA build: make setup-gpu, see "
                 "the README's 'Devices and precision')"
                 if torch.version.cuda is None else
                 f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
        raise SqueezeError(f"device 'cuda': {build}; or run with --device cpu / device = \"auto\"")
    return name


def torch_dtype(name: str) -> Any:
    """The torch dtype named ``name`` (``None`` for ``auto``)."""
    import torch

    if name not in DTYPES:
        raise SqueezeError(f"unknown dtype '{name}': use one of {', '.join(DTYPES)}")
    return None if name == "auto" else getattr(torch, name)


def place_(handle: ModelHandle, device: str, dtype: str = DEFAULT_DTYPE) -> ModelHandle:
    """Move ``handle``'s model to ``device`` (a resolved type: ``cpu`` or ``cuda``) and cast its
    floating parameters and buffers to ``dtype`` (unless ``auto``); its config names the dtype
    then, so that what is saved says what it holds. Returns ``handle``."""
    from squeezelang.models.offload import state_of

    model = handle.model
    wanted = torch_dtype(dtype)
    if wanted is not None:
        model.to(dtype=wanted)
        config = getattr(model, "config", None)
        if config is not None:  # ``dtype`` in transformers 5, ``torch_dtype`` before
            setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", wanted)
    offloaded = state_of(model)
    if offloaded is not None:  # weights on meta are read onto the device as they are used
        offloaded.device = device
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.device.type not in ("meta", device):
                tensor.data = tensor.data.to(device)
    elif device != "cpu" or any(p.device.type != "cpu" for p in model.parameters()):
        model.to(device)
    return handle

