"""Input statistics (``linear_stats.accumulate``): one ``XᵀX`` per input shared by the layers that
read it, exact against sums taken by hand, also when a layer's inputs part from its sharers'; and
GPTQ's float32 inverse."""
from __future__ import annotations

import torch

from squeezelang.models.linear_stats import gptq_quantize, gptq_rows, input_stats

from conftest import SENTENCES, build_family_handle


def _by_hand(model: torch.nn.Module, modules: list[tuple[str, torch.nn.Module]], run) -> dict:
    """``XᵀX`` (float64) and token count of each module's inputs, summed by hooks of the test."""
    out: dict[str, list] = {}

    def hook_for(name):
        def hook(module, args):
            rows = args[0].reshape(-1, args[0].shape[-1]).double()
            acc = out.setdefault(name, [0, 0])
            acc[0] += rows.shape[0]
            acc[1] = acc[1] + rows.t() @ rows
        return hook

    hooks = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules]
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in hooks:
            h.remove()
    return {n: acc[1] / acc[0] for n, acc in out.items()}


def test_layers_reading_one_input_share_one_matrix_equal_to_their_own():
    handle = build_family_handle("llama")
    block = handle.model.model.layers[0]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    modules = [(f"model.layers.0.{n}", block.get_submodule(n)) for n in names]
    texts = SENTENCES[:6]
    stats = input_stats(handle, texts, modules, gram=True, batch_size=2, max_length=16)
    grams = [stats[f"model.layers.0.{n}"].gram for n in names]
    assert grams[0] is grams[1] is grams[2]  # q, k, v
    assert grams[4] is grams[5]  # gate, up
    assert len({id(g) for g in grams}) == 4
    assert all(g.dtype == torch.float32 for g in grams)

    tokenizer = handle.tokenizer

    def run_unpadded():  # by hand, a text at a time: the tokens the masked rows hold
        for text in texts:
            enc = tokenizer([text], return_tensors="pt", truncation=True, max_length=16)
            handle.model(**enc, use_cache=False)
    reference = _by_hand(handle.model, modules, run_unpadded)
    for name, gram in zip(names, grams):
        expected = reference[f"model.layers.0.{name}"]
        assert torch.allclose(gram.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max())


class _Twice(torch.nn.Module):
    """``a`` reads x and then its own output; ``b`` reads x only, ``c`` x in the first batch
    only: sharing must follow what each layer read, batch by batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(8, 8) for _ in range(3))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        y = self.a(x) + self.b(x)
        if self.calls == 1:
            y = y + self.c(x)
        else:
            y = y + self.c(x * 2)
        return self.a(torch.tanh(y))


def test_a_layer_whose_inputs_part_from_its_sharers_gets_its_own_sum():
    from squeezelang.models.linear_stats import accumulate, finish

    torch.manual_seed(0)
    model = _Twice()
    modules = [("a", model.a), ("b", model.b), ("c", model.c)]
    batches = [torch.randn(2, 5, 8) for _ in range(3)]
    sums: dict = {}
    with accumulate(modules, sums, True) as live, torch.inference_mode():
        for x in batches:
            live["mask"], live["seen"] = torch.ones(2, 5, dtype=torch.bool), {}
            model(x)
    stats = finish(modules, sums)
    model.calls = 0
    reference = _by_hand(model, modules, lambda: [model(x) for x in batches])
    for name in "abc":
        assert torch.allclose(stats[name].gram.double(), reference[name], rtol=1e-5, atol=1e-6), name
    assert stats["b"].gram is not stats["c"].gram  # c read x in batch 1 only, b in every batch
    assert stats["a"].tokens == 2 * stats["b"].tokens


def test_gptq_inverse_in_float32_rounds_as_well_as_before():
    torch.manual_seed(0)
    mix = torch.randn(96, 96)
    x = torch.randn(4000, 96) @ mix * 0.1
    w = torch.randn(40, 96) * 0.02
    gram64 = (x.t() @ x).double() / x.shape[0]
    q = gptq_quantize(w, gram64, 4, 32)
    q32 = gptq_quantize(w, gram64.float(), 4, 32)
    assert torch.equal(q, q32)
    error = ((q - w) @ x.t()).pow(2).mean()
    from squeezelang.models.codec import quantize_weight

    rounded = ((quantize_weight(w, 4, 0, 32) - w) @ x.t()).pow(2).mean()
    assert error < 0.7 * rounded
    # runs of rows give the same values as one piece
    pieces = torch.cat([v for _, _, v in gptq_rows(w, gram64, 4, 32, chunk=96 * 7)])
    assert torch.equal(pieces, q)
