"""Serving many adapters at once on SmolLM2-135M-Instruct: `prolora serve` against transformers +
PEFT generating a mixed-adapter batch, on the same CPU in the same run.

    python scripts/bench/serve.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --work bench-serve

Needs torch, transformers, peft, safetensors, numpy, gguf (scripts/reference/requirements.txt)
and a release build (`cargo build --release`; or $PROLORA_BIN). What it does:

1. The adapters: one `prolora train` step of LoRA r 8 and of PRoLoRA r 8, u 1, m = n = 7 (the
   layouts, on the GGUF), then `--adapters` copies of each with every tensor redrawn
   U(±`--scale`) (as serve_adapters.py does), and each PRoLoRA copy exported to plain LoRA with
   `prolora export` for PEFT (PEFT has no PRoLoRA; the export is the same ΔW).
2. `prolora serve` on the f32 directory of step 3 (the weights PEFT runs) and on the GGUF (its
   Q4_1 linears kept in their blocks; `--serve-base`), one server per base and method:
   `--requests` completions sent at once (`--max-batch` the same), round-robin over 1, 8 and 64
   distinct adapters, temperature 0, exactly `--max-tokens` each (vLLM's `ignore_eos`, as PEFT's
   `min_new_tokens` below); output tokens/s = the completion tokens of all answers / the wall
   time from the first request to the last answer, and per CPU-second of the server (its user +
   system time, which other work on a shared machine barely moves; the ratios use it). The base
   model (no adapter) the same way.
3. transformers + PEFT (0.21) on the f32 directory of the same GGUF (every tensor dequantized by
   transformers' GGUF loader; built under --work if --f32-dir is not given): the same prompts
   in one left-padded batch, `generate(..., adapter_names=[...])` with the same adapters per
   row, greedy, exactly `--max-tokens` new tokens a row.
4. Resident bytes per adapter as the server reports them (`/metrics`, after a vLLM-style
   `/v1/load_lora_adapter`): a PRoLoRA adapter compact, and the same adapter exported to LoRA.
5. Adapters per GiB (f32) at LLaMA-2-7B shapes, from `prolora params` (shapes alone).

Prints a Markdown table and writes WORK/serve.json.
"""

import argparse
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from smollm2 import f32_directory  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
GIB = 1 << 30


def binary():
    return os.environ.get("PROLORA_BIN", str(ROOT / "target" / "release" / "prolora"))


def run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run(list(map(str, cmd)), check=True, **kw)


def make_adapters(args, work):
    """WORK/adapters/<method>/<method>-<i>, and WORK/exported/prolora-<i> (PRoLoRA as LoRA)."""
    rng = np.random.default_rng(0)
    made = {}
    for method in ("lora", "prolora"):
        root = work / "adapters" / method
        made[method] = root
        if root.exists() and len(list(root.iterdir())) >= args.adapters:
            continue
        run_dir = work / "runs" / method
        if not (run_dir / "adapter_model.safetensors").exists():
            run([binary(), "train", "--config", ROOT / "configs" / "smollm2.toml", "--overwrite",
                 "--set", f"model.source={json.dumps(str(args.gguf))}",
                 "--set", f"adapter.kind={json.dumps(method)}",
                 "--set", f"data.train={json.dumps(str(ROOT / 'data' / 'sample_chat.jsonl'))}",
                 "--set", f"data.eval={json.dumps(str(ROOT / 'data' / 'sample_chat_eval.jsonl'))}",
                 "--set", "train.steps=1", "--set", "train.batch_size=1",
                 "--set", "data.max_seq_len=32", "--set", f"output_dir={json.dumps(str(run_dir))}"],
                stdout=subprocess.DEVNULL)
        tensors = load_file(run_dir / "adapter_model.safetensors")
        for i in range(args.adapters):
            out = root / f"{method}-{i}"
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(run_dir / "adapter_config.json", out / "adapter_config.json")
            save_file({n: rng.uniform(-args.scale, args.scale, t.shape).astype(np.float32)
                       for n, t in tensors.items()}, out / "adapter_model.safetensors")
    exported = work / "exported"
    for i in range(args.adapters):
        out = exported / f"prolora-{i}"
        if not (out / "adapter_model.safetensors").exists():
            run([binary(), "export", "--adapter", made["prolora"] / f"prolora-{i}",
                 "--model", args.gguf, "--out", out, "--overwrite"], stdout=subprocess.DEVNULL)
    return made, exported


