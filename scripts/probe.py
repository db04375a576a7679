"""A careless and hostile user, automated: runs `prolora` on a few hundred bad inputs and
counts how each ended. Not a test (some accepted values are legitimate); a survey to read.

    cargo build && python3 scripts/probe.py [--bin target/debug/prolora] [--show accepted]

Per case: `clear` (non-zero exit, one `error:` line naming the key or file), `unclear`
(non-zero exit, but several lines or the key not named), `accepted` (exit 0: listed for a
human to judge), `panic`, `hang` (60 s) or `signal`. The last three must be zero.
"""
import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# Every key of the run config, with a value a careless user might type.
CONFIG_VALUES = ["-1", "0", "1e12", "nan", "inf", "\"x\"", "[]", "true", "1.5", "18446744073709551615"]
CONFIG_KEYS = [
    "seed", "output_dir", "model.source", "model.revision", "model.dtype", "model.quantize",
    "model.double_quant", "model.tokenizer", "adapter.kind", "adapter.rank", "adapter.alpha",
    "adapter.dropout", "adapter.targets", "adapter.init_from", "data.train", "data.eval",
    "data.eval_size", "data.max_seq_len", "data.order", "data.skip_invalid", "data.cache",
    "optim.lr", "optim.weight_decay", "optim.betas", "optim.eps", "optim.max_grad_norm",
    "optim.warmup_ratio", "train.steps", "train.batch_size", "train.micro_batch_size",
    "train.gradient_checkpointing", "train.save_every", "train.keep_last", "train.on_nonfinite",
    "train.log_every", "train.eval_every", "train.check_memory", "device",
]
PROLORA_KEYS = ["adapter.unshared_rank", "adapter.sharing_rate_a", "adapter.sharing_rate_b",
                "adapter.rotation", "adapter.share_axis"]


def cases(tmp):
    run = os.path.join(tmp, "run")
    base = ["train", "--config", os.path.join(ROOT, "configs/demo.toml"), "--quiet",
            "--set", f"output_dir={run}", "--set", "train.steps=1", "--set", "train.eval_every=0",
            "--overwrite"]
    for key in CONFIG_KEYS:
        for value in CONFIG_VALUES:
            # A directory the run creates goes to the scratch directory, not the checkout.
            written = f"output_dir={os.path.join(tmp, value.strip(chr(34)))}"
            setting = written if key == "output_dir" else f"{key}={value}"
            yield f"config {key}={value}", base + ["--set", setting], key
    prolora = ["train", "--config", os.path.join(ROOT, "configs/demo-prolora.toml"), "--quiet",
               "--set", f"output_dir={run}", "--set", "train.steps=1", "--set", "train.eval_every=0",
               "--overwrite"]
    for key in PROLORA_KEYS:
        for value in CONFIG_VALUES:
            yield f"prolora {key}={value}", prolora + ["--set", f"{key}={value}"], key
    # Flags of the other commands.
    adapter = os.path.join(tmp, "adapter")
    for value in ["-1", "0", "1e9", "x", "18446744073709551615"]:
        yield f"params --rank {value}", ["params", "--model", "tiny", "--method", "lora",
                                                       "--rank", value], "rank"
        yield f"generate --max-new-tokens {value}", ["generate", "--model", "tiny", "--prompt", "hi",
                                                      "--max-new-tokens", value], "max-new-tokens"
        yield f"eval --batch-size {value}", ["eval", "--model", "tiny", "--data",
                                             os.path.join(ROOT, "data/sample_chat_eval.jsonl"), "--batch-size", value], "batch-size"
        yield f"eval --max-seq-len {value}", ["eval", "--model", "tiny", "--data",
                                              os.path.join(ROOT, "data/sample_chat_eval.jsonl"), "--max-seq-len", value], "max-seq-len"
    # Missing and wrong files everywhere a file is read.
    missing = os.path.join(tmp, "no-such")
    garbage = os.path.join(tmp, "garbage")
    with open(garbage, "wb") as f:
        f.write(os.urandom(256))
    for what in [missing, garbage, tmp]:
        yield f"eval --model {what}", ["eval", "--model", what, "--data", os.path.join(ROOT, "data/sample_chat.jsonl")], what
        yield f"eval --adapter {what}", ["eval", "--model", "tiny", "--adapter", what, "--data",
                                         os.path.join(ROOT, "data/sample_chat.jsonl")], what
        yield f"eval --data {what}", ["eval", "--model", "tiny", "--data", what], what
        yield f"train --config {what}", ["train", "--config", what], what
        yield f"export --adapter {what}", ["export", "--adapter", what, "--out", adapter], what
        yield f"collect {what}", ["collect", what], what
        yield f"data inspect {what}", ["data", "inspect", "--data", what], what
        yield f"generate --tokenizer {what}", ["generate", "--model", "tiny", "--tokenizer", what,
                                               "--prompt", "hi"], what


def classify(proc, needle):
    err = proc.stderr
    if "panicked" in err:
        return "panic"
    if proc.returncode < 0:
        return "signal"
    if proc.returncode == 0:
        return "accepted"
    lines = [l for l in err.splitlines() if l.strip()]
    named = needle.split(".")[-1].split("/")[-1] in err
    one = len(lines) >= 1 and lines[-1].startswith("error: ")
    return "clear" if one and named else "unclear"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/debug/prolora"))
    ap.add_argument("--show", action="append", default=[], help="list the cases of a category")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="prolora-probe-")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    counts, seen = collections.Counter(), collections.defaultdict(list)
    try:
        for name, argv, needle in cases(tmp):
            try:
                proc = subprocess.run([args.bin] + argv, cwd=ROOT, env=env, capture_output=True,
                                      text=True, timeout=60)
                kind = classify(proc, needle)
                last = (proc.stderr.strip().splitlines() or [""])[-1][:200]
            except subprocess.TimeoutExpired:
                kind, last = "hang", ""
            counts[kind] += 1
            seen[kind].append(f"{name}: {last}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(counts.values())
    print(f"{total} cases: " + ", ".join(f"{k} {counts[k]}" for k in
                                          ["clear", "unclear", "accepted", "panic", "hang", "signal"]))
    for kind in args.show + ["panic", "hang", "signal"]:
        for line in seen.get(kind, []):
            print(f"  [{kind}] {line}")
    sys.exit(1 if counts["panic"] + counts["hang"] + counts["signal"] else 0)


if __name__ == "__main__":
    main()
