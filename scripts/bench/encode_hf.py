#!/usr/bin/env python3
"""The Python side of the encoding benchmark: open-instruct's encode_with_messages_format with
HF tokenizers (LlamaTokenizerFast), over a messages jsonl, on 1 or N processes; writes the same
{"input_ids", "labels"} jsonl as `prolora data encode` and prints examples/s.

    python scripts/bench/encode_hf.py TOKENIZER_JSON DATA.jsonl MAX_LEN OUT.jsonl PROCS
"""

import json
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
# Imported before the clock starts (torch, transformers); forked workers inherit them.
from make_goldens import encode_with_messages_format  # noqa: E402
from transformers import LlamaTokenizerFast  # noqa: E402

TOK = None


def init(tokenizer_json):
    global TOK
    TOK = LlamaTokenizerFast(tokenizer_file=tokenizer_json)


def encode(args):
    line, max_len = args
    enc = encode_with_messages_format(json.loads(line), TOK, max_len)
    return json.dumps({"input_ids": enc["input_ids"].tolist(), "labels": enc["labels"].tolist()})


def main():
    tokenizer_json, data, max_len, out, procs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    start = time.perf_counter()
    with open(data) as f:
        lines = [(l, max_len) for l in f if l.strip()]
    if procs == 1:
        init(tokenizer_json)
        results = [encode(a) for a in lines]
    else:
        with mp.Pool(procs, initializer=init, initargs=(tokenizer_json,)) as pool:
            results = pool.map(encode, lines, chunksize=256)
    with open(out, "w") as f:
        for r in results:
            f.write(r + "\n")
    elapsed = time.perf_counter() - start
    print(f"python hf-tokenizers procs={procs}: {len(lines)} examples in {elapsed:.2f} s = {len(lines) / elapsed:.0f} examples/s")


if __name__ == "__main__":
    main()
