"""A seeded random LLaMA in transformers' format plus chat data, shared by prolora and the
PyTorch peer so both benchmark the very same weights and tokens.

    python scripts/peers/make_bench_model.py OUT_DIR [--hidden 256 --layers 4 --seq 128]
"""
import argparse
import json
import os
import shutil

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--examples", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(os.path.join(args.out, "model"), safe_serialization=True)
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copy(os.path.join(here, "..", "..", "assets", "llama2-tokenizer.json"),
                os.path.join(args.out, "model", "tokenizer.json"))
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()
    # Assistant-only examples: every token carries a label (the worst case for us), and
    # chat examples where only the answer does (the paper's case).
    with open(os.path.join(args.out, "all_labelled.jsonl"), "w") as f:
        for i in range(args.examples):
            text = " ".join(words[(i + k) % len(words)] for k in range(200))
            f.write(json.dumps({"messages": [{"role": "assistant", "content": text}]}) + "\n")
    with open(os.path.join(args.out, "chat.jsonl"), "w") as f:
        for i in range(args.examples):
            q = " ".join(words[(i + k) % len(words)] for k in range(90))
            a = " ".join(words[(i * 3 + k) % len(words)] for k in range(30))
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")


if __name__ == "__main__":
    main()
