#!/usr/bin/env python3
"""4-bit model goldens with transformers + PEFT + bitsandbytes (CPU backend).

Run from the repository root after make_goldens.py (it reads the fixtures that script writes):

    python scripts/reference/make_nf4_model_goldens.py

Writes (after deleting them first):

    tests/fixtures/peft-lora-nf4/expected.json
        the loss of tests/fixtures/peft-lora (f16 base + PEFT LoRA adapter, the same encoded
        examples) with the base loaded by
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        with and without the adapter (`loss`, `loss_base`), computed as make_goldens.py does.
    tests/fixtures/bnb-4bit-gqa/
        tests/fixtures/llama-gqa quantized the same way and written by transformers'
        save_pretrained: a pre-quantized bitsandbytes checkpoint as users have them
        (`<layer>.weight` u8 + `.absmax`, `.quant_map`, `.nested_absmax`, `.nested_quant_map`,
        `.quant_state.bitsandbytes__nf4`), plus golden.safetensors: `input_ids`, `logits` of the
        4-bit model, and `dequant.<layer>.weight` = bitsandbytes' dequantize_4bit of every layer.

bitsandbytes on a CPU with AVX512-BF16 (this machine's) switches Linear4bit, in eval mode
without autograd, to a repacked kernel that first rounds the block scales to bf16 — a CPU-only
shortcut that differs from what the CUDA kernels (and the quantization contract, docs/methods.md §5)
compute. We turn it off (`support_avx512bf16_for_cpu = False`) so the layers run bitsandbytes'
reference path: dequantize_4bit to the compute dtype, then a matmul.

bitsandbytes 0.50.2's CPU kernel for 2-D `dequantize_4bit` misplaces the block scales when the row
width is an odd multiple of 32 and there is more than one block (e.g. (16, 32), (4, 96), (2, 160);
found here, checked against its own 1-D call and against NF4[code] · absmax of block k div 64).
Both fixtures have such layers (hidden 32; down_proj of width 96). Real LLaMA widths are
multiples of 64 and never hit it. The script therefore routes every CPU dequantization through
bitsandbytes' own kernel on the flattened tensor (`flat_dequantize_4bit`), which follows the
contract, and asserts for every layer that this equals the contract computed independently.

The nested (8-bit) step of double quantization in bitsandbytes' CPU kernel uses a lookup table that
may pick a neighbouring code near a midpoint; the script counts, per layer, where that differs from
the exact nearest code (what prolora and the CUDA kernel compute) and stores the count.
"""

import copy
import json
import os
import shutil

import torch
import torch.nn.functional as F
import bitsandbytes
import bitsandbytes.functional as bnbF
from bitsandbytes._ops import register_kernel
from safetensors.torch import load_file, save_file
from transformers import BitsAndBytesConfig, LlamaForCausalLM
from peft import PeftModel

FIXTURES = "tests/fixtures"

_dequantize_4bit = bnbF.dequantize_4bit


def flat_dequantize_4bit(A, quant_state=None, *args, **kwargs):
    """bitsandbytes' dequantize_4bit on the flattened tensor, reshaped (see the module doc)."""
    shape = quant_state.shape
    flat = copy.copy(quant_state)
    flat.shape = torch.Size([shape.numel()])
    return _dequantize_4bit(A, flat, *args, **kwargs).reshape(shape)


bnbF.dequantize_4bit = flat_dequantize_4bit  # MatMul4Bit.backward calls it through the module


@register_kernel("bitsandbytes::gemm_4bit", "cpu")
def _flat_gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None,
                    absmax_code=None, absmax_offset=None):
    """bitsandbytes' default gemm_4bit (backends/default/ops.py), dequantizing the flattened weight."""
    if absmax_8bit is not None:
        absmax = (
            torch.ops.bitsandbytes.dequantize_blockwise.default(absmax_8bit, absmax, absmax_code, 256, torch.float32)
            + absmax_offset
        )
    numel = shapeB[0] * shapeB[1]
    B_dq = torch.ops.bitsandbytes.dequantize_4bit.default(B, absmax, blocksize, quant_type, [numel], A.dtype)
    return torch.nn.functional.linear(A, B_dq.reshape(shapeB), bias)


