#!/usr/bin/env python3
"""Generate the reference ("golden") test fixtures of prolora with PyTorch + transformers + PEFT.

Run from the repository root:

    python scripts/reference/make_goldens.py

Writes (after deleting them first, so stale files never survive):

    tests/fixtures/llama-gqa/    sharded f32 LlamaForCausalLM (GQA, rope theta 50000, new config layout)
                                 + golden.safetensors {input_ids (2,12) i64, logits (2,12,256) f32}
    tests/fixtures/llama-tied/   single-file bf16 LlamaForCausalLM with tied embeddings (no lm_head.weight),
                                 config.json rewritten in the old LLaMA-2 Hub layout (top-level rope_theta)
                                 + golden.safetensors {input_ids (1,10) i64, logits (1,10,256) f32}
    tests/fixtures/peft-lora/    base/ (f16, vocab 32000, + tokenizer.json), adapter/ (PEFT LoRA),
                                 data.jsonl (6 chat examples), expected.json (encodings + losses)

Deterministic: fixed seeds, single CPU thread; running it twice gives byte-identical files
(with the same package versions, see requirements.txt).
"""

import json
import math
import os
import shutil
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import transformers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

import peft
from peft import LoraConfig, PeftModel, get_peft_model

FIXTURES = "tests/fixtures"
TOKENIZER_JSON = "assets/llama2-tokenizer.json"
CHAT_CASES = "tests/fixtures/chat-encoding/cases.jsonl"

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def fresh_dir(path):
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)


