#!/usr/bin/env python3
"""NF4 goldens for shapes tests/fixtures/nf4 does not cover, straight from bitsandbytes' CPU backend.

Run from the repository root (bitsandbytes 0.50.2, torch 2.15, CPU):

    python scripts/reference/make_nf4_goldens.py

Writes tests/fixtures/nf4-partial/: element counts that are not a multiple of 64 (a partial last
block), odd element counts (a padding nibble), and a nested block holding a single absmax. Keys as
in tests/fixtures/nf4/README.md; the double-quantized keys are bitsandbytes' CPU output (`_bnb_cpu`)
and `nested_near_tie_indices` lists the blocks whose scaled absmax lies within 3e-5 of a midpoint
of the dynamic map (where bitsandbytes' CPU lookup table may pick the neighbour of the exact
nearest code, and where the last bit of the mean may flip the choice).
"""

import json
import os
import shutil

import torch
import bitsandbytes
import bitsandbytes.functional as F
from safetensors.torch import save_file

OUT = "tests/fixtures/nf4-partial"
CASES = [
    ("partial_3x50", (3, 50), 1),     # 150 values: 2 full blocks + 22
    ("odd_5x13", (5, 13), 2),         # 65 values: a block of one, a padding nibble
    ("nested_one_7x2345", (7, 2345), 3),  # 257 blocks: the second nested block holds one absmax
]


def main():
    torch.set_num_threads(1)
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    index = {"produced_with": {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__},
             "blocksize": 64, "cases": []}
    for name, shape, seed in CASES:
        g = torch.Generator().manual_seed(seed)
        x = (0.02 * torch.randn(shape, generator=g)).contiguous()
        q, st = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=False)
        qd, sd = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.equal(q, qd), "plain and double-quantized calls give the same 4-bit codes"
        dmap = sd.state2.code.float()
        scaled = st.absmax - sd.offset  # f32
        nested = sd.state2.absmax.float()
        blocks = st.absmax.numel()
        near = []
        mids = (dmap[1:] + dmap[:-1]) * 0.5
        for b in range(blocks):
            s = scaled[b] * (1.0 / nested[b // 256])
            if (mids - s).abs().min().item() < 3e-5:
                near.append(b)
        t = {
            "input": x,
            "nf4_code": st.code.float().contiguous(),
            "packed": q.flatten().contiguous(),
            "absmax": st.absmax.float().contiguous(),
            "dequant": F.dequantize_4bit(q, st).float().contiguous(),
            "dq.offset": torch.tensor([float(sd.offset)], dtype=torch.float32),
            "dq.nested_absmax": nested.contiguous(),
            "dq.nested_code": dmap.contiguous(),
            "dq.absmax_code_bnb_cpu": sd.absmax.flatten().contiguous(),
            "dq.absmax_dequant_bnb_cpu": (F.dequantize_blockwise(sd.absmax, sd.state2) + sd.offset).float().contiguous(),
            "dq.dequant_bnb_cpu": F.dequantize_4bit(qd, sd).float().contiguous(),
        }
        file = f"{name}.safetensors"
        save_file(t, os.path.join(OUT, file))
        index["cases"].append({"name": name, "file": file, "shape": list(shape), "n_blocks": blocks,
                               "nested_near_tie_indices": near})
        print(name, shape, "blocks", blocks, "packed", q.numel(), "near ties", near)
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(index, f, indent=1)


if __name__ == "__main__":
    main()
