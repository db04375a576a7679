"""Golden for the KV-cache generation engine: transformers' greedy `generate` (with its own
KV cache) on the peft-lora fixture (tiny f16 base loaded in f32 + PEFT LoRA adapter), for a
batch of prompts of different lengths, each run alone (no padding).

    .venv-ref/bin/python scripts/reference/make_generate_golden.py
writes tests/fixtures/peft-lora/generate.json: {"prompts": [[ids]], "generated": [[ids]]}.
"""
import json
import os

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURE = os.path.join(ROOT, "tests/fixtures/peft-lora")
PROMPTS = [
    "<|user|>\nWhat is the capital of France?\n<|assistant|>\n",
    "<|user|>\nPick a number.\n<|assistant|>\n",
    "Once upon a time",
]
NEW_TOKENS = 40


def main():
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(os.path.join(FIXTURE, "base"))
    base = AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURE, "base"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(FIXTURE, "adapter")).eval()
    prompts, generated = [], []
    for text in PROMPTS:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, eos_token_id=2, pad_token_id=0)
        prompts.append(ids[0].tolist())
        generated.append(out[0, ids.shape[1]:].tolist())
    with open(os.path.join(FIXTURE, "generate.json"), "w") as f:
        json.dump({"new_tokens": NEW_TOKENS, "prompts": prompts, "generated": generated}, f)
        f.write("\n")
    print({"prompt_lengths": [len(p) for p in prompts], "generated": [len(g) for g in generated]})


if __name__ == "__main__":
    main()
