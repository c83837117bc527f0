#!/usr/bin/env bash
# Installs every prerequisite shunt needs to build and test on a fresh Debian
# 12 machine. Idempotent: a second run only checks and returns quickly.
set -euo pipefail

STABLE=1.99.1
NIGHTLY=nightly-2026-07-15
BPF_LINKER_VERSION=0.13.0
LLVM=22

APT_PKGS=(
  "llvm-${LLVM}-dev" "libpolly-${LLVM}-dev" libzstd-dev zlib1g-dev  # bpf-linker
  bpftool iproute2                                                  # inspection, netns
  dnsutils curl openssl iperf3 python3-h2                           # test clients/peers
  nginx-light dnsmasq-base                                          # demo: httpbin.org stand-in, its DNS
  pkg-config build-essential
)

log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: must run as root (it installs Debian packages)" >&2
  exit 1
fi

missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Packages such as nginx start their service on install; shunt only runs
  # them inside its demo's network namespaces. policy-rc.d (only if the
  # machine has none) keeps the host's port 80 free.
  own_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
fi

have_toolchain() { rustup toolchain list | grep -q "^$1"; }
if ! have_toolchain "$STABLE"; then
  log "installing Rust $STABLE"
  rustup toolchain install "$STABLE" --profile minimal --component rustfmt,clippy
fi
if ! have_toolchain "$NIGHTLY"; then
  log "installing Rust $NIGHTLY with rust-src (kernel crate)"
  rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src
elif ! rustup component list --toolchain "$NIGHTLY" --installed | grep -q rust-src; then
  rustup component add rust-src --toolchain "$NIGHTLY"
fi

if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  log "building bpf-linker $BPF_LINKER_VERSION against LLVM $LLVM (about a minute)"
  LLVM_PREFIX=/usr/lib/llvm-${LLVM} cargo +"$STABLE" install bpf-linker \
    --version "$BPF_LINKER_VERSION" --no-default-features --features "llvm-${LLVM}" --locked
fi

# bpffs: pins live there. Mount it if the machine booted without it.
if ! grep -q ' /sys/fs/bpf bpf ' /proc/mounts; then
  log "mounting bpffs on /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi
log "ok"
