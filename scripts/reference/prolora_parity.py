"""The first 20 optimizer steps of PRoLoRA in PyTorch: the golden for tests/parity.rs.

PRoLoRA's forward is the authors' (docs/methods.md §2): A and B are expanded from the compact A0, B0,
Au, Bu by rolled chunks and truncation, then Δ = α/r · (x Aᵀ) Bᵀ; autograd through the expansion
sums each shared gradient over its rotated copies. The expansion below is checked bit for bit
against the authors' own `de_reduce` output in tests/fixtures/prolora-expansion before use.
Everything else is as trainer_parity.py: same base, data, batches (file order, batch 4,
drop_last=False), dropout off, torch.optim.AdamW + clip_grad_norm_ + linear warm-up. The start
is tests/fixtures/parity-prolora/init (written by `prolora train` with lr 0: the untrained init).

    .venv-ref/bin/python scripts/reference/prolora_parity.py
"""
import glob
import json
import math
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaForCausalLM, LlamaTokenizerFast, get_linear_schedule_with_warmup

sys.path.insert(0, os.path.dirname(__file__))
from make_goldens import encode_with_messages_format  # noqa: E402

FIX = "tests/fixtures/peft-lora"
INIT = "tests/fixtures/parity-prolora/init"
OUT = "tests/fixtures/parity-prolora"
EXPANSION = os.environ.get("PROLORA_EXPANSION", "tests/fixtures/prolora-expansion")
STEPS, BATCH, MAX_LEN = 20, 4, 64
LR, WARMUP_RATIO, MAX_NORM = 5e-3, 0.1, 0.3


def expand(A0, B0, Au, Bu, r, u, m, n, h, o):
    """A (r × h) and B (o × r) from the compact tensors, docs/methods.md §2."""
    rs = r - u
    sa, sb = max(rs // m, 1), max(rs // n, 1)
    a_sh = torch.cat([torch.roll(A0, shifts=-j * sa, dims=0) for j in range(m)], dim=1)[:, :h]
    b_sh = torch.cat([torch.roll(B0, shifts=-i * sb, dims=1) for i in range(n)], dim=0)[:o, :]
    return torch.cat([a_sh, Au], dim=0), torch.cat([b_sh, Bu.t()], dim=1)


def check_expansion():
    checked = 0
    for path in sorted(glob.glob(os.path.join(EXPANSION, "*.safetensors"))):
        f = safe_open(path, "pt")
        c = json.loads(f.metadata()["prolora"])
        if c["r"] == c["u"] or c["u"] == 0:
            continue  # empty parts: the plain cases, covered by the Rust tests
        t = {k: f.get_tensor(k) for k in f.keys()}
        A, B = expand(t["A0"], t["B0"], t["Au"], t["Bu"], c["r"], c["u"], c["m"], c["n"], c["h"], c["o"])
        assert torch.equal(A, t["A"]) and torch.equal(B, t["B"]), path
        checked += 1
    assert checked >= 2, f"expansion checked on {checked} fixtures (set PROLORA_EXPANSION)"


class ProLinear(torch.nn.Module):
    def __init__(self, base, A0, B0, Au, Bu, cfg):
        super().__init__()
        self.base = base
        self.A0, self.B0 = torch.nn.Parameter(A0), torch.nn.Parameter(B0)
        self.Au, self.Bu = torch.nn.Parameter(Au), torch.nn.Parameter(Bu)
        self.cfg = cfg

    def forward(self, x):
        c = self.cfg
        A, B = expand(self.A0, self.B0, self.Au, self.Bu, c["r"], c["unshared_r"], c["sharing_rate_a"],
                      c["sharing_rate_b"], self.base.in_features, self.base.out_features)
        return self.base(x) + (c["lora_alpha"] / c["r"]) * ((x @ A.t()) @ B.t())


def main():
    check_expansion()
    torch.manual_seed(0)
    cfg = json.load(open(os.path.join(INIT, "adapter_config.json")))
    init = safe_open(os.path.join(INIT, "adapter_model.safetensors"), "pt")
    tok = LlamaTokenizerFast(tokenizer_file=os.path.join(FIX, "base/tokenizer.json"))
    examples = [json.loads(line) for line in open(os.path.join(FIX, "data.jsonl")) if line.strip()]
    encoded = [encode_with_messages_format(e, tok, MAX_LEN) for e in examples]

    model = LlamaForCausalLM.from_pretrained(os.path.join(FIX, "base"), dtype=torch.float32)
    model.requires_grad_(False)
    modules = {}
    for l, layer in enumerate(model.model.layers):
        for group, names in [("self_attn", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                             ("mlp", ["gate_proj", "up_proj", "down_proj"])]:
            parent = getattr(layer, group)
            for name in names:
                key = f"base_model.model.model.layers.{l}.{group}.{name}"
                t = {s: init.get_tensor(f"{key}.{s}").clone() for s in
                     ["lora_A.weight", "lora_B.weight", "lora_A_vec", "lora_B_vec"]}
                mod = ProLinear(getattr(parent, name), t["lora_A.weight"], t["lora_B.weight"],
                                t["lora_A_vec"], t["lora_B_vec"], cfg)
                setattr(parent, name, mod)
                modules[key] = mod
    model.eval()
    params = [p for m in modules.values() for p in (m.A0, m.B0, m.Au, m.Bu)]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(WARMUP_RATIO * STEPS), STEPS)
    order = [encoded[i:i + BATCH] for i in range(0, len(encoded), BATCH)]
    losses, lrs, norms = [], [], []
    for step in range(STEPS):
        batch = order[step % len(order)]
        length = max(len(e["input_ids"]) for e in batch)
        ids = torch.zeros((len(batch), length), dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        for r, e in enumerate(batch):
            ids[r, :len(e["input_ids"])] = e["input_ids"]
            labels[r, :len(e["labels"])] = e["labels"]
        lrs.append(opt.param_groups[0]["lr"])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        # The total norm before clipping, as `prolora train` logs it (`grad_norm`).
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, MAX_NORM)))
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    final = {}
    for key, m in modules.items():
        final[f"{key}.lora_A.weight"] = m.A0.detach().contiguous()
        final[f"{key}.lora_B.weight"] = m.B0.detach().contiguous()
        final[f"{key}.lora_A_vec"] = m.Au.detach().contiguous()
        final[f"{key}.lora_B_vec"] = m.Bu.detach().contiguous()
    save_file(final, os.path.join(OUT, "final_adapter.safetensors"))
    json.dump({"steps": STEPS, "batch_size": BATCH, "max_seq_len": MAX_LEN, "lr": LR,
               "warmup_ratio": WARMUP_RATIO, "max_grad_norm": MAX_NORM, "losses": losses,
               "lrs": lrs, "grad_norms": norms},
              open(os.path.join(OUT, "expected.json"), "w"), indent=1)
    print("losses", [round(x, 5) for x in losses])


if __name__ == "__main__":
    main()
