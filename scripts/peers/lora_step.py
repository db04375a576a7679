"""The PyTorch + PEFT (+ bitsandbytes with --nf4) peer of `prolora train`: LoRA (r 8, alpha 16, dropout 0.1, all seven
linears) on a transformers model dir, AdamW, batches of 4 open-instruct-encoded chat examples.
Prints one JSON line: median step time (s), peak RSS (MiB), label fraction.

    python scripts/peers/lora_step.py MODEL_DIR DATA.jsonl [--steps 12 --seq 128 --batch 4 --checkpointing --nf4]
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM, LlamaTokenizerFast

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "reference"))
from make_goldens import encode_with_messages_format  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--timed-from", type=int, default=2, help="steps before this one are warm-up")
    ap.add_argument("--nf4", action="store_true", help="base in NF4 + double quant (bitsandbytes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # torch counts physical cores; candle every logical one
    torch.manual_seed(0)
    tok = LlamaTokenizerFast(tokenizer_file=os.path.join(args.model, "tokenizer.json"))
    with open(args.data) as f:
        enc = [encode_with_messages_format(json.loads(l), tok, args.seq) for l in f if l.strip()]
    quant = None
    if args.nf4:
        from transformers import BitsAndBytesConfig
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32, quantization_config=quant)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, labelled, total = [], 0, 0
    for step in range(args.steps):
        batch = [enc[(step * args.batch + i) % len(enc)] for i in range(args.batch)]
        n = max(len(e["input_ids"]) for e in batch)
        ids = torch.zeros((args.batch, n), dtype=torch.long)
        labels = torch.full((args.batch, n), -100, dtype=torch.long)
        mask = torch.zeros((args.batch, n), dtype=torch.long)
        for r, e in enumerate(batch):
            ids[r, :len(e["input_ids"])] = e["input_ids"]
            labels[r, :len(e["labels"])] = e["labels"]
            mask[r, :len(e["input_ids"])] = 1
        labelled += int((labels[:, 1:] != -100).sum())
        total += args.batch * (n - 1)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    print(json.dumps({
        "step_s": statistics.median(times[args.timed_from:]),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "label_fraction": labelled / total,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
