"""Greedy continuations of SmolLM2-135M-Instruct as transformers computes them from its GGUF
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`: every tensor dequantized, tied head),
`generate` with its KV cache, each prompt alone, in float32 and in bfloat16 (the f32 weights
rounded to bf16), eager attention, on the CPU.

Writes tests/fixtures/gguf/smollm2_greedy.json: {"new_tokens", "prompts": [[ids]],
"f32": [[ids]], "bf16": [[ids]]} (generated ids, stopping at EOS).

Usage (from the repository root; the SmolLM2 GGUF is the one the tests fetch):
    python scripts/reference/make_smollm2_greedy_golden.py path/to/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

OUT = Path("tests/fixtures/gguf/smollm2_greedy.json")
PROMPTS = [
    "<|im_start|>user\nWrite a short story about a river and a stone.<|im_end|>\n<|im_start|>assistant\n",
    "The capital of France is",
]
NEW_TOKENS = 24


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(sys.argv[1], Path(d) / "model.gguf")
        tok = AutoTokenizer.from_pretrained(d, gguf_file="model.gguf")
        model = AutoModelForCausalLM.from_pretrained(
            d, gguf_file="model.gguf", dtype=torch.float32, attn_implementation="eager"
        ).eval()
    eos = model.config.eos_token_id
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    out = {"new_tokens": NEW_TOKENS, "prompts": prompts}
    for name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
        model = model.to(dtype)
        generated = []
        for ids in prompts:
            with torch.no_grad():
                full = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                                      do_sample=False, eos_token_id=eos, pad_token_id=eos)
            new = full[0, len(ids):].tolist()
            generated.append(new[:new.index(eos)] if eos in new else new)
        out[name] = generated
    OUT.write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