def prompts(n):
    """Story openings: a model continues them well past --max-tokens."""
    who = ["a baker", "a sailor", "an old clockmaker", "a girl with a red kite", "two brothers",
           "a lighthouse keeper", "a tired astronaut", "a talking cat"]
    return [f"Once upon a time, {who[i % len(who)]} found a letter numbered {i}. It said" for i in range(n)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, root):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [binary(), "serve", "--model", args.served, "--adapter-root", root,
               "--port", self.port, "--max-batch", args.requests,
               "--max-queue", 4 * args.requests]
        print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(list(map(str, cmd)), stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).read()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"prolora serve exited with {self.proc.returncode}")
                time.sleep(0.5)
        raise SystemExit("prolora serve did not answer /health within 300 s")

    def post(self, path, body):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            return r.read().decode()

    def metric(self, name):
        text = urllib.request.urlopen(self.url + "/metrics", timeout=30).read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def load(self, requests, models, max_tokens):
        """Every request at once; output tokens/s over the whole load."""
        done = [0] * len(requests)

        def one(i):
            r = self.post("/v1/completions", {"model": models[i % len(models)],
                                              "prompt": requests[i], "max_tokens": max_tokens,
                                              "temperature": 0, "ignore_eos": True})
            done[i] = json.loads(r)["usage"]["completion_tokens"]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
        start, cpu = time.perf_counter(), self.cpu_seconds()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall, cpu = time.perf_counter() - start, self.cpu_seconds() - cpu
        return sum(done) / wall, sum(done) / cpu

    def cpu_seconds(self):
        """The server's user + system CPU time: other work on the machine barely moves it."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def serve_side(args, roots, exported, base_name):
    results = {}
    texts = prompts(args.requests)
    for method, root in roots.items():
        for stale in root.glob("probe-*"):
            shutil.rmtree(stale)
        server = Server(args, root)
        try:
            server.load(texts[:4], [base_name], 4)  # warm-up
            loads = {} if "base" in results else {"base": [base_name]}
            loads.update({f"{method}-{k}": [f"{method}-{i}" for i in range(k)]
                          for k in args.distinct})
            # Round-robin over the loads, best of --repeat each: noise from other work on the
            # machine hits every load alike.
            runs = {label: [] for label in loads}
            for _ in range(args.repeat):
                for label, names in loads.items():
                    runs[label].append(server.load(texts, names, args.max_tokens))
                    print(f"  {label}: {runs[label][-1][0]:.1f} tok/s, "
                          f"{runs[label][-1][1]:.1f} tok/CPU-s", file=sys.stderr, flush=True)
            results.update({label: max(t for t, _ in r) for label, r in runs.items()})
            results.update({f"{label}-cpu": max(c for _, c in r) for label, r in runs.items()})
            if method == "prolora":
                # Resident bytes: a PRoLoRA copy, then its LoRA export, loaded at run time.
                for label, path in (("prolora", root / "prolora-0"),
                                    ("prolora-as-lora", exported / "prolora-0")):
                    dest = root / f"probe-{label}"
                    shutil.copytree(path, dest)
                    reply = server.post("/v1/load_lora_adapter", {"lora_name": f"probe-{label}",
                                                                  "lora_path": str(dest)})
                    results[f"bytes-{label}"] = int(reply.split("(")[1].split(" bytes")[0])
                    shutil.rmtree(dest)
        finally:
            server.close()
    return results


def peft_side(args, model_dir, roots, exported):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = prompts(args.requests)
    batch = tok(texts, return_tensors="pt", padding=True)
    dirs = {"lora": lambda i: roots["lora"] / f"lora-{i}",
            "prolora": lambda i: exported / f"prolora-{i}"}
    dirs = {m: d for m, d in dirs.items() if m in roots}
    results = {}
    for method, dir_of in dirs.items():
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, dir_of(0), adapter_name="a0")
        for i in range(1, max(args.distinct)):
            model.load_adapter(dir_of(i), adapter_name=f"a{i}")
        model.eval()
        for k in args.distinct:
            names = [f"a{i % k}" for i in range(args.requests)]

            def measure():
                start, cpu = time.perf_counter(), time.process_time()
                with torch.inference_mode():
                    out = model.generate(**batch, adapter_names=names, do_sample=False,
                                         max_new_tokens=args.max_tokens,
                                         min_new_tokens=args.max_tokens, pad_token_id=tok.pad_token_id)
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                tokens = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
                return tokens / wall, tokens / cpu

            print(f"PEFT {method}, {k} distinct", file=sys.stderr, flush=True)
            runs = [measure() for _ in range(args.repeat)]
            print(f"  {[(round(t, 1), round(c, 1)) for t, c in runs]} (tok/s, tok/CPU-s)",
                  file=sys.stderr, flush=True)
            results[f"{method}-{k}"] = max(t for t, _ in runs)
            results[f"{method}-{k}-cpu"] = max(c for _, c in runs)
        del model, base
    return results


def per_gib():
    out = {}
    for method in ("lora", "prolora"):
        p = json.loads(run([binary(), "params", "--model", "llama2-7b", "--method", method,
                            "--rank", "8", "--json"], capture_output=True, text=True).stdout)
        out[method] = (p["params"], p["bytes_f32"], GIB // p["bytes_f32"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--f32-dir", help="its f32 transformers directory (built under --work if absent)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--distinct", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--scale", type=float, default=0.02)
    ap.add_argument("--repeat", type=int, default=2, help="best of N per point")
    ap.add_argument("--methods", nargs="+", default=["prolora", "lora"], choices=["prolora", "lora"])
    ap.add_argument("--serve-base", nargs="+", choices=["f32", "gguf"], default=["f32", "gguf"],
                    help="what prolora serves, one server each: the f32 directory PEFT runs (the "
                         "same weights), and the GGUF's Q4_1 blocks")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-serve", action="store_true", help="PEFT only")
    ap.add_argument("--prepare", action="store_true",
                    help="only make the adapters and the f32 directory (untimed), then stop")
    args = ap.parse_args()
    if max(args.distinct) > args.adapters:
        ap.error("--distinct asks for more adapters than --adapters makes")
    args.gguf = pathlib.Path(args.gguf).resolve()
    work = pathlib.Path(args.work).resolve()
    torch_threads = os.environ.get("OMP_NUM_THREADS")
    roots, exported = make_adapters(args, work)
    model_dir = pathlib.Path(args.f32_dir) if args.f32_dir else work / "smollm2-f32"
    f32_directory(args.gguf, model_dir)
    if args.prepare:
        return
    roots = {m: roots[m] for m in args.methods}
    ours = {}
    for base in [] if args.skip_serve else args.serve_base:
        args.served = args.gguf if base == "gguf" else model_dir.resolve()
        ours[base] = serve_side(args, roots, exported, base_name=str(args.served))
    peft = {} if args.skip_peft else peft_side(args, model_dir, roots, exported)
    gib = per_gib()
    result = {"ours": ours, "peft": peft, "per_gib_7b": gib, "requests": args.requests,
              "max_tokens": args.max_tokens, "omp_num_threads": torch_threads}
    (work / "serve.json").write_text(json.dumps(result, indent=2))

    print(f"\n{args.requests} requests of {args.max_tokens} tokens at once; output tokens/s and "
          "tokens per CPU-second (PEFT: the f32 dequantization of the GGUF; PRoLoRA on PEFT = its "
          "`prolora export` to LoRA)\n")
    print("| prolora serves | adapters in the load | prolora serve: tokens/s | per CPU-s "
          "| vs one adapter | transformers + PEFT (f32): tokens/s | per CPU-s "
          "| ours / PEFT: tokens/s | per CPU-s |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v: f"{v:.1f}" if v else "–"
    ratio = lambda a, b: f"{a / b:.2f}×" if a and b else "–"
    for base, res in ours.items():
        what = "f32 (same weights as PEFT)" if base == "f32" else "Q4_1 GGUF blocks"
        print(f"| {what} | none (base) | {fmt(res.get('base'))} | {fmt(res.get('base-cpu'))} "
              "| | | | | |")
        for method in args.methods:
            one = res.get(f"{method}-{args.distinct[0]}-cpu")
            for k in args.distinct:
                key = f"{method}-{k}"
                o, p = res.get(key + "-cpu"), peft.get(key + "-cpu")
                share = f"{100 * o / one:.0f} %" if o and one else "–"
                print(f"| {what} | {k} distinct {method} | {fmt(res.get(key))} | {fmt(o)} | {share} "
                      f"| {fmt(peft.get(key))} | {fmt(p)} | {ratio(res.get(key), peft.get(key))} "
                      f"| {ratio(o, p)} |")
    bytes_of = next((res for res in ours.values() if "bytes-prolora" in res), None)
    if bytes_of:
        print(f"\nResident bytes per adapter on SmolLM2-135M (f32, /metrics): PRoLoRA r 8, u 1, m = n = 7 "
              f"{bytes_of['bytes-prolora']:.0f}; the same adapter exported to LoRA "
              f"{bytes_of['bytes-prolora-as-lora']:.0f} "
              f"({bytes_of['bytes-prolora-as-lora'] / bytes_of['bytes-prolora']:.2f}×)")
    (lp, lb, ln), (pp, pb, pn) = gib["lora"], gib["prolora"]
    print(f"At LLaMA-2-7B shapes (f32, all seven linears): PRoLoRA r 8/u 1/m 7 {pp:,} parameters, "
          f"{pb / 1e6:.1f} MB, {pn} per GiB; LoRA r 8 {lp:,}, {lb / 1e6:.1f} MB, {ln} per GiB")


if __name__ == "__main__":
    main()
