#!/usr/bin/env python3
"""Goldens for `prolora export --format gguf-lora` and the GGUF writer, made by llama.cpp's own
Python: its `convert_lora_to_gguf.py` and its `gguf-py` package.

Writes tests/fixtures/gguf-lora/ (and nothing else):

  * `peft-lora.gguf`: convert_lora_to_gguf.py on PEFT's own LoRA
    (tests/fixtures/peft-lora/adapter, r 4, alpha 8, all seven linears, 4 heads / 2 KV heads:
    the q and k row permutations differ) with `--base tests/fixtures/peft-lora/base`;
  * `{prolora,vera,tied-lora}.gguf`: the same converter on the PEFT LoRAs that
    `prolora export --format peft-lora` wrote for our trained adapters
    (tests/fixtures/our-exports/{kind}/peft-lora, which check_exports.py loads in stock PEFT);
  * `values.gguf`: a file written by gguf-py's `GGUFWriter`: one metadata key of each of the
    thirteen value types (arrays of u32, of strings and of arrays among them; gguf-py refuses empty arrays), and F32, F16
    and Q8_0 tensors of 1 to 3 dimensions (the Q8_0 one quantized by `gguf.quants`).

The converter's output type is its default (`--outtype f32`).

    python scripts/reference/make_gguf_lora_goldens.py LLAMA_CPP_DIR

LLAMA_CPP_DIR is a llama.cpp source tree (convert_lora_to_gguf.py, convert_hf_to_gguf.py,
gguf-py/); the fixtures were made with the one vendored in the llama-cpp-python 0.3.36 sdist
(llama.cpp 0c1e57098), with torch, transformers and safetensors from requirements.txt.
Deterministic: reruns give byte-identical files.
"""
import os
import shutil
import subprocess
import sys

import numpy as np

OUT = "tests/fixtures/gguf-lora"
BASE = "tests/fixtures/peft-lora/base"
ADAPTERS = {
    "peft-lora": "tests/fixtures/peft-lora/adapter",
    "prolora": "tests/fixtures/our-exports/prolora/peft-lora",
    "vera": "tests/fixtures/our-exports/vera/peft-lora",
    "tied-lora": "tests/fixtures/our-exports/tied-lora/peft-lora",
}


def convert(llama_cpp, adapter, out):
    subprocess.run(
        [sys.executable, os.path.join(llama_cpp, "convert_lora_to_gguf.py"),
         "--base", BASE, "--outfile", out, adapter],
        check=True,
    )


def write_values(gguf, path):
    T = gguf.GGUFValueType
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 0.1)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo <|im_end|>\n")
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float64("test.f64", -1e-300)
    w.add_key_value("test.array_u32", [1, 2, 2**32 - 1], T.ARRAY, T.UINT32)
    w.add_array("test.array_string", ["a", "", "ü ö"])
    w.add_array("test.array_array", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    w.add_tensor("t.f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("t.f16", rng.standard_normal((2, 3, 4)).astype(np.float16))
    w.add_tensor("t.vec", rng.standard_normal(7).astype(np.float32))
    q = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32),
                             gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("t.q8_0", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    llama_cpp = os.path.abspath(sys.argv[1])
    sys.path.insert(0, os.path.join(llama_cpp, "gguf-py"))
    import gguf

    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    for name, adapter in ADAPTERS.items():
        convert(llama_cpp, adapter, os.path.join(OUT, f"{name}.gguf"))
    write_values(gguf, os.path.join(OUT, "values.gguf"))


if __name__ == "__main__":
    main()
