#!/usr/bin/env python3
"""Goldens for the data pipeline, made by the reference implementations. Run from the repo root:

    /tmp/refenv/bin/python scripts/reference/make_data_goldens.py [sampler] [chat] [prepare]

sampler  tests/fixtures/length-grouped/cases.json: transformers' LengthGroupedSampler with
         generator=torch.Generator().manual_seed(seed), iterated for two epochs (the generator
         carries on), plus the torch.randperm draws it made.
chat     tests/fixtures/chat-encoding/more_cases.jsonl: open-instruct's encode_with_messages_format
         (imported from make_goldens.py) on seeded random conversations.
prepare  tests/fixtures/prepare/*.jsonl: open-instruct's reformatting functions (see
         open_instruct_reformat.py) run on the sample raw files in data/raw/.

Deterministic: fixed seeds; two runs give identical files.
"""

import json
import os
import random
import sys

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = "tests/fixtures"


def dump_compact(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")


def make_sampler():
    cases = []
    specs = [
        # name, n, batch_size, seed, length range
        ("tiny_fewer_than_4_batches", 10, 4, 0, (1, 6)),
        ("ties_many_equal_lengths", 64, 4, 42, (1, 4)),
        ("uneven_last_megabatch", 203, 8, 1, (5, 512)),
        ("mult_capped_at_50", 1000, 2, 7, (1, 2048)),
        ("seed_above_2_32", 150, 16, 2**33 + 5, (3, 300)),
        ("grad_accum_group_64", 777, 64, 3, (10, 512)),
    ]
    for name, n, bs, seed, (lo, hi) in specs:
        rng = random.Random(1000 + n)
        lengths = [rng.randint(lo, hi) for _ in range(n)]
        g = torch.Generator().manual_seed(seed)
        sampler = LengthGroupedSampler(bs, lengths=lengths, generator=g)
        # Replay the permutations separately (same seed, same draws) for debugging.
        g2 = torch.Generator().manual_seed(seed)
        perms = [torch.randperm(n, generator=g2).tolist() for _ in range(2)]
        epochs = [list(sampler) for _ in range(2)]
        cases.append(
            {"name": name, "batch_size": bs, "seed": seed, "lengths": lengths, "randperm": perms, "epochs": epochs}
        )
    dump_compact(
        {"transformers": __import__("transformers").__version__, "torch": torch.__version__, "cases": cases},
        f"{FIXTURES}/length-grouped/cases.json",
    )


def main():
    what = sys.argv[1:] or ["sampler", "chat", "prepare"]
    for w in what:
        {"sampler": make_sampler}[w]()
        print(f"wrote {w}")


if __name__ == "__main__":
    main()
