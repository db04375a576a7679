"""GGUF tokenizer goldens: transformers' own GGUF tokenizer conversion
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`) on a mixed-script corpus.

Writes tests/fixtures/gguf/:
  spm-tokenizer.gguf   a small SentencePiece ("llama") vocabulary as llama.cpp stores one: tokens,
                       scores and token types, no merges (transformers rebuilds them from the scores),
                       built from the LLaMA-2 tokenizer in assets/ (its first 2000 pieces, every
                       single character they use or the corpus uses, three added tokens), with a chat
                       template; no tensors
  tokenizer.json       per tokenizer ("smollm2": the real SmolLM2 GGUF, gpt2 BPE; "spm": the file
                       above): the corpus's ids, character offsets and decoded text, the special
                       tokens and whether BOS/EOS are added

Usage (from the repository root; the SmolLM2 GGUF is the one the tests fetch):
    python scripts/reference/make_gguf_tokenizer_goldens.py path/to/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import gguf
from transformers import AutoTokenizer

OUT = Path("tests/fixtures/gguf")

CORPUS = [
    "Hello, world! This is a test.",
    "  leading spaces and\ttabs\n\nnewlines   trailing  ",
    "def f(x):\n    return x ** 2  # square\n",
    "日本語のテキストと中文字符。",
    "emoji 😀🎉👩‍👩‍👧 and ❤️",
    "مرحبا بالعالم",
    "Crème brûlée, naïve façade, Ångström",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "numbers 1234567890 3.14159 2024-06-01",
    "<s> literal specials </s> <unk> <|endoftext|>",
    "",
    " ",
    "\u00a0nbsp and zero\u200bwidth",
    "<think>reasoning</think> done",
]

CONTROL, NORMAL, UNKNOWN, USER_DEFINED, BYTE = 3, 1, 2, 4, 6
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"


def write_spm_gguf(path):
    src = json.loads(Path("assets/llama2-tokenizer.json").read_text())
    vocab = src["model"]["vocab"]  # piece -> id (SentencePiece order: merges before rarer chars)
    by_id = sorted(vocab, key=vocab.get)
    keep = set(by_id[:2000])
    chars = {c for piece in keep for c in piece} | {c for line in CORPUS for c in line}
    keep |= {p for p in by_id if len(p) == 1 and p in chars}
    pieces = [p for p in by_id if p in keep]
    tokens, scores, types = [], [], []
    for p in pieces:
        tokens.append(p)
        if p == "<unk>":
            types.append(UNKNOWN)
        elif p in ("<s>", "</s>"):
            types.append(CONTROL)
        elif p.startswith("<0x") and len(p) == 6:
            types.append(BYTE)
        else:
            types.append(NORMAL)
        # SentencePiece BPE scores a piece by its merge order: earlier is better.
        scores.append(0.0 if types[-1] != NORMAL else -float(vocab[p]))
    for extra, kind in (("<|im_start|>", CONTROL), ("<|im_end|>", CONTROL), ("<think>", USER_DEFINED)):
        tokens.append(extra)
        scores.append(0.0)
        types.append(kind)
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tokens.index("<s>"))
    w.add_eos_token_id(tokens.index("</s>"))
    w.add_unk_token_id(tokens.index("<unk>"))
    w.add_add_space_prefix(True)
    w.add_chat_template(TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def goldens(gguf_path):
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(gguf_path, Path(d) / "model.gguf")
        tok = AutoTokenizer.from_pretrained(d, gguf_file="model.gguf")
    cases = []
    for text in CORPUS:
        enc = tok(text, return_offsets_mapping=True)
        ids = enc["input_ids"]
        cases.append(
            {
                "text": text,
                "ids": ids,
                "offsets": [list(o) for o in enc["offset_mapping"]],
                "decoded": tok.decode(ids),
            }
        )
    return {
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "unk_token": tok.unk_token,
        "pad_token": tok.pad_token,
        "vocab_size": len(tok),
        "cases": cases,
    }


def main():
    smollm2 = Path(sys.argv[1])
    OUT.mkdir(parents=True, exist_ok=True)
    spm = OUT / "spm-tokenizer.gguf"
    write_spm_gguf(spm)
    result = {"smollm2": goldens(smollm2), "spm": goldens(spm)}
    (OUT / "tokenizer.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
