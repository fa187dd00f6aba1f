"""Run a saved GGUF: in llama.cpp (llama-cpp-python), or, without it, dequantized in torch.

``LlamaCppModel`` evaluates each row of a batch alone (up to its attention-mask length, the KV
cache cleared between rows) and returns llama.cpp's logits for every position. Without
llama-cpp-python, ``DequantizedModel`` reads the GGUF back with gguf-py (``GGUFReader``),
dequantizes every tensor with gguf-py's reference code, undoes the layout changes
(``tensors.from_gguf``) and runs the transformers model of the ``config.json`` beside it: the
weights llama.cpp would use, on torch's kernels. Its ``runtime`` says so, and so does the report.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from squeezelang.plugin import ExecutionError, RuntimeCounts, RuntimeModel, SqueezeError

if TYPE_CHECKING:
    import numpy as np

LLAMA_CPP = "llama.cpp"
FALLBACK = "gguf-dequantized (llama-cpp-python not installed)"


class LlamaCppModel(RuntimeModel):
    """A GGUF run by llama.cpp through llama-cpp-python's binding of ``llama.h``, one row at a time.

    The context (KV cache) is sized to the longest row seen so far, never past the model's
    positions. ``repack``: llama.cpp may repack quantized weights into its faster layouts (its
    "extra buffer types": AMX tiles, interleaved AVX blocks); ``probe_repack`` says whether that
    survives on this machine (in a sandbox that denies AMX tiles it crashes the process).
    """

    runtime = LLAMA_CPP

    def __init__(self, config: Any, counts: RuntimeCounts, path: Path, threads: int,
                 repack: bool) -> None:
        import llama_cpp as lc

        super().__init__(config, counts)
        if not repack:
            self.runtime = f"{LLAMA_CPP} (weights not repacked)"
        self.path, self.threads = path, threads
        self.max_ctx = int(getattr(config, "max_position_embeddings", None)
                           or getattr(config, "n_positions", None) or 2048)
        self._ctx = self._batch = None
        self.n_ctx = 0
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        params.use_extra_bufts = repack
        with _llama_log() as log:
            self._model = lc.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not self._model:
            raise SqueezeError(f"llama.cpp cannot load {path}: " + _last_error(log.getvalue()))
        self.vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model)))

    def _context(self, length: int) -> None:
        """A context that holds ``length`` tokens (a new, larger one if needed)."""
        import llama_cpp as lc

        if length <= self.n_ctx:
            return
        if length > self.max_ctx:
            raise ExecutionError(f"llama.cpp: a row of {length} tokens is longer than the "
                                 f"model's context ({self.max_ctx})")
        self._free_context()
        n_ctx = min(self.max_ctx, max(256, 1 << (length - 1).bit_length()))
        params = lc.llama_context_default_params()
        params.n_ctx = params.n_batch = n_ctx
        params.n_ubatch = min(n_ctx, 512)
        params.n_seq_max, params.n_threads, params.n_threads_batch = 1, self.threads, self.threads
        with _llama_log() as log:
            self._ctx = lc.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise SqueezeError(f"llama.cpp cannot run {self.path}: " + _last_error(log.getvalue()))
        self._batch = lc.llama_batch_init(n_ctx, 0, 1)
        self.n_ctx = n_ctx

    def _free_context(self) -> None:
        import llama_cpp as lc

        if self._batch is not None:
            lc.llama_batch_free(self._batch)
        if self._ctx:
            lc.llama_free(self._ctx)
        self._ctx = self._batch = None
        self.n_ctx = 0

    def __del__(self) -> None:
        if not getattr(self, "_model", None):
            return
        with contextlib.suppress(Exception):  # at interpreter exit the binding may be gone
            import llama_cpp as lc

            self._free_context()
            lc.llama_model_free(self._model)
            self._model = None

    def logits_of(self, tokens: list[int]) -> np.ndarray:
        """llama.cpp's logits ``[len(tokens), vocab]`` of one sequence, from an empty KV cache."""
        import llama_cpp as lc
        import numpy as np

        if min(tokens) < 0 or max(tokens) >= self.vocab:
            raise ExecutionError(f"llama.cpp: token ids outside the vocabulary (0..{self.vocab - 1})")
        self._context(len(tokens))
        lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, True
            batch.seq_id[i][0] = 0
        status = lc.llama_decode(self._ctx, batch)
        if status != 0:
            raise ExecutionError(f"llama.cpp: llama_decode failed ({status})")
        flat = np.ctypeslib.as_array(lc.llama_get_logits(self._ctx),
                                     shape=(len(tokens) * self.vocab,))
        return flat.reshape(len(tokens), self.vocab).copy()

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        batch, seq = input_ids.shape
        logits = torch.zeros(batch, seq, self.vocab)
        for row, length in enumerate(int(n) for n in attention_mask.sum(dim=1).tolist()):
            if length:
                logits[row, :length] = torch.from_numpy(
                    self.logits_of(input_ids[row, :length].tolist()))
        return {"logits": logits}


