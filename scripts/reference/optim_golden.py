"""PyTorch golden for AdamW + linear warmup schedule + global grad-norm clipping.

Run from the repo root:
    .venv-ref/bin/python scripts/reference/optim_golden.py

Writes tests/fixtures/optim/adamw_golden.json (see scripts/reference/README.md).
Deterministic: CPU, single thread, fixed seeds, fixed gradients.
"""

import json
import os

import torch
from transformers import get_linear_schedule_with_warmup

OUT = os.path.join("tests", "fixtures", "optim", "adamw_golden.json")

BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01
BASE_LR = 0.1
WARMUP = 2
TOTAL = 6
MAX_NORM = 0.5
# Per-step gradient scale: large scales get clipped, small ones do not.
GRAD_SCALES = [3.0, 0.01, 1.0, 0.02, 2.0, 0.05]
SHAPES = {"p0": (3, 4), "p1": (5,)}


def flat(t):
    return t.detach().reshape(-1).tolist()


def main():
    torch.set_num_threads(1)
    assert len(GRAD_SCALES) == TOTAL

    # Parameters: torch.manual_seed(0) + randn, in order p0 then p1.
    torch.manual_seed(0)
    p0 = torch.nn.Parameter(torch.randn(*SHAPES["p0"], dtype=torch.float32))
    p1 = torch.nn.Parameter(torch.randn(*SHAPES["p1"], dtype=torch.float32))
    params = [p0, p1]
    names = ["p0", "p1"]
    init = {n: flat(p) for n, p in zip(names, params)}

    # Fixed gradients, generated up front from a separate seeded generator.
    gen = torch.Generator().manual_seed(1234)
    grads = []
    for k in range(TOTAL):
        step_grads = [
            torch.randn(*SHAPES[n], generator=gen, dtype=torch.float32) * GRAD_SCALES[k]
            for n in names
        ]
        grads.append(step_grads)

    opt = torch.optim.AdamW(
        params, lr=BASE_LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY
    )
    sched = get_linear_schedule_with_warmup(
        opt, num_warmup_steps=WARMUP, num_training_steps=TOTAL
    )

    steps = []
    for k in range(TOTAL):
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads[k]):
            p.grad = g.clone()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=MAX_NORM)
        lr = float(opt.param_groups[0]["lr"])  # the lr this step actually uses
        opt.step()
        steps.append(
            {
                "grads": {n: flat(g) for n, g in zip(names, grads[k])},  # before clipping
                "lr": lr,
                "grad_norm": float(grad_norm.item()),
                "params_after": {n: flat(p) for n, p in zip(names, params)},
            }
        )
        sched.step()

    out = {
        "betas": list(BETAS),
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
        "base_lr": BASE_LR,
        "warmup": WARMUP,
        "total": TOTAL,
        "max_norm": MAX_NORM,
        "init": init,
        "shapes": {n: list(s) for n, s in SHAPES.items()},
        "steps": steps,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")

    for k, s in enumerate(steps):
        clipped = s["grad_norm"] > MAX_NORM
        print(f"step {k}: lr={s['lr']!r} grad_norm={s['grad_norm']!r} clipped={clipped}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
