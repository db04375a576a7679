#!/usr/bin/env python3
"""Checks that a checkpoint written by `prolora quantize` loads in transformers + bitsandbytes and
gives the logits of bitsandbytes' own quantization of the same model.

    cargo run -- quantize --model tests/fixtures/llama-gqa --out <out-dir>
    python scripts/reference/check_our_nf4.py <out-dir>

Compares with tests/fixtures/bnb-4bit-gqa/golden.safetensors (llama-gqa quantized by
bitsandbytes, make_nf4_model_goldens.py, whose CPU work-arounds this script shares). The two
quantizations are not byte-identical: the offsets (torch.mean vs our f64 mean) differ in the last
bit, and where bitsandbytes' CPU lookup table picks a neighbour of the exact nearest nested code
(one block of llama-gqa) the block scale moves by one 8-bit step; measured max |Δlogit| 1.6e-3.
"""

import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, "scripts/reference")
from make_nf4_model_goldens import load_4bit  # noqa: E402  (also installs the CPU work-arounds)

golden = load_file("tests/fixtures/bnb-4bit-gqa/golden.safetensors")
model = load_4bit(sys.argv[1])
with torch.no_grad():
    logits = model(input_ids=golden["input_ids"]).logits.float()
err = (logits - golden["logits"]).abs().max().item()
print(f"max |Δlogit| vs bitsandbytes' own quantization: {err:.3e}")
assert err < 5e-3, err
