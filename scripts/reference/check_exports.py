#!/usr/bin/env python3
"""Stock PEFT and transformers on what `prolora export` and `prolora merge` write.

For each adapter in tests/fixtures/our-exports/{prolora,vera,tied-lora} (written by
`prolora train` on the tests/fixtures/peft-lora base, a few steps at a high lr so every tensor
is non-trivial), this runs our binary to

  * export it as a plain PEFT LoRA (`prolora export --format peft-lora`) into
    tests/fixtures/our-exports/{kind}/peft-lora/ (committed), and
  * merge it into the base (`prolora merge`) in a temporary directory,

then records PyTorch's numbers in tests/fixtures/our-exports/expected.json:

  * `export_loss`: the loss with the export loaded by `PeftModel.from_pretrained`;
  * `merged_loss`: the loss of the merged checkpoint loaded by `LlamaForCausalLM.from_pretrained`;
  * `peft_native_loss` (VeRA only): the loss with our VeRA file itself read by stock PEFT;
  * `merged_max_logit_diff`: max |logits(merged) − logits(base + export)| (f16 storage of the
    merged weights is the only difference), and the merged files' dtype.

The loss is the definition of make_goldens.py (summed token CE / label tokens, batch 1).

    cargo build && .venv-ref/bin/python scripts/reference/check_exports.py
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from make_goldens import lm_loss_sum  # noqa: E402

BASE = "tests/fixtures/peft-lora/base"
ENCODED = "tests/fixtures/peft-lora/expected.json"
ROOT = "tests/fixtures/our-exports"
BIN = os.environ.get("PROLORA", "target/debug/prolora")

torch.set_num_threads(1)


def run(*args):
    subprocess.run([BIN, *args], check=True)


def mean_loss(model, examples):
    total, tokens = 0.0, 0
    for e in examples:
        s, n = lm_loss_sum(model, torch.tensor(e["input_ids"]), torch.tensor(e["labels"]))
        total += s
        tokens += n
    return total / tokens


def main():
    with open(ENCODED) as f:
        examples = json.load(f)["examples"]
    ids = torch.tensor(examples[1]["input_ids"]).unsqueeze(0)
    out = {}
    for kind in ["prolora", "vera", "tied-lora"]:
        adapter = os.path.join(ROOT, kind)
        export = os.path.join(adapter, "peft-lora")
        run("export", "--adapter", os.path.join(adapter), "--format", "peft-lora",
            "--model", BASE, "--out", export)
        peft_model = PeftModel.from_pretrained(
            LlamaForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval(), export).eval()
        export_loss = mean_loss(peft_model, examples)
        with tempfile.TemporaryDirectory() as merged:
            run("merge", "--model", BASE, "--adapter", adapter, "--out", merged)
            with safe_open(os.path.join(merged, "model.safetensors"), "pt") as f:
                dtypes = sorted({f.get_slice(k).get_dtype() for k in f.keys()})
            merged_model = LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
            merged_loss = mean_loss(merged_model, examples)
            with torch.no_grad():
                diff = (merged_model(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max().item()
        out[kind] = {"export_loss": export_loss, "merged_loss": merged_loss,
                     "merged_max_logit_diff": diff, "merged_dtypes": dtypes}
        if kind == "vera":  # our VeRA file is PEFT's format: stock PEFT reads it as it is
            native = PeftModel.from_pretrained(
                LlamaForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval(), adapter).eval()
            out[kind]["peft_native_loss"] = mean_loss(native, examples)
        print(kind, out[kind])
    with open(os.path.join(ROOT, "expected.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
