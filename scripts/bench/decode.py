"""Decoding benchmark: `prolora generate --prompts` next to transformers' `generate` on the same
random LLaMA, the same prompts and the same machine, in one run. Prints markdown tables.

    cargo build --release
    .venv-ref/bin/python scripts/bench/decode.py [--new 128] [--prompt-tokens 128] [--batches 1 16] [--7b]

Decode tokens/s = tokens generated after the first / (time with --new N − time with 1 new
token), so model loading, tokenization and the prefill cancel out (each time the best of
--repeats runs, as this shared machine is noisy); both tools decode greedily,
stop at EOS, and are checked to give the same tokens. `--7b` adds the 7B-shaped NF4 preset at
batch 1 next to its memory-bandwidth limit (NF4 weights read per token over the measured copy
bandwidth) and its peak RSS. The binary is $PROLORA_BIN, else target/release/prolora.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("PROLORA_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"), "release", "prolora")
WORDS = ("river stone light garden quiet number window market paper silver morning letter "
         "mountain table orange winter music bridge forest candle").split()


def wrapped(text):
    """The chat prompt prolora builds for one user message (open-instruct's Tulu format)."""
    return "<|user|>\n" + text + "\n<|assistant|>\n"


def prompts_of(tokenizer, n, tokens):
    """n different user messages whose chat prompts are exactly `tokens` ids, BOS included."""
    out = []
    for i in range(n):
        words = []
        j = i
        while len(tokenizer(wrapped(" ".join(words)))["input_ids"]) < tokens:
            words.append(WORDS[j % len(WORDS)])
            j += 7
        while len(tokenizer(wrapped(" ".join(words)))["input_ids"]) > tokens:
            words.pop()
        text = " ".join(words)
        pad = 0
        while len(tokenizer(wrapped(text + " a" * pad))["input_ids"]) < tokens:
            pad += 1
        out.append(text + " a" * pad)
    assert all(len(tokenizer(wrapped(p))["input_ids"]) == tokens for p in out)
    return out


def ours(model, prompts, batch, new, work, extra=()):
    """Wall seconds, tokens generated and outputs of one `prolora generate --prompts` run."""
    src = os.path.join(work, "prompts.jsonl")
    with open(src, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": i, "prompt": p}) + "\n")
    out = os.path.join(work, "out.jsonl")
    cmd = [BIN, "generate", "--model", model, *extra, "--prompts", src, "--batch-size", str(batch),
           "--max-new-tokens", str(new), "--out", out, "--overwrite"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"prolora generate failed:\n{done.stderr}")
    lines = [json.loads(l) for l in open(out)]
    return wall, sum(l["tokens"] for l in lines), [l["output"] for l in lines]


def peer(model, tokenizer, prompts, batch, new):
    """Seconds, tokens generated and outputs of transformers' generate (KV cache, greedy)."""
    import torch
    tokenizer.padding_side = "left"
    tokenizer.pad_token = "</s>"  # tokenizer.json alone names no special tokens
    total, tokens, outputs = 0.0, 0, []
    for at in range(0, len(prompts), batch):
        enc = tokenizer([wrapped(p) for p in prompts[at:at + batch]], return_tensors="pt", padding=True)
        start = time.perf_counter()
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=new, do_sample=False, use_cache=True,
                                 pad_token_id=2, eos_token_id=2)
        total += time.perf_counter() - start
        new_ids = ids[:, enc["input_ids"].shape[1]:]
        for row in new_ids.tolist():
            row = row[:row.index(2)] if 2 in row else row
            tokens += len(row)
            outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    return total, tokens, outputs


def small_model_rows(args, work):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts/peers/make_bench_model.py"), work,
                    "--hidden", str(args.hidden), "--layers", str(args.layers)], check=True)
    model_dir = os.path.join(work, "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    torch.set_num_threads(os.cpu_count())
    print(f"LLaMA hidden {args.hidden}, {args.layers} layers, vocab 32000, f32; prompts of "
          f"{args.prompt_tokens} tokens, {args.new} new tokens, greedy; {os.cpu_count()} CPU threads each; "
          f"transformers {__import__('transformers').__version__}, torch {torch.__version__}")
    print("| batch | prolora decode tok/s | transformers decode tok/s | speed ratio | same tokens |")
    print("|---|---|---|---|---|")
    for batch in args.batches:
        prompts = prompts_of(tokenizer, batch, args.prompt_tokens)
        best = lambda f: min((f() for _ in range(args.repeats)), key=lambda r: r[0])
        o1, t1, _ = best(lambda: ours(model_dir, prompts, batch, 1, work))
        on, tn, o_out = best(lambda: ours(model_dir, prompts, batch, args.new, work))
        p1, u1, _ = best(lambda: peer(model, tokenizer, prompts, batch, 1))
        pn, un, p_out = best(lambda: peer(model, tokenizer, prompts, batch, args.new))
        ours_tps = (tn - t1) / (on - o1)
        peer_tps = (un - u1) / (pn - p1)
        same = "yes" if o_out == p_out else f"no ({sum(a == b for a, b in zip(o_out, p_out))}/{batch})"
        print(f"| {batch} | {ours_tps:.1f} | {peer_tps:.1f} | {ours_tps / peer_tps:.2f}× | {same} |", flush=True)


def copy_bandwidth():
    """Bytes per second read + written by one large numpy copy (the best of three)."""
    import numpy as np
    src = np.ones(1 << 28, dtype=np.float32)  # 1 GiB
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(3))
    return 2 * src.nbytes / best


def _timed(f):
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def seven_b_row(args, work):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(work, "model"))
    prompts = prompts_of(tokenizer, 1, args.prompt_tokens)
    extra = ["--quantize", "nf4"]
    new = args.new_7b
    o1, _, _ = ours("llama2-7b", prompts, 1, 1, work, extra)
    on, tn, _ = ours("llama2-7b", prompts, 1, new, work, extra)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    tps = (tn - 1) / (on - o1)
    # Bytes read per token: the NF4 codes (half a byte per weight) and their scales (double
    # quantized: one byte per 64 weights plus a float per 256 blocks) of the seven linears of
    # 32 layers, and the f32 head (32000 × 4096); embeddings read one row.
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    nf4 = linear * (0.5 + 1 / 64 + 4 / (64 * 256))
    head = 32000 * 4096 * 4
    bw = copy_bandwidth()
    limit = bw / (nf4 + head)
    print()
    print(f"| 7B-shaped NF4 preset (llama2-7b, random NF4 + double quant, f32 compute), batch 1, "
          f"{args.prompt_tokens}-token prompt, {new} new tokens | |")
    print("|---|---|")
    print(f"| decode | {tps:.3f} tok/s ({1 / tps:.2f} s/token) |")
    print(f"| memory-bandwidth limit | {limit:.2f} tok/s ({(nf4 + head) / 2**30:.2f} GiB read per token "
          f"over a measured copy bandwidth of {bw / 2**30:.1f} GiB/s) |")
    print(f"| share of the limit | {tps / limit:.1%} |")
    print(f"| peak RSS (largest prolora process) | {rss:.2f} GiB |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--7b", dest="seven_b", action="store_true")
    ap.add_argument("--new-7b", type=int, default=4)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="prolora-decode-")
    small_model_rows(args, work)
    if args.seven_b:
        seven_b_row(args, work)


if __name__ == "__main__":
    main()
