"""GGUF reader and dequantization goldens, written with llama.cpp's own Python package (gguf).

Writes tests/fixtures/gguf/:
  quants.gguf             one tensor per ggml type (3 rows of 512), metadata of every value type,
                          alignment 64; written by gguf.GGUFWriter
  quants_dequantized.gguf the same tensors as F32, each gguf.quants.dequantize(stored bytes)
  quants.json             the metadata and tensor infos the script wrote (what a reader must see)

F32/F16/BF16/Q8_0/Q4_0/Q4_1 hold gguf.quants.quantize of normal data; Q4_K/Q5_K/Q6_K (which the
package cannot quantize) hold random bytes with finite f16 scales, since the dequantization is what
is under test. Deterministic (seeded). Run from the repository root:
    python scripts/reference/make_gguf_goldens.py
"""
import json
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

OUT = Path("tests/fixtures/gguf")
ROWS, COLS = 3, 512
ALIGNMENT = 64

rng = np.random.default_rng(22)


def f16_bytes(values):
    return np.asarray(values, dtype=np.float16).view(np.uint8)


def random_k_blocks(qtype, n_blocks):
    """Random bytes in `qtype`'s block layout, with the f16 super-block scales finite."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    scales = f16_bytes(rng.normal(0, 0.01, size=(n_blocks, 2))).reshape(n_blocks, 4)
    if qtype in (T.Q4_K, T.Q5_K):  # d, dmin first
        blocks[:, 0:4] = scales
    elif qtype == T.Q6_K:  # d last
        blocks[:, -2:] = scales[:, 0:2]
    return blocks


def tensors():
    data = rng.normal(0, 0.05, size=(ROWS, COLS)).astype(np.float32)
    data[0, :32] = 0  # an all-zero block (scale 0)
    out = {}
    for qtype in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1):
        out[qtype] = quantize(data, qtype)
    block_size, _ = gguf.GGML_QUANT_SIZES[T.Q4_K]
    for qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
        n_blocks = ROWS * COLS // block_size
        out[qtype] = random_k_blocks(qtype, n_blocks).reshape(ROWS, -1)
    return out


# (key, GGUFValueType, value, array element type)
METADATA = [
    ("test.u8", gguf.GGUFValueType.UINT8, 200, None),
    ("test.i8", gguf.GGUFValueType.INT8, -100, None),
    ("test.u16", gguf.GGUFValueType.UINT16, 60000, None),
    ("test.i16", gguf.GGUFValueType.INT16, -30000, None),
    ("test.u32", gguf.GGUFValueType.UINT32, 4000000000, None),
    ("test.i32", gguf.GGUFValueType.INT32, -2000000000, None),
    ("test.f32", gguf.GGUFValueType.FLOAT32, 0.1, None),
    ("test.bool", gguf.GGUFValueType.BOOL, True, None),
    ("test.string", gguf.GGUFValueType.STRING, "héllo ☃ <|im_start|>", None),
    ("test.u64", gguf.GGUFValueType.UINT64, 2**63 + 5, None),
    ("test.i64", gguf.GGUFValueType.INT64, -(2**62), None),
    ("test.f64", gguf.GGUFValueType.FLOAT64, -2.5e-300, None),
    ("test.strings", gguf.GGUFValueType.ARRAY, ["a", "", "Ġthe", "日本"], gguf.GGUFValueType.STRING),
    ("test.f32s", gguf.GGUFValueType.ARRAY, [0.5, -1.25, 3e-8], gguf.GGUFValueType.FLOAT32),
    ("test.i32s", gguf.GGUFValueType.ARRAY, [1, -2, 3], gguf.GGUFValueType.INT32),
    ("test.nested", gguf.GGUFValueType.ARRAY, [[1, 2], [3]], gguf.GGUFValueType.ARRAY),
]


def as_json(vtype, value):
    if vtype == gguf.GGUFValueType.FLOAT32:  # what the file holds, widened exactly
        return [float(np.float32(v)) for v in value] if isinstance(value, list) else float(np.float32(value))
    return value


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    stored = tensors()

    w = gguf.GGUFWriter(OUT / "quants.gguf", arch="test")
    w.add_custom_alignment(ALIGNMENT)
    for key, vtype, value, sub in METADATA:
        if vtype == gguf.GGUFValueType.ARRAY and sub == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype)
        else:
            w.add_key_value(key, value, vtype, sub_type=sub)
    for qtype, data in stored.items():
        w.add_tensor(qtype.name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    w = gguf.GGUFWriter(OUT / "quants_dequantized.gguf", arch="test")
    for qtype, data in stored.items():
        w.add_tensor(qtype.name, dequantize(data, qtype).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    meta = [
        {"key": k, "type": v.name, "value": as_json(sub or v, val), "item_type": sub.name if sub else None}
        for k, v, val, sub in METADATA
    ]
    infos = [{"name": q.name, "type": q.name, "shape": [ROWS, COLS]} for q in stored]
    expected = {
        "alignment": ALIGNMENT,
        "architecture": "test",
        "metadata": meta,
        "tensors": infos,
    }
    (OUT / "quants.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
