"""Logits of a GGUF model as transformers' GGUF loader computes them
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`: dequantized, Q/K permutation undone),
in float32 with eager attention on the CPU.

Writes tests/fixtures/gguf/smollm2_logits.json: for each prompt, its token ids (transformers'
tokenizer from the same GGUF), the argmax at every position, and at the last position the top 50
(ids, logits), the logits of 200 fixed ids (seeded) and the log-sum-exp of all 49152.

Usage (from the repository root; the SmolLM2 GGUF is the one the tests fetch):
    python scripts/reference/make_gguf_model_goldens.py path/to/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

OUT = Path("tests/fixtures/gguf/smollm2_logits.json")
PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nTranslate to German: good morning<|im_end|>\n<|im_start|>assistant\n",
]


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(sys.argv[1], Path(d) / "model.gguf")
        tok = AutoTokenizer.from_pretrained(d, gguf_file="model.gguf")
        model = AutoModelForCausalLM.from_pretrained(
            d, gguf_file="model.gguf", dtype=torch.float32, attn_implementation="eager"
        ).eval()
    vocab = model.config.vocab_size
    probe = np.random.default_rng(0).choice(vocab, size=200, replace=False).tolist()
    cases = []
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        last = logits[-1]
        top = torch.topk(last, 50)
        cases.append(
            {
                "prompt": prompt,
                "ids": ids,
                "argmax": logits.argmax(-1).tolist(),
                "top_ids": top.indices.tolist(),
                "top_logits": top.values.tolist(),
                "probe_ids": probe,
                "probe_logits": last[probe].tolist(),
                "logsumexp": torch.logsumexp(last, 0).item(),
            }
        )
    OUT.write_text(json.dumps({"vocab_size": vocab, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