@contextlib.contextmanager
def _llama_log() -> Iterator[io.StringIO]:
    """llama.cpp's log while loading, kept (not printed): shown only if loading fails. Afterwards
    its warnings are silenced, as ``llama_cpp.Llama(verbose=False)`` does."""
    logger = logging.getLogger("llama-cpp-python")  # llama-cpp-python routes llama.cpp's log here
    buffer = io.StringIO()
    logger.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stderr(buffer):
            yield buffer
    finally:
        logger.setLevel(logging.ERROR)


def _last_error(log: str) -> str:
    lines = [line for line in log.splitlines() if "error" in line.lower() or "fail" in line.lower()]
    return "; ".join(lines[-3:]) or "see llama.cpp's log (llama_cpp verbose)"


def probe_repack(path: Path, threads: int) -> bool:
    """Whether llama.cpp survives running ``path`` with its weights repacked, tried in a child
    process (a crash there costs nothing here)."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_probe, args=(str(path), threads),
                                                         daemon=True)
    try:
        child.start()
        child.join(600)
    except OSError:
        return False
    if child.is_alive():
        child.kill()
        child.join()
        return False
    return child.exitcode == 0


def _probe(path: str, threads: int) -> None:
    """The child of ``probe_repack``: load with repacking and run two tokens."""
    from types import SimpleNamespace

    model = LlamaCppModel(SimpleNamespace(max_position_embeddings=8), RuntimeCounts(), Path(path),
                          threads, repack=True)
    model.logits_of([0, 0])


class DequantizedModel(RuntimeModel):
    """A GGUF's weights, dequantized, in the transformers model of its config (no llama.cpp)."""

    runtime = FALLBACK

    def __init__(self, config: Any, counts: RuntimeCounts, net: Any) -> None:
        super().__init__(config, counts)
        self.net = net

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = self.net(input_ids=input_ids, attention_mask=attention_mask)
        logits = out.logits.float() * attention_mask.unsqueeze(-1).to(torch.float32)
        return {"logits": logits}


def counts_of(path: Path) -> RuntimeCounts:
    """``params`` (logical shapes), ``nonzero`` and ``memory`` (tensor data bytes) of a GGUF."""
    import math

    import gguf

    from .quants import nonzero
    from .tensors import ROPE_FREQS

    counts = RuntimeCounts()
    for t in gguf.GGUFReader(str(path)).tensors:
        counts.memory += int(t.n_bytes)
        if t.name != ROPE_FREQS:  # rotary factors, not weights
            counts.params += math.prod(int(d) for d in t.shape)
            counts.nonzero += nonzero(t.data, t.tensor_type.name)
    return counts


def _dequantized(t: Any) -> np.ndarray:
    """A GGUF tensor as float32 in numpy order (``[rows, cols]``)."""
    import gguf
    import numpy as np

    shape = tuple(int(d) for d in reversed(t.shape))
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def read_state(path: Path, net: Any, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The GGUF's tensors by the state-dict names of ``net`` (a model of ``config``)."""
    import gguf

    from squeezelang.plugin import sizes

    from .names import arch_of
    from .tensors import from_gguf, slots

    arch = arch_of(config)
    if arch is None:
        raise SqueezeError(f"{path}: model type {config.get('model_type')!r} is not one this "
                           "format writes")
    by_gguf = {s.gguf: s for s in slots(net, arch, sizes(net.config))}
    state = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        slot = by_gguf.get(t.name)
        if slot is None:
            continue  # rope_freqs: the config's rope parameters give them back
        values = torch.from_numpy(from_gguf(slot, _dequantized(t)))
        for name in (slot.hf, *slot.aliases):
            state[name] = values
    return state


def dequantized_model(directory: Path, path: Path, task: str) -> DequantizedModel:
    """The torch fallback: ``config.json``'s model with the GGUF's weights, dequantized."""
    from transformers import AutoConfig

    from squeezelang.plugin import from_config, read_config

    config = AutoConfig.from_pretrained(str(directory), local_files_only=True,
                                        trust_remote_code=False)
    net = from_config(config, task).float()
    state = read_state(path, net, read_config(directory))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SqueezeError(f"{path}: the GGUF does not match config.json (missing "
                           f"{missing[:3]}, unexpected {unexpected[:3]})")
    net.eval()
    return DequantizedModel(config, counts_of(path), net)


def llama_cpp_model(directory: Path, path: Path, threads: int) -> LlamaCppModel:
    """The GGUF in llama.cpp, its weights repacked where that is safe (``probe_repack``)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(directory), local_files_only=True,
                                        trust_remote_code=False)
    return LlamaCppModel(config, counts_of(path), path, threads, probe_repack(path, threads))
