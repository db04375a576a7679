"""Training-step benchmark: prolora next to PyTorch + PEFT on the same weights, the same data
and the same machine, in one run. Prints a markdown table with the time ratio.

    cargo build --release
    .venv-ref/bin/python scripts/bench/train_step.py [--steps 12] [--hidden 256 --layers 4] [--nf4]

The binary is $PROLORA_BIN, else $CARGO_TARGET_DIR/release/prolora, else target/release/prolora.
Rows: nearly every token labelled (a one-token user turn, then an answer filling the sequence)
and real chat batches (only the answer labelled), each with and without activation
checkpointing; batch 4 x 128, LoRA r 8 on all seven linears, f32 on the CPU. The data is
scripts/bench/data/ (scripts/bench/make_bench_data.py) and the config scripts/bench/train.toml;
tests/bench_inputs.rs trains on both, so they stay valid input for `prolora train`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("PROLORA_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"), "release", "prolora")
DATA = os.path.join(ROOT, "scripts/bench/data")
TEMPLATE = os.path.join(ROOT, "scripts/bench/train.toml")


def write_config(path, run, model, data, steps, seq, batch, checkpointing, nf4):
    """The `prolora train` config both benchmarks run: scripts/bench/train.toml filled in."""
    with open(TEMPLATE) as f:
        text = f.read()
    values = {"run": run, "model": model, "data": data, "steps": steps, "seq": seq, "batch": batch,
              "checkpointing": str(checkpointing).lower(), "quantize": "nf4" if nf4 else "none"}
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    with open(path, "w") as f:
        f.write(text)


def ours(model, data, steps, seq, batch, checkpointing, workdir, nf4):
    run = os.path.join(workdir, "run")
    cfg = os.path.join(workdir, "bench.toml")
    write_config(cfg, run, model, data, steps, seq, batch, checkpointing, nf4)
    done = subprocess.run([BIN, "train", "--config", cfg, "--overwrite", "--quiet"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"prolora train failed:\n{done.stderr}")
    lines = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if l.strip()]
    steps_ = [l for l in lines if "loss" in l]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps_, steps_[1:])][1:]
    return {"step_s": statistics.median(times), "peak_rss_mib": steps_[-1]["peak_rss_mib"]}


def peer(model, data, steps, seq, batch, checkpointing, nf4):
    cmd = [sys.executable, os.path.join(ROOT, "scripts/peers/lora_step.py"), model, data,
           "--steps", str(steps), "--seq", str(seq), "--batch", str(batch)]
    if checkpointing:
        cmd.append("--checkpointing")
    if nf4:
        cmd.append("--nf4")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--nf4", action="store_true", help="both bases in NF4 + double quant (peer: bitsandbytes)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="prolora-bench-")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts/peers/make_bench_model.py"), work,
                    "--hidden", str(args.hidden), "--layers", str(args.layers)],
                   check=True, capture_output=True)
    model = os.path.join(work, "model")
    print(f"LLaMA hidden {args.hidden}, {args.layers} layers, vocab 32000; batch {args.batch} x {args.seq}; "
          f"LoRA r 8 on 7 linears; base {'NF4 + double quant' if args.nf4 else 'f32'}; {os.cpu_count()} CPU threads each")
    print("| data | checkpointing | label fraction | prolora step (s) | PyTorch+PEFT step (s) | time ratio | prolora peak RSS (MiB) | PyTorch peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for data in ["all_labelled", "chat"]:
        for ckpt in [False, True]:
            path = os.path.join(DATA, f"{data}.jsonl")
            p = peer(model, path, args.steps, args.seq, args.batch, ckpt, args.nf4)
            o = ours(model, path, args.steps, args.seq, args.batch, ckpt, work, args.nf4)
            print(f"| {data} | {'on' if ckpt else 'off'} | {p['label_fraction']:.2f} | {o['step_s']:.3f} | "
                  f"{p['step_s']:.3f} | {o['step_s'] / p['step_s']:.2f} | {o['peak_rss_mib']:.0f} | "
                  f"{p['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