def check_contract(model):
    """Every layer's dequantization equals NF4[code] · absmax[k div 64], computed in torch."""
    for name, m in linears4(model):
        st = m.weight.quant_state
        packed = m.weight.data.flatten()
        codes = torch.stack([packed >> 4, packed & 15], dim=1).flatten().long()[: st.shape.numel()]
        absmax = bnbF.dequantize_blockwise(st.absmax, st.state2) + st.offset
        want = st.code.float()[codes] * absmax.float().repeat_interleave(64)[: codes.numel()]
        got = bnbF.dequantize_4bit(m.weight.data, st).flatten()
        assert torch.equal(got, want), name

torch.set_num_threads(1)

BNB = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.float32,
)


def fresh_dir(path):
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)


def load_4bit(path):
    model = LlamaForCausalLM.from_pretrained(
        path, quantization_config=BNB, dtype=torch.float32, attn_implementation="eager", device_map="cpu"
    )
    n = 0
    for m in model.modules():
        if isinstance(m, bitsandbytes.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    assert n == 7 * model.config.num_hidden_layers, n
    return model.eval()


def linears4(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]


def nested_mismatches(model, checkpoint_dir):
    """Blocks where bitsandbytes' CPU nested code differs from the exact nearest code, recomputed
    from the checkpoint's own weights."""
    weights = load_file(os.path.join(checkpoint_dir, "model.safetensors"))
    out = 0
    for name, m in linears4(model):
        st = m.weight.quant_state
        w = weights[name + ".weight"].float()
        _, plain = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        a = plain.absmax.float() - st.offset
        nested = st.state2.absmax.float()
        scaled = torch.cat([a[i:i + 256] * (1.0 / nested[i // 256]) for i in range(0, a.numel(), 256)])
        nearest = (scaled[:, None] - st.state2.code.float()[None, :]).abs().argmin(dim=1)
        out += int((nearest.to(torch.uint8) != st.absmax.flatten()).sum())
    return out


def lm_loss_sum(model, input_ids, labels):
    """As make_goldens.py: sum (f64) of token cross-entropies at label positions, HF shift."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(input_ids).unsqueeze(0)).logits[0].float()
    shift_logits = logits[:-1].double()
    shift_labels = torch.tensor(labels[1:])
    mask = shift_labels != -100
    ce = F.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="none")
    return ce.sum().item(), int(mask.sum().item())


def make_peft_lora_nf4():
    src = os.path.join(FIXTURES, "peft-lora")
    out = os.path.join(FIXTURES, "peft-lora-nf4")
    fresh_dir(out)
    with open(os.path.join(src, "expected.json")) as f:
        examples = json.load(f)["examples"]
    adapted = PeftModel.from_pretrained(load_4bit(os.path.join(src, "base")), os.path.join(src, "adapter")).eval()
    bare = load_4bit(os.path.join(src, "base"))
    check_contract(bare)
    total = total_base = 0.0
    tokens = 0
    for e in examples:
        s, n = lm_loss_sum(adapted, e["input_ids"], e["labels"])
        sb, _ = lm_loss_sum(bare, e["input_ids"], e["labels"])
        total, total_base, tokens = total + s, total_base + sb, tokens + n
    expected = {
        "quantization": "nf4, double quant, compute dtype float32 (BitsAndBytesConfig)",
        "produced_with": {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__},
        "loss": total / tokens,
        "loss_base": total_base / tokens,
        "tokens": tokens,
        "nested_codes_bnb_cpu_vs_nearest_differ": nested_mismatches(bare, os.path.join(src, "base")),
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    print("peft-lora-nf4:", expected)


def make_bnb_4bit_gqa():
    src = os.path.join(FIXTURES, "llama-gqa")
    out = os.path.join(FIXTURES, "bnb-4bit-gqa")
    fresh_dir(out)
    model = load_4bit(src)
    check_contract(model)
    model.save_pretrained(out, safe_serialization=True)
    golden = {}
    input_ids = load_file(os.path.join(src, "golden.safetensors"))["input_ids"]
    with torch.no_grad():
        golden["logits"] = model(input_ids=input_ids).logits.float().contiguous()
    golden["input_ids"] = input_ids
    for name, m in linears4(model):
        golden[f"dequant.{name}.weight"] = bnbF.dequantize_4bit(m.weight.data, m.weight.quant_state).float().contiguous()
    save_file(golden, os.path.join(out, "golden.safetensors"))
    # The written checkpoint loads back in transformers with the same logits.
    again = load_4bit(out)
    with torch.no_grad():
        assert torch.equal(again(input_ids=input_ids).logits.float(), golden["logits"])
    print("bnb-4bit-gqa:", sorted(os.listdir(out)))


if __name__ == "__main__":
    make_peft_lora_nf4()
    make_bnb_4bit_gqa()
