"""One LoRA training step on a 7B-shaped LLaMA-2 in NF4 + double quant on the CPU: prolora next
to PyTorch + PEFT + bitsandbytes, the same bf16 checkpoint quantized while loading, the same
data, one after the other in one run. Prints a markdown table with the time ratio.

    cargo build --release
    python scripts/bench/make_7b_bf16.py <7b-dir>          # once, 13.5 GB
    .venv-ref/bin/python scripts/bench/step_7b.py <7b-dir> [DATA.jsonl] [--rss-limit-gib 20]

Batch 1 x 128 of DATA.jsonl, by default scripts/bench/data/all_labelled.jsonl (a one-word user
turn, then an answer filling the sequence: nearly every token labelled); the config is
scripts/bench/train.toml, the binary as in train_step.py. LoRA r 8 on all seven linears, f32
compute; each tool runs 3 steps and the third is timed. A tool whose resident set passes
--rss-limit-gib is stopped (this machine has 24 GiB) and reported as such.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from train_step import BIN, DATA, ROOT, write_config  # noqa: E402
STEPS = 3


def watched(cmd, limit_mib):
    """Runs cmd, polling its resident set; returns (stdout, peak RSS MiB, stopped?)."""
    out = tempfile.TemporaryFile(mode="w+")
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
    peak, stopped = 0.0, False
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
            peak = max(peak, rss)
        except (OSError, StopIteration):
            pass
        if peak > limit_mib:
            proc.kill()
            stopped = True
        time.sleep(0.2)
    out.seek(0)
    err.seek(0)
    if proc.returncode != 0 and not stopped:
        sys.exit(f"{cmd[0]} failed:\n{err.read()[-4000:]}")
    return out.read(), peak, stopped


def ours(model, data, checkpointing, work, limit_mib):
    run = os.path.join(work, "run")
    cfg = os.path.join(work, "bench7b.toml")
    write_config(cfg, run, model, data, STEPS, 128, 1, checkpointing, nf4=True)
    _, peak, stopped = watched([BIN, "train", "--config", cfg, "--overwrite", "--quiet"], limit_mib)
    if stopped:
        return None, peak
    steps = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if '"loss"' in l]
    return steps[-1]["elapsed_s"] - steps[-2]["elapsed_s"], peak


def peer(model, data, checkpointing, limit_mib):
    cmd = [sys.executable, os.path.join(ROOT, "scripts/peers/lora_step.py"), model, data,
           "--steps", str(STEPS), "--timed-from", str(STEPS - 1), "--seq", "128", "--batch", "1",
           "--nf4"]
    if checkpointing:
        cmd.append("--checkpointing")
    out, peak, stopped = watched(cmd, limit_mib)
    if stopped:
        return None, peak
    return json.loads(out.strip().splitlines()[-1])["step_s"], peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data", nargs="?", default=os.path.join(DATA, "all_labelled.jsonl"),
                    help="chat jsonl (default: the bench's nearly-all-labelled data)")
    ap.add_argument("--rss-limit-gib", type=float, default=20)
    ap.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    args = ap.parse_args()
    limit = args.rss_limit_gib * 1024
    work = tempfile.mkdtemp(prefix="prolora-bench7b-")
    print(f"7B-shaped LLaMA-2 (random bf16 -> NF4 + double quant while loading), batch 1 x 128, "
          f"LoRA r 8 on 7 linears, f32 compute, {os.cpu_count()} CPU threads each; step {STEPS} timed")
    print("| checkpointing | prolora step (s) | PyTorch+PEFT+bnb step (s) | time ratio "
          "| prolora peak RSS (GiB) | PyTorch peak RSS (GiB) | RSS ratio |")
    print("|---|---|---|---|---|---|---|")
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]
    for ck in modes:
        t_ours, m_ours = ours(args.model, args.data, ck, work, limit)
        t_peer, m_peer = peer(args.model, args.data, ck, limit)
        fmt_t = lambda t: f"{t:.1f}" if t is not None else f"stopped (> {args.rss_limit_gib:g} GiB)"
        ratio = f"{t_ours / t_peer:.2f}" if t_ours and t_peer else "–"
        print(f"| {'on' if ck else 'off'} | {fmt_t(t_ours)} | {fmt_t(t_peer)} | {ratio} "
              f"| {m_ours / 1024:.2f} | {m_peer / 1024:.2f} | {m_ours / m_peer:.2f} |", flush=True)


if __name__ == "__main__":
    main()
