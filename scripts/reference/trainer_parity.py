"""The first 20 optimizer steps of a LoRA run in PyTorch + PEFT: the golden for
tests/parity.rs, which runs `prolora train` from the same start.

Same initial weights (the PEFT adapter in tests/fixtures/peft-lora/adapter, loaded trainable),
same batches (data.jsonl in file order, 4 examples per step, the last of an epoch short as a
DataLoader with drop_last=False; right padding),
dropout off, torch.optim.AdamW + clip_grad_norm_ + get_linear_schedule_with_warmup; the loss of
a batch is the mean over all its label tokens (transformers' causal-LM loss).

    .venv-ref/bin/python scripts/reference/trainer_parity.py
"""
import json
import math
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import LlamaForCausalLM, LlamaTokenizerFast, get_linear_schedule_with_warmup

sys.path.insert(0, os.path.dirname(__file__))
from make_goldens import encode_with_messages_format  # noqa: E402

FIX = "tests/fixtures/peft-lora"
OUT = "tests/fixtures/parity"
STEPS, BATCH, MAX_LEN = 20, 4, 64
LR, WARMUP_RATIO, MAX_NORM, WEIGHT_DECAY = 5e-3, 0.1, 0.3, 0.0


def main():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    tok = LlamaTokenizerFast(tokenizer_file=os.path.join(FIX, "base/tokenizer.json"))
    with open(os.path.join(FIX, "data.jsonl")) as f:
        examples = [json.loads(line) for line in f if line.strip()]
    encoded = [encode_with_messages_format(e, tok, MAX_LEN) for e in examples]

    base = LlamaForCausalLM.from_pretrained(os.path.join(FIX, "base"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(FIX, "adapter"), is_trainable=True)
    model.eval()  # dropout off; gradients still flow
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    warmup = math.ceil(WARMUP_RATIO * STEPS)
    sched = get_linear_schedule_with_warmup(opt, warmup, STEPS)

    losses, lrs, norms = [], [], []
    # A DataLoader over the file in order, batch 4, drop_last=False, epoch after epoch.
    order = [encoded[i:i + BATCH] for i in range(0, len(encoded), BATCH)]
    for step in range(STEPS):
        batch = order[step % len(order)]
        length = max(len(e["input_ids"]) for e in batch)
        ids = torch.zeros((len(batch), length), dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for r, e in enumerate(batch):
            n = len(e["input_ids"])
            ids[r, :n] = e["input_ids"]
            labels[r, :n] = e["labels"]
            mask[r, :n] = 1
        lrs.append(opt.param_groups[0]["lr"])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, MAX_NORM)))
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss))

    os.makedirs(OUT, exist_ok=True)
    final = {
        name.replace(".default", ""): p.detach().clone().contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    save_file(final, os.path.join(OUT, "final_adapter.safetensors"))
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({"steps": STEPS, "batch_size": BATCH, "max_seq_len": MAX_LEN, "lr": LR,
                   "warmup_ratio": WARMUP_RATIO, "max_grad_norm": MAX_NORM,
                   "losses": losses, "lrs": lrs, "grad_norms": norms}, f, indent=1)
        f.write("\n")
    print("losses", [round(x, 5) for x in losses])


if __name__ == "__main__":
    main()
