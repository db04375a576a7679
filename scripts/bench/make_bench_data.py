"""The bench data under scripts/bench/data/, shared by prolora and the PyTorch peers
(scripts/bench/train_step.py, scripts/bench/step_7b.py) and checked by tests/bench_inputs.rs.
Standard library only; the output is deterministic and committed.

    python scripts/bench/make_bench_data.py          # rewrite the files
    python scripts/bench/make_bench_data.py --check  # exit 1 if a committed file differs

all_labelled.jsonl: a one-token user turn ("Go"), then a long answer that fills max_seq_len
128, so nearly every token carries a label (the worst case for us): 112 of the 127 shifted
positions (0.88) with the LLaMA-2 tokenizer; the 15 masked ones are BOS, "<|user|>\nGo\n" and
the "<|assistant|>\n" tag. An assistant turn cannot come first: the chat template would train
on its tag, and the encoder refuses it. chat.jsonl: a long question and a short answer, where
only the answer is labelled (the paper's case; 0.08).
"""
import argparse
import json
import os
import sys

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()
EXAMPLES = 64


def text(start, n):
    return " ".join(WORDS[(start + k) % len(WORDS)] for k in range(n))


def files():
    all_labelled = [{"messages": [{"role": "user", "content": "Go"},
                                  {"role": "assistant", "content": text(i, 200)}]}
                    for i in range(EXAMPLES)]
    chat = [{"messages": [{"role": "user", "content": text(i, 90)},
                          {"role": "assistant", "content": text(i * 3, 30)}]}
            for i in range(EXAMPLES)]
    return {name: "".join(json.dumps(e) + "\n" for e in rows)
            for name, rows in [("all_labelled.jsonl", all_labelled), ("chat.jsonl", chat)]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    stale = []
    for name, body in files().items():
        path = os.path.join(HERE, name)
        if args.check:
            if not os.path.exists(path) or open(path).read() != body:
                stale.append(path)
        else:
            os.makedirs(HERE, exist_ok=True)
            with open(path, "w") as f:
                f.write(body)
    if stale:
        sys.exit("stale (rerun scripts/bench/make_bench_data.py): " + ", ".join(stale))


if __name__ == "__main__":
    main()
