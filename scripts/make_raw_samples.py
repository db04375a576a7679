#!/usr/bin/env python3
"""Writes the small raw-format samples in data/raw/ (our own synthetic text, deterministic):
one per format `prolora data prepare` reads. Run from the repository root."""

import json
import os
import random

OUT = "data/raw"
rng = random.Random(20261130)
WORDS = "apple river stone cloud green quick seven paper light north music table bright small".split()


def words(n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def dump_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def superni():
    base = f"{OUT}/superni"
    os.makedirs(f"{base}/tasks", exist_ok=True)
    os.makedirs(f"{base}/splits/xlingual", exist_ok=True)
    # (task, instances, positive examples): 300 > 277 takes Python's set-based sampling path,
    # 100 the pool path, 70 keeps every instance (60 zero-shot + 10 two-shot).
    specs = [
        ("task001_reverse_words", 300, 3),
        ("task002_count_words", 100, 2),
        ("task003_first_word", 70, 4),
        ("task004_mmmlu_leaky", 90, 3),
    ]
    for name, n, pos in specs:
        def instance(i):
            text = words(rng.randint(2, 6))
            if rng.random() < 0.1:
                text = "  " + text + "\n"  # blanks the templates strip
            if i % 17 == 5:
                text = ""  # no input: the reference switches to the templates without input
            return text

        task = {
            "Contributors": ["prolora sample"],
            "Definition": [f"Given some words, {name.split('_', 1)[1].replace('_', ' ')}. "],
            "Positive Examples": [
                {"input": words(3), "output": words(2), "explanation": "sample"} for _ in range(pos)
            ],
            "Negative Examples": [],
            "Instances": [
                {"id": f"{name}-{i:03d}", "input": instance(i), "output": [words(2), words(1)]} for i in range(n)
            ],
        }
        with open(f"{base}/tasks/{name}.json", "w") as f:
            json.dump(task, f, indent=1, ensure_ascii=False)
    with open(f"{base}/splits/xlingual/train_tasks.txt", "w") as f:
        f.write("\n".join(s[0] for s in specs) + "\n")


def inputs_targets(n, tag):
    rows = []
    for i in range(n):
        ending = ["", "\n", ":", "Answer:  ", " ?"][i % 5]
        rows.append({"inputs": f"{tag} question {i}: {words(5)}{ending}", "targets": words(4), "task": tag})
    return rows


def main():
    os.makedirs(OUT, exist_ok=True)
    superni()
    dump_jsonl(f"{OUT}/flan_v2.jsonl", inputs_targets(25, "flan"))
    os.makedirs(f"{OUT}/cot", exist_ok=True)
    dump_jsonl(f"{OUT}/cot/cot_zsopt.jsonl", inputs_targets(12, "cot zero-shot"))
    dump_jsonl(f"{OUT}/cot/cot_fsopt.jsonl", inputs_targets(8, "cot few-shot"))
    for name, n in [("code_alpaca_20k.json", 30), ("alpaca_data.json", 30)]:
        recs = []
        for i in range(n):
            inp = ["", words(3), "  " + words(2) + "  ", "int x = {input};"][i % 4]
            recs.append({"instruction": f"Write {words(3)} {{input}}", "input": inp, "output": f"{words(4)}\n\treturn {i};"})
        with open(f"{OUT}/{name}", "w") as f:
            json.dump(recs, f, indent=1, ensure_ascii=False)
    dump_jsonl(
        f"{OUT}/prompt_completion.jsonl",
        [{"prompt": f"Q{i}: {words(4)}?", "completion": words(3)} for i in range(10)],
    )
    dump_jsonl(
        f"{OUT}/messages.jsonl",
        [
            {"dataset": "sample", "id": f"m{i}", "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": words(4)},
                {"role": "assistant", "content": words(3)},
                {"role": "user", "content": "和 " + words(2)},
                {"role": "assistant", "content": "🙂 " + words(2)},
            ][(i % 2):]}
            for i in range(10)
        ],
    )


if __name__ == "__main__":
    main()
