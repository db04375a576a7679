#!/usr/bin/env python3
"""Goldens for the data pipeline, made by the reference implementations. Run from the repo root:

    .venv-ref/bin/python scripts/reference/make_data_goldens.py [sampler] [chat] [prepare]

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


def random_conversation(rng):
    """A conversation in the shapes users send: optional system, turns in any order the
    template accepts, empty/blank/unicode/code contents, literal special tokens."""
    pieces = [
        "What is 2 + 2?", "Four.", "  padded with blanks  \n", "", "   ", "línea\ncon\tTab", "東京は日本の首都です。",
        "emoji 🙂👍🏽", "def f(x):\n    return x * 2\n", "a</s>b", "<s> literal", "x" * 40,
        "The quick brown fox jumps over the lazy dog. " * 3, "\u00a0nbsp\u2003em", "<|user|> tag in text",
    ]
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(pieces)})
    for _ in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": rng.choice(pieces)})
        if rng.random() < 0.15:
            messages.append({"role": "user", "content": rng.choice(pieces)})
        messages.append({"role": "assistant", "content": rng.choice(pieces)})
    if rng.random() < 0.2:
        messages.append({"role": "user", "content": rng.choice(pieces)})
    return messages


def make_chat():
    sys.path.insert(0, HERE)
    from make_goldens import TOKENIZER_JSON, encode_with_messages_format, verify_encoder
    from transformers import LlamaTokenizerFast

    tokenizer = LlamaTokenizerFast(tokenizer_file=TOKENIZER_JSON)
    verify_encoder(tokenizer)
    rng = random.Random(5)
    path = f"{FIXTURES}/chat-encoding/more_cases.jsonl"
    with open(path, "w") as f:
        for i in range(120):
            messages = random_conversation(rng)
            max_len = rng.choice([8, 16, 24, 32, 48, 64, 96, 512])
            enc = encode_with_messages_format({"messages": messages}, tokenizer, max_len)
            case = {"name": f"random_{i:03d}", "messages": messages, "max_seq_length": max_len,
                    "input_ids": enc["input_ids"].tolist(), "labels": enc["labels"].tolist()}
            f.write(json.dumps(case, ensure_ascii=False) + "\n")


# (format, reference function, its arguments on data/raw/, the file it writes)
PREPARE = [
    ("superni", "convert_super_ni_data", {"data_dir": "data/raw/superni"}, "super_ni_data.jsonl"),
    ("flan_v2", "convert_flan_v2_data", {"data_dir": "data/raw", "data_file": "flan_v2.jsonl"}, "flan_v2_data.jsonl"),
    ("cot", "convert_cot_data", {"data_dir": "data/raw/cot"}, "cot_data.jsonl"),
    ("code_alpaca", "convert_code_alpaca_data", {"data_dir": "data/raw"}, "code_alpaca_data.jsonl"),
    ("alpaca", "convert_stanford_alpaca_data", {"data_dir": "data/raw"}, "stanford_alpaca_data.jsonl"),
]
PREPARE_SEEDS = [42, 7]


def make_prepare():
    """Needs open-instruct: OPEN_INSTRUCT=<checkout root> (open_instruct/reformat_datasets.py)."""
    import shutil
    import tempfile

    sys.path.insert(0, os.environ["OPEN_INSTRUCT"])
    from open_instruct import reformat_datasets as ref

    out_dir = f"{FIXTURES}/prepare"
    os.makedirs(out_dir, exist_ok=True)
    for fmt, func, kwargs, written in PREPARE:
        # Flan V2 and CoT draw nothing at this size: one seed is enough.
        for seed in PREPARE_SEEDS if fmt in ("superni", "code_alpaca", "alpaca") else PREPARE_SEEDS[:1]:
            tmp = tempfile.mkdtemp()
            random.seed(seed)  # as `reformat_datasets.py --dataset … --seed SEED` does
            getattr(ref, func)(output_dir=tmp, **kwargs)
            shutil.copy(os.path.join(tmp, written), f"{out_dir}/{fmt}_seed{seed}.jsonl")
            shutil.rmtree(tmp)


def main():
    what = sys.argv[1:] or ["sampler", "chat", "prepare"]
    for w in what:
        {"sampler": make_sampler, "chat": make_chat, "prepare": make_prepare}[w]()
        print(f"wrote {w}")


if __name__ == "__main__":
    main()