def randomize_(model, seed, std=0.1, norm_std=0.1):
    """Overwrite every parameter: N(0, std) for linears/embeddings, 1 + norm_std*N(0,1) for RMSNorm weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, model.norm
                p.copy_(1.0 + norm_std * r)
            else:
                p.copy_(std * r)


def safetensors_keys(path):
    with safe_open(path, framework="pt") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}


def build(config_kwargs, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(**config_kwargs)
    model = LlamaForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed + 1)
    return model.eval()


# --------------------------------------------------------------------------------------------
# (a) llama-gqa
# --------------------------------------------------------------------------------------------
def make_llama_gqa():
    out = os.path.join(FIXTURES, "llama-gqa")
    fresh_dir(out)
    model = build(
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
            max_position_embeddings=128,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        ),
        seed=1000,
    )
    model.save_pretrained(out, safe_serialization=True, max_shard_size="100KB")
    index = os.path.join(out, "model.safetensors.index.json")
    assert os.path.exists(index), "llama-gqa was expected to be sharded"
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) >= 3, shards
    assert not os.path.exists(os.path.join(out, "model.safetensors"))

    g = torch.Generator().manual_seed(1001)
    input_ids = torch.randint(0, 256, (2, 12), generator=g, dtype=torch.int64)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float().contiguous()
        # round-trip check: the saved shards reproduce the logits bit for bit
        reloaded = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
        assert reloaded.config.rope_parameters["rope_theta"] == 50000.0
        assert torch.equal(reloaded(input_ids=input_ids).logits, logits)
    assert logits.shape == (2, 12, 256)
    save_file({"input_ids": input_ids, "logits": logits}, os.path.join(out, "golden.safetensors"))
    print(f"llama-gqa: shards={shards} logits std={logits.std().item():.4f}")


# --------------------------------------------------------------------------------------------
# (b) llama-tied
# --------------------------------------------------------------------------------------------
def make_llama_tied():
    out = os.path.join(FIXTURES, "llama-tied")
    fresh_dir(out)
    rope_theta = 25000.0
    rms_norm_eps = 1e-6
    cfg = dict(
        vocab_size=256,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        max_position_embeddings=128,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
    )
    model = build(cfg, seed=2000)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)  # default shard size: one file
    st = os.path.join(out, "model.safetensors")
    assert os.path.exists(st) and not os.path.exists(st + ".index.json")
    keys = safetensors_keys(st)
    assert "lm_head.weight" not in keys, sorted(keys)
    assert all(dt == "BF16" for dt, _ in keys.values()), keys

    # Rewrite config.json in the old meta-llama/Llama-2-7b-hf layout.
    old = {
        "_name_or_path": "meta-llama/Llama-2-7b-hf",
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": cfg["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": cfg["intermediate_size"],
        "max_position_embeddings": cfg["max_position_embeddings"],
        "model_type": "llama",
        "num_attention_heads": cfg["num_attention_heads"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": rope_theta,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.31.0.dev0",
        "use_cache": True,
        "vocab_size": cfg["vocab_size"],
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(old, f, indent=2)
        f.write("\n")

    g = torch.Generator().manual_seed(2001)
    input_ids = torch.randint(0, 256, (1, 10), generator=g, dtype=torch.int64)
    # bf16 weights upcast to f32, run in f32 (loaded back through the old-layout config)
    f32 = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert f32.config.rope_parameters["rope_theta"] == rope_theta, f32.config.rope_parameters
    assert f32.config.rms_norm_eps == rms_norm_eps
    assert f32.lm_head.weight.data_ptr() == f32.model.embed_tokens.weight.data_ptr()
    assert f32.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(f32.model.embed_tokens.weight, model.model.embed_tokens.weight.float())
        logits = f32(input_ids=input_ids).logits.float().contiguous()
    assert logits.shape == (1, 10, 256)
    save_file({"input_ids": input_ids, "logits": logits}, os.path.join(out, "golden.safetensors"))
    print(f"llama-tied: keys={len(keys)} logits std={logits.std().item():.4f}")


# --------------------------------------------------------------------------------------------
# (c) peft-lora
# --------------------------------------------------------------------------------------------
def encode_with_messages_format(example, tokenizer, max_seq_length):
    """open-instruct (2023) finetune.py, unchanged."""
    messages = example['messages']
    def _concat_messages(messages):
        message_text = ""
        for message in messages:
            if message["role"] == "system":
                message_text += "<|system|>\n" + message["content"].strip() + "\n"
            elif message["role"] == "user":
                message_text += "<|user|>\n" + message["content"].strip() + "\n"
            elif message["role"] == "assistant":
                message_text += "<|assistant|>\n" + message["content"].strip() + tokenizer.eos_token + "\n"
            else:
                raise ValueError("Invalid role: {}".format(message["role"]))
        return message_text
    example_text = _concat_messages(messages).strip()
    tokenized_example = tokenizer(example_text, return_tensors='pt', max_length=max_seq_length, truncation=True)
    input_ids = tokenized_example.input_ids
    labels = input_ids.clone()
    for message_idx, message in enumerate(messages):
        if message["role"] != "assistant":
            if message_idx == 0:
                message_start_idx = 0
            else:
                message_start_idx = tokenizer(_concat_messages(messages[:message_idx]), return_tensors='pt', max_length=max_seq_length, truncation=True).input_ids.shape[1]
            if message_idx < len(messages) - 1 and messages[message_idx+1]["role"] == "assistant":
                messages_so_far = _concat_messages(messages[:message_idx+1]) + "<|assistant|>\n"
            else:
                messages_so_far = _concat_messages(messages[:message_idx+1])
            message_end_idx = tokenizer(messages_so_far, return_tensors='pt', max_length=max_seq_length, truncation=True).input_ids.shape[1]
            labels[:, message_start_idx:message_end_idx] = -100
            if message_end_idx >= max_seq_length:
                break
    return {'input_ids': input_ids.flatten(), 'labels': labels.flatten()}


DATA = [
    {"messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]},
    {"messages": [
        {"role": "user", "content": "Pick a number from 1 to 10."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Now double it."},
        {"role": "assistant", "content": "14."},
    ]},
    {"messages": [
        {"role": "system", "content": "You are a terse assistant. Answer in one word."},
        {"role": "user", "content": "Is water wet?"},
        {"role": "assistant", "content": "Yes."},
    ]},
    {"messages": [
        {"role": "user", "content": "Translate « bonjour » into Japanese and add an emoji."},
        {"role": "assistant", "content": "こんにちは 👋 — naïve café style: «Grüße»!"},
    ]},
    {"messages": [
        {"role": "user", "content": "Explain briefly why the sky is blue."},
        {"role": "assistant", "content": "Sunlight is scattered by the molecules of the atmosphere, and "
         "shorter wavelengths such as blue are scattered much more strongly than longer ones such as red. "
         "This is called Rayleigh scattering, and it is why we see a blue sky during the day while "
         "sunsets look orange and red."},
    ]},
    {"messages": [
        {"role": "user", "content": "  Write a haiku about autumn leaves.  "},
        {"role": "assistant", "content": "Red leaves drift and fall\nwhispering to the cold ground\nsummer says goodbye"},
    ]},
]


def verify_encoder(tokenizer):
    n = 0
    with open(CHAT_CASES) as f:
        for line in f:
            case = json.loads(line)
            enc = encode_with_messages_format(case, tokenizer, case["max_seq_length"])
            assert enc["input_ids"].tolist() == case["input_ids"], f"input_ids mismatch in case {case['name']}"
            assert enc["labels"].tolist() == case["labels"], f"labels mismatch in case {case['name']}"
            n += 1
    assert n >= 12, n
    print(f"encoder verified on {n} chat-encoding cases")


def lm_loss_sum(model, input_ids, labels):
    """Sum (float64) of the token cross-entropies at label positions, HF shift; and the token count."""
    with torch.no_grad():
        logits = model(input_ids=input_ids.unsqueeze(0)).logits[0].float()  # (T, V), f32
    shift_logits = logits[:-1].double()
    shift_labels = labels[1:]
    mask = shift_labels != -100
    if mask.sum() == 0:
        return 0.0, 0
    ce = F.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="none")
    return ce.sum().item(), int(mask.sum().item())


def make_peft_lora():
    root = os.path.join(FIXTURES, "peft-lora")
    base_dir = os.path.join(root, "base")
    adapter_dir = os.path.join(root, "adapter")
    fresh_dir(root)
    os.makedirs(base_dir)
    max_seq_length = 64

    # --- base: LLaMA-2 vocabulary, tiny body, f16 on disk
    base = build(
        dict(
            vocab_size=32000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        ),
        seed=3000,
    )
    base = base.to(torch.float16)
    base.save_pretrained(base_dir, safe_serialization=True)
    st = os.path.join(base_dir, "model.safetensors")
    assert os.path.exists(st) and not os.path.exists(st + ".index.json")
    keys = safetensors_keys(st)
    assert "lm_head.weight" in keys and all(dt == "F16" for dt, _ in keys.values())
    shutil.copyfile(TOKENIZER_JSON, os.path.join(base_dir, "tokenizer.json"))
    del base

    def load_base():
        return LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")

    # --- adapter: PEFT's own init for lora_A, random lora_B, saved by PEFT
    torch.manual_seed(3100)
    lora_config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
        bias="none",
    )
    peft_model = get_peft_model(load_base(), lora_config)
    g = torch.Generator().manual_seed(3101)
    n_b = 0
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float32))
                n_b += 1
    assert n_b == 2 * 7, n_b
    peft_model.save_pretrained(adapter_dir)
    # PEFT stores target_modules as a set, so its JSON order depends on PYTHONHASHSEED: sort it
    # (re-written exactly as PEFT writes the file: indent=2, sort_keys=True, no trailing newline).
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(cfg_path) as f:
        adapter_cfg = json.load(f)
    adapter_cfg["target_modules"] = sorted(adapter_cfg["target_modules"])
    with open(cfg_path, "w") as f:
        f.write(json.dumps(adapter_cfg, indent=2, sort_keys=True))
    # PEFT's boilerplate model card is not needed by anything
    readme = os.path.join(adapter_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    adapter_keys = safetensors_keys(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert len(adapter_keys) == 2 * 7 * 2, sorted(adapter_keys)
    del peft_model

    # --- data + encodings
    tokenizer = LlamaTokenizerFast(tokenizer_file=TOKENIZER_JSON)
    assert tokenizer.eos_token == "</s>" and tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    verify_encoder(tokenizer)
    with open(os.path.join(root, "data.jsonl"), "w", encoding="utf-8") as f:
        for ex in DATA:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    encoded = [encode_with_messages_format(ex, tokenizer, max_seq_length) for ex in DATA]
    # exactly one example (the long one, index 4) is truncated; all others end with EOS
    assert [len(e["input_ids"]) == max_seq_length for e in encoded] == [i == 4 for i in range(len(DATA))]
    assert all(e["input_ids"][-1] == 2 for i, e in enumerate(encoded) if i != 4)
    for e in encoded:
        assert (e["labels"][1:] != -100).sum() > 0, "example without label tokens"
        assert e["labels"][0] == -100

    # --- losses: with adapter (PeftModel.from_pretrained, eval) and the bare base
    adapted = PeftModel.from_pretrained(load_base(), adapter_dir).eval()
    bare = load_base().eval()
    total = total_base = 0.0
    tokens = 0
    per_example = []
    for e in encoded:
        s, n = lm_loss_sum(adapted, e["input_ids"], e["labels"])
        sb, nb = lm_loss_sum(bare, e["input_ids"], e["labels"])
        assert n == nb
        total += s
        total_base += sb
        tokens += n
        per_example.append({"tokens": n, "loss_sum": s, "loss_sum_base": sb})
    loss, loss_base = total / tokens, total_base / tokens
    assert math.isfinite(loss) and abs(loss - loss_base) > 1e-3, (loss, loss_base)

    expected = {
        "max_seq_length": max_seq_length,
        "loss": loss,
        "loss_base": loss_base,
        "tokens": tokens,
        "examples": [{"input_ids": e["input_ids"].tolist(), "labels": e["labels"].tolist()} for e in encoded],
        "per_example": per_example,
    }
    with open(os.path.join(root, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    print(f"peft-lora: loss={loss:.6f} loss_base={loss_base:.6f} tokens={tokens} "
          f"lengths={[len(e['input_ids']) for e in encoded]}")


def main():
    if not os.path.isdir(FIXTURES) or not os.path.isdir("scripts/reference"):
        sys.exit("run from the repository root: python scripts/reference/make_goldens.py")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    make_llama_gqa()
    make_llama_tied()
    make_peft_lora()


if __name__ == "__main__":
    main()
