"""Adapters for serving benchmarks: copies of trained adapter directories (any method) with
every tensor redrawn U(-scale, scale), so each copy moves the logits as a trained one would.

    python scripts/bench/serve_adapters.py --out ADAPTERS --copies 2 RUN_DIR_A RUN_DIR_B ...

writes ADAPTERS/<run dir name>-<k>/{adapter_config.json, adapter_model.safetensors}.
"""

import argparse
import pathlib
import shutil

import numpy as np
from safetensors.numpy import load_file, save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--scale", type=float, default=0.3)
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for run in map(pathlib.Path, args.runs):
        tensors = load_file(run / "adapter_model.safetensors")
        for k in range(args.copies):
            out = pathlib.Path(args.out) / f"{run.name}-{k}"
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(run / "adapter_config.json", out / "adapter_config.json")
            redrawn = {n: rng.uniform(-args.scale, args.scale, t.shape).astype(np.float32)
                       for n, t in tensors.items()}
            save_file(redrawn, out / "adapter_model.safetensors")
            print(out)


if __name__ == "__main__":
    main()
