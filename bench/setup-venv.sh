#!/usr/bin/env bash
# Create bench/.venv: CPU PyTorch + transformers + safetensors + numpy +
# onnxruntime + onnx (+ onnxscript, which torch.onnx.export needs) + peft (for
# loading LoRA adapter directories), for the reference checks and benchmarks
# under bench/ and scripts/hf_roundtrip.py.
#
# Usage: bench/setup-venv.sh            (idempotent: a working venv is kept)
#        FORCE=1 bench/setup-venv.sh    (reinstall into the existing venv)
#
# Route (PyPI only; download.pytorch.org is not reachable from here):
#   PyPI's only x86-64 Linux torch wheel is the CUDA build (~540 MB), whose
#   dependencies add ~1.8 GB of nvidia-*/triton wheels that a CPU run never
#   uses. So: install torch with --no-deps, add its pure-python dependencies by
#   hand, and let bench/torch_cpu_stubs.py compile tiny stub libraries for the
#   CUDA libraries torch's .so files link against (libcudart, libcublas,
#   libcudnn, ...; ~2,400 symbols, a few hundred KB). torch then imports and
#   reports torch.cuda.is_available() == False. Needs gcc and readelf
#   (apt-get install -y gcc binutils). CPU only: never use this venv on a GPU
#   machine (the stubs would shadow the CUDA driver library).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
py="${PYTHON:-python3}"

TORCH_VERSION="${TORCH_VERSION:-2.15.0}"
# Pure-python requirements of torch (its Requires-Dist minus cuda/nvidia/triton).
TORCH_PY_DEPS=(filelock 'typing-extensions>=4.13.0' 'setuptools>=77.0.3' 'sympy>=1.13.3'
               'networkx>=2.5.1' jinja2 'fsspec>=0.8.5')
# Versions checked together on this machine (2 cores, Python 3.11).
PKGS=(transformers==5.24.0 safetensors==0.8.0 numpy==2.4.6 onnxruntime==1.32.0
      onnx==1.23.2 onnxscript==0.7.2)
# peft and accelerate (which peft imports) require torch, so a normal install
# would pull torch's nvidia-*/triton dependencies back in: install them
# --no-deps, and their requirements that the packages above do not already
# bring (numpy, packaging, pyyaml, tqdm, huggingface_hub, safetensors) by hand.
PEFT_PKGS=(peft==0.21.2 accelerate==1.15.0)
PEFT_DEPS=(psutil==7.2.2)

say() { printf '[setup-venv] %s\n' "$*"; }
die() { printf '[setup-venv] ERROR: %s\n' "$*" >&2; exit 1; }

verify() {
    "$venv/bin/python" - <<'EOF'
import importlib.metadata as md, sys
import torch
a = torch.randn(2, 2) @ torch.randn(2, 2)
assert a.shape == (2, 2)
assert not torch.cuda.is_available(), "expected a CPU-only torch"
import transformers, safetensors, numpy, onnxruntime, onnx, peft  # noqa: F401
from onnxruntime.transformers import optimizer  # noqa: F401
nv = sorted(d.metadata["Name"] for d in md.distributions()
            if d.metadata["Name"].lower().startswith(("nvidia", "triton", "cuda-")))
assert not nv, f"CUDA packages installed: {nv}"
print(f"[setup-venv] ok: torch {torch.__version__} (threads {torch.get_num_threads()}), "
      f"transformers {transformers.__version__}, onnxruntime {onnxruntime.__version__}, "
      f"onnx {onnx.__version__}, numpy {numpy.__version__}, safetensors {safetensors.__version__}, "
      f"peft {peft.__version__}")
EOF
}

start=$(date +%s)

if [[ -x "$venv/bin/python" && -z "${FORCE:-}" ]] && verify 2>/dev/null; then
    say "$venv already set up (FORCE=1 to reinstall)"
    exit 0
fi

command -v gcc >/dev/null || die "gcc not found (apt-get install -y gcc)"
command -v readelf >/dev/null || die "readelf not found (apt-get install -y binutils)"

if [[ ! -x "$venv/bin/python" ]]; then
    say "creating $venv with $($py --version 2>&1)"
    "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

say "installing torch==$TORCH_VERSION --no-deps (the PyPI CUDA wheel, ~540 MB; skipping ~1.8 GB of nvidia-* deps)"
"${pip[@]}" install --no-deps "torch==$TORCH_VERSION"
say "installing torch's pure-python dependencies"
"${pip[@]}" install "${TORCH_PY_DEPS[@]}"
say "installing ${PKGS[*]}"
"${pip[@]}" install "${PKGS[@]}"
say "installing ${PEFT_PKGS[*]} --no-deps, ${PEFT_DEPS[*]}"
"${pip[@]}" install --no-deps "${PEFT_PKGS[@]}"
"${pip[@]}" install "${PEFT_DEPS[@]}"

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
say "building CUDA stub libraries into $site/torch/lib"
"$venv/bin/python" "$here/torch_cpu_stubs.py" "$site"

verify || die "verification failed"
say "done in $(( $(date +%s) - start ))s; venv size $(du -sh "$venv" | cut -f1)"
