#!/usr/bin/env python3
"""llama.cpp as a real client of `prolora export --format gguf-lora`.

Given a GGUF base and an adapter trained on it (any method), this

  1. exports the adapter with `prolora export --format gguf-lora`;
  2. generates greedily with `prolora generate --chat-format model` on the base, with and
     without the adapter, for the prompts below;
  3. loads the same base in llama.cpp (llama-cpp-python, `Llama(model_path, lora_path)`, CPU,
     --threads threads), with our adapter.gguf and without, and generates greedily from the
     same prompt text (prolora's rendering of the model's chat template, tokenized by
     llama.cpp) until an end-of-generation token or as many tokens;
  4. scores each prompt + prolora's completion teacher-forced: `prolora data encode` gives the
     ids and the label mask, `prolora eval` our mean token cross-entropy over the labels, and
     llama.cpp's logits on the same ids give its own, and its top-1 token at every label.

It prints, per prompt and adapter setting, whether the generated text and token count are
identical, the two teacher-forced losses, llama.cpp's top-1 agreement with the labels
(prolora's own greedy tokens, plus the end-of-turn token where the completion ended there) and,
where they disagree, by how much llama.cpp's top logit beats the label's (a near tie or not).

llama.cpp quantizes activations to 8 bits in the matmuls of a quantized weight (Q4_1 × Q8_1),
so on a quantized base its logits differ from ours (and from transformers') by more than float
rounding, whether or not an adapter is loaded, and a greedy path can turn at a near tie.
`--dequantize` runs everything on an F32 copy of the base instead (every tensor dequantized by
gguf-py's `gguf.quants.dequantize`: the very weights both sides compute with), where llama.cpp
multiplies in f32 and keeps its KV cache in f32: what is left to differ there is the adapter.

    pip install llama-cpp-python   # compiles llama.cpp (CPU)
    python scripts/reference/check_gguf_lora.py --base MODEL.gguf --adapter RUN_DIR \\
        [--dequantize] [--prolora target/debug/prolora] [--max-new-tokens 48] \\
        [--json-out report.json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import llama_cpp
import numpy as np

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Translate to French: The weather is nice today.",
    "Write a haiku about the sea.",
    "Explain what a neural network is in two sentences.",
    "List the first five prime numbers.",
]


def f32_copy(src, dst):
    """`src` with every tensor dequantized to F32 by gguf-py, all metadata kept."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        value = int(gguf.LlamaFileType.ALL_F32) if name == "general.file_type" else field.contents()
        writer.add_key_value(name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, values.reshape([int(d) for d in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def run(binary, *args):
    out = subprocess.run([binary, *args], check=True, capture_output=True, text=True)
    return out.stdout


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def prolora_generate(a, tmp, prompts_file, adapter):
    out = os.path.join(tmp, f"generate-{bool(adapter)}.jsonl")
    args = ["generate", "--model", a.base, "--chat-format", "model", "--prompts", prompts_file,
            "--out", out, "--overwrite", "--max-new-tokens", str(a.max_new_tokens),
            "--dtype", "f32", "--device", "cpu"]
    if adapter:
        args += ["--adapter", adapter]
    run(a.prolora, *args)
    return {row["id"]: row for row in jsonl(out)}


def prolora_losses(a, tmp, conversations, adapter):
    """Our mean label cross-entropy of each conversation, one `prolora eval` each."""
    losses = []
    for i, conversation in enumerate(conversations):
        data = os.path.join(tmp, f"conversation-{i}.jsonl")
        with open(data, "w") as f:
            f.write(json.dumps(conversation) + "\n")
        args = ["eval", "--model", a.base, "--chat-format", "model", "--data", data, "--json",
                "--dtype", "f32", "--device", "cpu"]
        if adapter:
            args += ["--adapter", adapter]
        losses.append(json.loads(run(a.prolora, *args))["loss"])
    return losses


def encoded(a, tmp, conversations):
    data = os.path.join(tmp, "conversations.jsonl")
    with open(data, "w") as f:
        for c in conversations:
            f.write(json.dumps(c) + "\n")
    out = os.path.join(tmp, "encoded.jsonl")
    run(a.prolora, "data", "encode", "--tokenizer", a.base, "--chat-format", "model",
        "--data", data, "--out", out, "--overwrite")
    return jsonl(out)


def llama_generate(llm, prompt_text, max_new_tokens):
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
    ids = llm.tokenize(prompt_text.encode(), add_bos=add_bos, special=True)
    llm.reset()
    llm.eval(ids)
    new = []
    while len(new) < max_new_tokens:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            return new, "eos"
        new.append(token)
        if len(new) < max_new_tokens:
            llm.eval([token])
    return new, "max_new_tokens"


def llama_teacher_forced(llm, input_ids, labels, greedy_end):
    """Mean cross-entropy over the label positions (HF shift); then, over the labels that are
    prolora's greedy choices (the last one, the end-of-turn token, only if `greedy_end`), the
    top-1 hits, their count and the largest logit gap by which another token beat a label."""
    llm.reset()
    llm.eval(input_ids)
    logits = np.array(llm.scores[: len(input_ids)], dtype=np.float64)
    positions = [t for t in range(1, len(input_ids)) if labels[t] != -100]
    nll = 0.0
    for t in positions:
        row = logits[t - 1]
        m = row.max()
        nll += m + np.log(np.exp(row - m).sum()) - row[labels[t]]
    greedy = positions if greedy_end else positions[:-1]
    hits = sum(int(logits[t - 1].argmax() == labels[t]) for t in greedy)
    gap = max((logits[t - 1].max() - logits[t - 1][labels[t]] for t in greedy), default=0.0)
    return nll / len(positions), hits, len(greedy), gap


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="the GGUF base model")
    p.add_argument("--adapter", required=True, help="an adapter directory trained on --base")
    p.add_argument("--prolora", default=os.environ.get("PROLORA", "target/debug/prolora"))
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dequantize", action="store_true",
                   help="run on an F32 copy of --base (gguf-py dequantizes every tensor)")
    p.add_argument("--json-out")
    a = p.parse_args()

    report = {"base": os.path.basename(a.base), "dequantized": a.dequantize,
              "llama_cpp_python": llama_cpp.__version__, "max_new_tokens": a.max_new_tokens,
              "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if a.dequantize:
            f32 = os.path.join(tmp, "base-f32.gguf")
            f32_copy(a.base, f32)
            a.base = f32
        adapter_gguf = os.path.join(tmp, "adapter.gguf")
        run(a.prolora, "export", "--format", "gguf-lora", "--adapter", a.adapter,
            "--model", a.base, "--out", adapter_gguf)
        prompts_file = os.path.join(tmp, "prompts.jsonl")
        with open(prompts_file, "w") as f:
            for i, prompt in enumerate(PROMPTS):
                f.write(json.dumps({"id": i, "prompt": prompt}) + "\n")

        for name, ours, theirs in [("base", None, None), ("adapter", a.adapter, adapter_gguf)]:
            completions = prolora_generate(a, tmp, prompts_file, ours)
            kwargs = {"lora_path": theirs} if theirs else {}
            if a.dequantize:
                # Its KV cache is f16 by default: f32, so that only the adapter may differ.
                kwargs.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
            llm = llama_cpp.Llama(model_path=a.base, n_threads=a.threads, n_ctx=1024,
                                  logits_all=True, verbose=False, **kwargs)
            conversations = [
                {"messages": [{"role": "user", "content": prompt},
                              {"role": "assistant", "content": completions[i]["output"]}]}
                for i, prompt in enumerate(PROMPTS)
            ]
            our_losses = prolora_losses(a, tmp, conversations, ours)
            rows = []
            for i, (prompt, enc) in enumerate(zip(PROMPTS, encoded(a, tmp, conversations))):
                c = completions[i]
                ids, ended = llama_generate(llm, c["prompt"], a.max_new_tokens)
                text = llm.detokenize(ids).decode("utf-8", errors="replace")
                loss, hits, n, gap = llama_teacher_forced(
                    llm, enc["input_ids"], enc["labels"], c["ended"] == "eos")
                rows.append({
                    "prompt": prompt,
                    "prolora": {"text": c["output"], "tokens": c["tokens"], "ended": c["ended"]},
                    "llama_cpp": {"text": text, "tokens": len(ids), "ended": ended},
                    "identical": text == c["output"] and len(ids) == c["tokens"],
                    "loss_prolora": our_losses[i],
                    "loss_llama_cpp": loss,
                    "top1_agree": f"{hits}/{n}",
                    "max_gap_over_label": gap,
                })
            report["settings"][name] = rows

    for name, rows in report["settings"].items():
        same = sum(r["identical"] for r in rows)
        print(f"== {name}: {same}/{len(rows)} prompts identical")
        for r in rows:
            d = r["loss_llama_cpp"] - r["loss_prolora"]
            print(f"  {'same' if r['identical'] else 'DIFF'} {r['prolora']['tokens']:3d}/"
                  f"{r['llama_cpp']['tokens']:3d} tok  loss ours {r['loss_prolora']:.5f} "
                  f"llama.cpp {r['loss_llama_cpp']:.5f} (Δ {d:+.2e})  top-1 "
                  f"{r['top1_agree']} (gap ≤ {r['max_gap_over_label']:.3f})  {r['prompt']!r}")
            if not r["identical"]:
                print(f"      ours:      {r['prolora']['text']!r}")
                print(f"      llama.cpp: {r['llama_cpp']['text']!r}")
    changed = sum(b["prolora"]["text"] != t["prolora"]["text"]
                  for b, t in zip(report["settings"]["base"], report["settings"]["adapter"]))
    print(f"the adapter changes {changed}/{len(PROMPTS)} of prolora's completions")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
    # On a quantized base a turn at a near tie is llama.cpp's arithmetic; on the F32 copy it
    # would be the adapter.
    adapter_rows = report["settings"]["adapter"]
    sys.exit(1 if a.dequantize and not all(r["identical"] for r in adapter_rows) else 0)


if __name__ == "__main__":
    main()
