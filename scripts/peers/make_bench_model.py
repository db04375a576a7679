"""A seeded random LLaMA in transformers' format (OUT_DIR/model), shared by prolora and the
PyTorch peer so both benchmark the very same weights. The data both read is committed under
scripts/bench/data/ (scripts/bench/make_bench_data.py).

    python scripts/peers/make_bench_model.py OUT_DIR [--hidden 256 --layers 4]
"""
import argparse
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


if __name__ == "__main__":
    main()
