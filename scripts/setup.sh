#!/usr/bin/env bash
# Installs everything moe-runtime needs to build and test on Debian 12 (or a close Ubuntu).
# Idempotent: installs only what is missing, so a second run does nothing and needs no network.
# CUDA and NCCL are optional (MOE_CUDA=AUTO uses them when /usr/local/cuda/bin/nvcc exists);
# they come from NVIDIA's repository, not from here.
set -euo pipefail

debian_packages=(
  build-essential cmake ninja-build pkg-config git
  libcaf-dev capnproto libcapnp-dev prometheus-cpp-dev libucx-dev ucx-utils
  nlohmann-json3-dev libyaml-cpp-dev libcli11-dev libspdlog-dev libfmt-dev libopenblas-dev
  libcpp-httplib-dev libssl-dev libgtest-dev libgmock-dev libbenchmark-dev curl python3
  prometheus iproute2
  # `moe chaos link` (random drops where the kernel has no netem): the network fault test
  nftables
  # clang, its sanitizer and libFuzzer runtimes, llvm-symbolizer for their stack traces:
  # scripts/sanitize.sh
  clang libclang-rt-14-dev llvm-14
  # every thread's stack when a test's own watchdog fires (tests/unit/actors/watchdog.hpp)
  gdb
)

missing=()
for p in "${debian_packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} > 0)); then
  sudo_cmd=()
  if [[ $(id -u) -ne 0 ]]; then sudo_cmd=(sudo); fi
  echo "setup: installing ${#missing[@]} Debian package(s): ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
else
  echo "setup: all Debian packages present"
fi

# --- Python: the client package (python/) and its tests (tests/python) -----------------------
# A virtual environment at ${MOE_VENV:-<repo>/.venv} with pycapnp 2.x, pytest and moe_client
# (editable). Each part is installed only when missing, so a second run needs no network.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MOE_VENV:-$root/.venv}"
python_bin="$(command -v python3)"
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  if [[ -e $venv && ! -f $venv/pyvenv.cfg ]]; then
    echo "setup: $venv exists but is no virtual environment; set MOE_VENV elsewhere" >&2
    exit 1
  fi
  rm -rf "$venv"  # a half-made environment (e.g. venv without ensurepip) is made anew
  echo "setup: creating the Python environment $venv"
  if ! "$python_bin" -m venv "$venv" >/dev/null 2>&1; then
    # Debian's own python3 ships venv/ensurepip in a separate package; other Pythons (pyenv,
    # a distribution's python.org build) have it built in.
    if [[ $("$python_bin" -c 'import sys; print(sys.base_prefix)') == /usr ]]; then
      sudo_cmd=()
      if [[ $(id -u) -ne 0 ]]; then sudo_cmd=(sudo); fi
      echo "setup: installing Debian's python3-venv"
      "${sudo_cmd[@]}" apt-get update -qq
      DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq \
        --no-install-recommends python3-venv >/dev/null
      rm -rf "$venv"
      "$python_bin" -m venv "$venv"
    else
      echo "setup: $python_bin cannot create a virtual environment" >&2
      exit 1
    fi
  fi
fi
if ! "$venv/bin/python" -c "import capnp, pytest" 2>/dev/null; then
  echo "setup: installing pycapnp and pytest into $venv"
  "$venv/bin/python" -m pip install -q "pycapnp>=2.0,<3" pytest
fi
if ! "$venv/bin/python" -c "import moe_client" 2>/dev/null; then
  echo "setup: installing moe_client (python/, editable) into $venv"
  "$venv/bin/python" -m pip install -q -e "$root/python"
fi
echo "setup: Python environment $venv ready"
