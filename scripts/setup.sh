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
