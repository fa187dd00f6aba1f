"""The model being compressed as an lm-evaluation-harness language model (imports ``lm_eval``).

``HarnessLM`` answers the harness's requests the way its ``hf`` model does, so that a task scores
the same as with ``lm_eval --model hf``: text is tokenised with the tokenizer's defaults (a string
that already starts with the BOS text is not given another), a context's trailing spaces move to
the continuation, an empty context is the BOS token (EOS when there is none), inputs longer than
the window keep their last ``max_length`` tokens, and a rolling log-likelihood sums disjoint windows
that each start with one token of context. It calls the model as every metric does,
``model(input_ids=…, attention_mask=…).logits``, so a saved artifact run by another runtime
(ONNX Runtime, llama.cpp) is scored the same way. It does not generate text.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from lm_eval import utils
from lm_eval.api.model import TemplateLM

from squeezelang.plugin import ExecutionError, compute_device, length_limit, pad_id

if TYPE_CHECKING:
    from squeezelang.plugin import ModelHandle

#: The window when neither ``max_length`` nor the model's config gives one (the harness's default).
DEFAULT_WINDOW = 2048

#: ``(request, context tokens, continuation tokens)``, as the harness hands them over.
Request = tuple[Any, list[int], list[int]]


class HarnessLM(TemplateLM):
    """``handle``'s causal LM behind the harness's ``loglikelihood`` and ``loglikelihood_rolling``."""

    def __init__(self, handle: ModelHandle, batch_size: int = 8, max_length: int | None = None,
                 progress: Callable[..., Any] | None = None) -> None:
        super().__init__()
        self.handle = handle
        self.tokenizer = handle.tokenizer
        self.batch_size = batch_size
        self.max_length = length_limit(handle, max_length) or DEFAULT_WINDOW
        self.progress = progress

    @property
    def eot_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return int(eos) if eos is not None else pad_id(self.tokenizer)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False
        return list(self.tokenizer.encode(string, **options))

    # -- scoring ---------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """Per request: the continuation's summed log-probability and whether it is the greedy one."""
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)),
                       key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        bar = self.progress(total=len(requests), desc="lm_eval") if self.progress else None
        model = self.handle.model.eval()
        device = compute_device(model)
        pad = pad_id(self.tokenizer)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                inputs, spans = [], []
                for i in batch:
                    _, context, continuation = requests[i]
                    if len(continuation) > self.max_length:
                        raise ExecutionError(
                            f"lm_eval: a continuation of {len(continuation)} tokens does not fit "
                            f"the window of {self.max_length} tokens (max_length)")
                    tokens = (context + continuation)[-(self.max_length + 1):][:-1]
                    inputs.append(tokens)
                    spans.append((len(tokens) - len(continuation), len(tokens)))
                width = max(len(t) for t in inputs)
                ids = torch.tensor([t + [pad] * (width - len(t)) for t in inputs], device=device)
                mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in inputs],
                                    device=device)
                logits = model(input_ids=ids, attention_mask=mask).logits
                for row, i in enumerate(batch):
                    first, end = spans[row]
                    target = torch.tensor(requests[i][2], dtype=torch.long)
                    scores = torch.log_softmax(logits[row, first:end].float().cpu(), dim=-1)
                    picked = scores.gather(-1, target[:, None])[:, 0]
                    greedy = bool((scores.argmax(-1) == target).all())
                    answers[i] = (float(picked.double().sum()), greedy)
                if bar is not None:
                    bar.update(len(batch))
        if bar is not None:
            bar.close()
        return answers  # type: ignore[return-value]  # every index is filled

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Per text: the log-likelihood of all its tokens, in disjoint windows of ``max_length``."""
        windows: list[Request] = []
        owners: list[int] = []
        for i, request in enumerate(requests):
            (string,) = request.args
            for context, continuation in map(utils.make_disjoint_window,
                                             utils.get_rolling_token_windows(
                                                 token_list=self.tok_encode(string),
                                                 prefix_token=self.prefix_token_id,
                                                 max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        raise ExecutionError("lm_eval: this task generates text (generate_until), which the metric "
                             "does not do; use a multiple-choice or log-likelihood task")
