"""A 7B-shaped LLaMA-2 checkpoint in bf16 with seeded random weights, in two safetensors shards
like the real one (~6.7 GB each), for measuring the peak memory of loading-and-quantizing.

    python scripts/bench/make_7b_bf16.py OUT_DIR
    /usr/bin/time -v target/release/prolora eval --model OUT_DIR --quantize nf4 \
        --data ONE_EXAMPLE.jsonl --max-seq-len 32     # "Maximum resident set size"
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

D, F, L, V = 4096, 11008, 32, 32000


def layer(i, g):
    p = f"model.layers.{i}"
    shapes = {
        "self_attn.q_proj": (D, D), "self_attn.k_proj": (D, D), "self_attn.v_proj": (D, D),
        "self_attn.o_proj": (D, D), "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D),
        "mlp.down_proj": (D, F),
    }
    out = {f"{p}.{k}.weight": (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    out[f"{p}.input_layernorm.weight"] = torch.ones(D, dtype=torch.bfloat16)
    out[f"{p}.post_attention_layernorm.weight"] = torch.ones(D, dtype=torch.bfloat16)
    return out


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for shard, layers in [(1, range(0, 16)), (2, range(16, 32))]:
        name = f"model-0000{shard}-of-00002.safetensors"
        tensors = {}
        if shard == 1:
            tensors["model.embed_tokens.weight"] = (torch.randn(V, D, generator=g) * 0.02).to(torch.bfloat16)
        for i in layers:
            tensors.update(layer(i, g))
        if shard == 2:
            tensors["model.norm.weight"] = torch.ones(D, dtype=torch.bfloat16)
            tensors["lm_head.weight"] = (torch.randn(V, D, generator=g) * 0.02).to(torch.bfloat16)
        save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D,
                   "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "vocab_size": V, "rms_norm_eps": 1e-5,
                   "rope_theta": 10000.0, "max_position_embeddings": 4096, "torch_dtype": "bfloat16",
                   "tie_word_embeddings": False, "hidden_act": "silu"}, f)
    here = os.path.dirname(os.path.abspath(__file__))
    assets = os.path.join(here, "..", "..", "assets")
    shutil.copy(os.path.join(assets, "llama2-tokenizer.json"), os.path.join(out, "tokenizer.json"))
    # Its special tokens (eos for the chat format), as a Hub LLaMA-2 repository has them.
    shutil.copy(os.path.join(assets, "tokenizer_config.json"), os.path.join(out, "tokenizer_config.json"))


if __name__ == "__main__":
    main()
