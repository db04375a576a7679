"""Writes the small chat datasets in data/ (our own, for the demo and the tests).

Deterministic: python3 scripts/make_sample_data.py
"""
import json
import random

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Germany", "Berlin"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Chile", "Santiago"),
    ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Austria", "Vienna"),
]
WORDS = ["apple", "river", "garden", "planet", "window", "silver", "market", "thunder",
         "pencil", "orange", "bridge", "candle", "forest", "rocket", "winter", "island"]
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black",
          "a banana": "yellow", "a tomato": "red", "an orange": "orange", "chocolate": "brown"}


def user_assistant(user, assistant, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def example(rng):
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randrange(2, 50), rng.randrange(2, 50)
        return user_assistant(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")
    if kind == 1:
        country, city = rng.choice(CAPITALS)
        return user_assistant(f"What is the capital of {country}?", f"The capital of {country} is {city}.")
    if kind == 2:
        w = rng.choice(WORDS)
        return user_assistant(f"Spell the word \"{w}\" backwards.", f"\"{w}\" backwards is \"{w[::-1]}\".")
    if kind == 3:
        thing, color = rng.choice(sorted(COLORS.items()))
        return user_assistant(f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is usually {color}.",
                              system="You are a concise assistant.")
    if kind == 4:
        n = rng.randrange(2, 9)
        w = rng.choice(WORDS)
        return user_assistant(f"Write the word {w} {n} times, separated by commas.", ", ".join([w] * n) + ".")
    a, b = rng.randrange(2, 12), rng.randrange(2, 12)
    return {"messages": [
        {"role": "user", "content": f"What is {a} times {b}?"},
        {"role": "assistant", "content": f"{a} times {b} is {a * b}."},
        {"role": "user", "content": "And twice that?"},
        {"role": "assistant", "content": f"Twice that is {2 * a * b}."},
    ]}


def write(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(example(rng), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write("data/sample_chat.jsonl", 400, seed=1)
    write("data/sample_chat_eval.jsonl", 40, seed=2)
