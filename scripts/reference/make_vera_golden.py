#!/usr/bin/env python3
"""A VeRA adapter written by stock PEFT, and PEFT's loss with it (golden for our VeRA loader).

Run from the repository root (after make_goldens.py, whose tiny base and encodings it reuses):

    .venv-ref/bin/python scripts/reference/make_vera_golden.py

Writes tests/fixtures/peft-vera/: adapter/ (PEFT `save_pretrained`, save_projection=True, r=8,
all seven projections, vera_dropout 0.1, lambda_d ~ 0.1 + 0.5·N(0,1), lambda_b ~ 0.5·N(0,1)) and
expected.json {loss, loss_base, tokens} over the examples of tests/fixtures/peft-lora/expected.json
(same definition as make_goldens.py: summed token cross-entropy / label tokens, batch 1, eval mode).
"""

import json
import os
import sys

import torch
from peft import PeftModel, VeraConfig, get_peft_model
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from make_goldens import fresh_dir, lm_loss_sum, safetensors_keys  # noqa: E402

BASE = "tests/fixtures/peft-lora/base"
ENCODED = "tests/fixtures/peft-lora/expected.json"
OUT = "tests/fixtures/peft-vera"

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def load_base():
    return LlamaForCausalLM.from_pretrained(BASE, dtype=torch.float32, attn_implementation="eager").eval()


def mean_loss(model, examples):
    total, tokens = 0.0, 0
    for e in examples:
        s, n = lm_loss_sum(model, torch.tensor(e["input_ids"]), torch.tensor(e["labels"]))
        total += s
        tokens += n
    return total / tokens, tokens


def main():
    adapter_dir = os.path.join(OUT, "adapter")
    fresh_dir(OUT)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = VeraConfig(r=8, target_modules=targets, vera_dropout=0.1, save_projection=True,
                        projection_prng_key=4100, task_type="CAUSAL_LM")
    model = get_peft_model(load_base(), config)
    g = torch.Generator().manual_seed(4101)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda_d" in name:
                p.copy_(0.1 + 0.5 * torch.randn(p.shape, generator=g))
            elif "vera_lambda_b" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    model.save_pretrained(adapter_dir)
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT writes a set
    with open(cfg_path, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True))
    readme = os.path.join(adapter_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    keys = safetensors_keys(os.path.join(adapter_dir, "adapter_model.safetensors"))
    print(sorted(keys.items())[:4], len(keys))

    with open(ENCODED) as f:
        examples = json.load(f)["examples"]
    adapted = PeftModel.from_pretrained(load_base(), adapter_dir).eval()
    loss, tokens = mean_loss(adapted, examples)
    loss_base, _ = mean_loss(load_base(), examples)
    assert abs(loss - loss_base) > 1e-3, (loss, loss_base)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({"loss": loss, "loss_base": loss_base, "tokens": tokens}, f, indent=1)
        f.write("\n")
    print(f"peft-vera: loss={loss:.7f} loss_base={loss_base:.7f} tokens={tokens}")


if __name__ == "__main__":
    main()
