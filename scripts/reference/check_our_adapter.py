"""Reads an adapter written by `prolora train` with stock PEFT and records PEFT's loss on it.

This is the golden for tests/cli.rs `our_adapter_loads_in_peft_with_the_same_loss`: the input
(tests/fixtures/our-lora/adapter) is ours, the number is PyTorch + PEFT's.

    .venv-ref/bin/python scripts/reference/check_our_adapter.py
"""
import json
import os
import sys

import torch
from peft import PeftModel
from transformers import LlamaForCausalLM, LlamaTokenizerFast

sys.path.insert(0, os.path.dirname(__file__))
from make_goldens import encode_with_messages_format, lm_loss_sum  # noqa: E402

BASE = "tests/fixtures/peft-lora/base"
ADAPTER = "tests/fixtures/our-lora/adapter"
DATA = "tests/fixtures/peft-lora/data.jsonl"
MAX_LEN = 64


def main():
    tok = LlamaTokenizerFast(tokenizer_file=os.path.join(BASE, "tokenizer.json"))
    with open(DATA) as f:
        examples = [json.loads(line) for line in f if line.strip()]
    encoded = [encode_with_messages_format(e, tok, MAX_LEN) for e in examples]
    base = LlamaForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, ADAPTER).eval()
    total, tokens = 0.0, 0
    for e in encoded:
        s, n = lm_loss_sum(model, e["input_ids"], e["labels"])
        total += s
        tokens += n
    with torch.no_grad():
        merged_b = sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
    assert merged_b > 0, "the adapter must be trained (non-zero lora_B)"
    out = {"max_seq_length": MAX_LEN, "loss": total / tokens, "tokens": tokens}
    with open("tests/fixtures/our-lora/expected.json", "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(out)


if __name__ == "__main__":
    main()
