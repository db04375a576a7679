#!/usr/bin/env bash
# The CUDA build checked and measured on a machine with an NVIDIA GPU, in one run:
#   1. the tiny model, 5 optimizer steps (forward, backward, clipping, AdamW) in file order with
#      dropout off, on the CPU (f32, the reference) and on the GPU (f32 and bf16); the per-step
#      losses, gradient norms and the final adapter are compared;
#   2. the 7B-shaped NF4 preset (double quant, bf16 compute, PRoLoRA r 8 as the paper), batch
#      16 × 512, activation checkpointing: step time, tokens/s, model FLOP utilisation
#      (6 · N · tokens / time / peak bf16 rate) and peak GPU memory;
#   3. one summary line per figure, last.
#
#   scripts/gpu-check.sh [PROLORA_BINARY] [OUT_DIR]
#
# The binary comes from scripts/cuda-build.sh (default target-cuda/release/prolora). It needs the
# CUDA 13 runtime libraries (cuBLAS, cuRAND, NVRTC) and the driver; they are looked up under
# /usr/local/cuda and the nvidia-* wheels of the machine's Python. Needs python3 with numpy and
# safetensors for the comparison. Tolerances: f32 GPU vs CPU 1e-4 relative (losses, gradient
# norms, adapter); bf16 GPU vs f32 CPU 2e-2 relative on losses and gradient norms and 1e-1 on the
# adapter after 5 steps (bf16 keeps 8 bits of mantissa; the adapter itself stays f32).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$(realpath "${1:-$ROOT/target-cuda/release/prolora}")
OUT_DIR=${2:-${OUT:-$ROOT/gpu-check-out}}
STEPS_7B=${STEPS_7B:-5}
# Dense bf16 peak of the GPU in TFLOP/s for the MFU (datasheet: H100/H200 SXM 989, A100 312).
PEAK_TFLOPS=${PEAK_TFLOPS:-}
mkdir -p "$OUT_DIR"
cd "$ROOT"

# The CUDA libraries the binary links, wherever this machine keeps them.
libs=()
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [[ -d $d ]] && libs+=("$d")
done
for site in $(python3 -c 'import site,sys; print(" ".join(site.getsitepackages()+[site.getusersitepackages()]))' 2>/dev/null); do
    for d in "$site"/nvidia/cu13/lib "$site"/nvidia/*/lib; do
        [[ -d $d ]] && libs+=("$d")
    done
done
export LD_LIBRARY_PATH="$(IFS=:; echo "${libs[*]:-}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if ! command -v nvidia-smi >/dev/null; then
    echo "gpu-check: nvidia-smi not found: this machine has no NVIDIA driver" >&2
    exit 1
fi
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "== $GPU; binary $BIN"
if [[ -z $PEAK_TFLOPS ]]; then
    case $GPU in
        *H100* | *H200* | *H800* | *GH200*) PEAK_TFLOPS=989 ;;
        *A100* | *A800*) PEAK_TFLOPS=312 ;;
        *L40S*) PEAK_TFLOPS=362 ;;
        *) PEAK_TFLOPS=0 ;;
    esac
fi
"$BIN" --version

# --- 1. CPU vs GPU on the tiny model -------------------------------------------------------
tiny() { # NAME DEVICE DTYPE
    "$BIN" train --config configs/demo.toml --quiet --overwrite --device "$2" \
        --set output_dir="$OUT_DIR/tiny-$1" --set model.dtype="$3" --set train.steps=5 \
        --set train.eval_every=0 --set data.order=file --set adapter.dropout=0 \
        --set train.log_every=1 >"$OUT_DIR/tiny-$1.log" 2>&1 ||
        { cat "$OUT_DIR/tiny-$1.log"; exit 1; }
}
tiny cpu cpu f32
tiny gpu-f32 cuda f32
tiny gpu-bf16 cuda bf16

python3 - "$OUT_DIR" >"$OUT_DIR/compare.txt" <<'EOF'
import json, sys
import numpy as np
from safetensors.numpy import load_file
out = sys.argv[1]

def run(name):
    rows = [json.loads(l) for l in open(f"{out}/tiny-{name}/metrics.jsonl") if l.strip()]
    steps = [r for r in rows if "loss" in r and "eval_loss" not in r]
    return steps, load_file(f"{out}/tiny-{name}/adapter_model.safetensors")

ref, ref_w = run("cpu")
for name, tol_scalar, tol_w in [("gpu-f32", 1e-4, 1e-4), ("gpu-bf16", 2e-2, 1e-1)]:
    got, got_w = run(name)
    loss = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(got, ref))
    gnorm = max(abs(a["grad_norm"] - b["grad_norm"]) / abs(b["grad_norm"]) for a, b in zip(got, ref))
    # Relative L2 distance of each adapter tensor that moved from its init, worst one.
    w = max(np.linalg.norm(got_w[k] - ref_w[k]) / max(np.linalg.norm(ref_w[k]), 1e-30) for k in ref_w)
    ok = loss <= tol_scalar and gnorm <= tol_scalar and w <= tol_w and len(got) == len(ref)
    print(f"{'PASS' if ok else 'FAIL'} tiny {name} vs cpu f32 over {len(ref)} steps: "
          f"loss {loss:.2e}, grad norm {gnorm:.2e} (tol {tol_scalar:g}); adapter {w:.2e} (tol {tol_w:g})")
EOF
cat "$OUT_DIR/compare.txt"

# --- 2. The 7B-shaped NF4 step at 16 × 512 -------------------------------------------------
python3 - "$OUT_DIR/long.jsonl" <<'EOF'
import json, random, sys
rng = random.Random(0)
words = "the of and to in is was for on that with as by at from his her an which were are".split()
words += "model train data token layer weight value paper table result method rank share".split()
with open(sys.argv[1], "w") as f:
    for _ in range(64):
        answer = " ".join(rng.choice(words) for _ in range(900))
        f.write(json.dumps({"messages": [{"role": "user", "content": "Continue."},
                                         {"role": "assistant", "content": answer}]}) + "\n")
EOF
cat >"$OUT_DIR/7b.toml" <<EOF
seed = 1
output_dir = "$OUT_DIR/run-7b"
device = "cuda"
[model]
source = "llama2-7b"
quantize = "nf4"
double_quant = true
dtype = "bf16"
[adapter]
kind = "prolora"
rank = 8
unshared_rank = 1
sharing_rate_a = 7
sharing_rate_b = 7
alpha = 16
dropout = 0.1
[data]
train = "$OUT_DIR/long.jsonl"
max_seq_len = 512
cache = false
[optim]
lr = 2e-4
max_grad_norm = 0.3
[train]
steps = $STEPS_7B
batch_size = 16
gradient_checkpointing = true
log_every = 1
EOF
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$OUT_DIR/smi-memory.txt" &
SMI=$!
"$BIN" train --config "$OUT_DIR/7b.toml" --quiet --overwrite >"$OUT_DIR/7b.log" 2>&1 ||
    { kill $SMI; cat "$OUT_DIR/7b.log"; exit 1; }
kill $SMI || true

python3 - "$OUT_DIR" "$PEAK_TFLOPS" "$GPU" >"$OUT_DIR/summary.txt" <<'EOF'
import json, statistics, sys
out, peak, gpu = sys.argv[1], float(sys.argv[2]), sys.argv[3]
rows = [json.loads(l) for l in open(f"{out}/run-7b/metrics.jsonl") if l.strip()]
steps = [r for r in rows if "loss" in r and "eval_loss" not in r]
# The first step compiles the kernels and warms cuBLAS: timed steps are the later ones.
times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:])]
step_s = statistics.median(times)
tokens = 16 * 512
# Parameters of the LLaMA-2-7B shape: 32 blocks of 4·d² + 3·d·f, embeddings, head, norms.
d, f, L, V = 4096, 11008, 32, 32000
n = L * (4 * d * d + 3 * d * f + 2 * d) + 2 * V * d + d
flops = 6 * n * tokens
mfu = flops / step_s / (peak * 1e12) if peak else float("nan")
smi = [int(x) for x in open(f"{out}/smi-memory.txt").read().split() if x.strip().isdigit()]
print(f"7B-shaped NF4 step ({gpu}, 16 x 512, bf16, checkpointing, PRoLoRA r8): {step_s:.3f} s "
      f"median of {len(times)} (steps {[round(t, 3) for t in times]})")
print(f"tokens/s: {tokens / step_s:.0f}")
print(f"MFU: {100 * mfu:.1f} % (6 x {n / 1e9:.2f}e9 params x {tokens} tokens, peak {peak:g} TFLOP/s)")
print(f"peak GPU memory: {steps[-1].get('peak_device_mib') or float('nan'):.0f} MiB allocated "
      f"(stream-ordered pool high-water mark); nvidia-smi max {max(smi) if smi else float('nan')} MiB")
print(f"losses: {[round(s['loss'], 4) for s in steps]}")
EOF
echo "== summary"
cat "$OUT_DIR/compare.txt" "$OUT_DIR/summary.txt"
