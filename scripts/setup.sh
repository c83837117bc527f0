#!/usr/bin/env bash
# Installs every prerequisite shunt needs to build and test on a fresh Debian
# 12 machine. Idempotent: a second run only checks and returns quickly.
set -euo pipefail

STABLE=1.99.1
NIGHTLY=nightly-2026-07-15
BPF_LINKER_VERSION=0.13.0
CARGO_DENY_VERSION=0.20.2
LLVM=22
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# The RustSec advisory database has no network source here: a snapshot sits
# next to the checkout. cargo-deny reads it from deny.toml's db-path, as a git
# repository named for the default URL.
ADVISORY_SRC="$(cd "$ROOT/.." && pwd)/shared/advisory-db"
# Its db-path in deny.toml is cargo-deny's default, $CARGO_HOME/advisory-dbs.
ADVISORY_DB="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs/advisory-db-3157b0e258782691"

APT_PKGS=(
  "llvm-${LLVM}-dev" "libpolly-${LLVM}-dev" libzstd-dev zlib1g-dev  # bpf-linker
  bpftool iproute2                                                  # inspection, netns
  dnsutils curl openssl iperf3 python3-h2                           # test clients/peers
  haproxy wrk sockperf                                              # cargo xtask bench: the plain hop, HTTP load, latency
  python3-venv python3-pip                                          # kubernetes-validate (manifests)
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

if ! cargo-deny --version 2>/dev/null | grep -q " $CARGO_DENY_VERSION\$"; then
  log "building cargo-deny $CARGO_DENY_VERSION (about 3 minutes)"
  cargo +"$STABLE" install cargo-deny --version "$CARGO_DENY_VERSION" --locked
fi

# Copy the snapshot only when it is missing or changed (a stamp of names,
# sizes and times), committed so cargo-deny sees a git repository. Built
# aside and renamed into place: a concurrent cargo deny never sees half a copy.
if [ ! -d "$ADVISORY_SRC/crates" ]; then
  echo "setup.sh: no RustSec advisory database snapshot at $ADVISORY_SRC" >&2
  echo "  (expected ../shared/advisory-db next to the checkout; cargo deny needs it)" >&2
  exit 1
fi
stamp="$(cd "$ADVISORY_SRC" && find . -path ./.git -prune -o -type f -printf '%P %s %T@\n' | sort | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$ADVISORY_DB.stamp" 2>/dev/null)" != "$stamp" ]; then
  log "copying the advisory database snapshot into $ADVISORY_DB"
  tmp="$ADVISORY_DB.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  cp -a "$ADVISORY_SRC/." "$tmp/"
  chmod -R u+w "$tmp"
  rm -rf "$tmp/.git"
  git -C "$tmp" init -q
  git -C "$tmp" add -A
  git -C "$tmp" -c user.name=shunt-setup -c user.email=setup@shunt.invalid \
    commit -q -m "RustSec advisory-db snapshot from $ADVISORY_SRC"
  rm -rf "$ADVISORY_DB"
  mv "$tmp" "$ADVISORY_DB"
  echo "$stamp" > "$ADVISORY_DB.stamp"
fi
# `cargo deny --offline` runs `cargo metadata`, which needs every crate of the
# lockfile local: fetch once per lockfile.
lock="$(sha256sum "$ROOT/Cargo.lock" | cut -d' ' -f1)"
if [ "$(cat "$ROOT/target/fetched.stamp" 2>/dev/null)" != "$lock" ]; then
  log "fetching the crates of Cargo.lock"
  (cd "$ROOT" && cargo +"$STABLE" fetch --locked -q)
  mkdir -p "$ROOT/target"
  echo "$lock" > "$ROOT/target/fetched.stamp"
fi

# Offline validation of the deploy/ manifests against Kubernetes' OpenAPI
# schemas (bundled in the package; no cluster or network at test time), in
# its own virtualenv: Debian's python3 is externally managed (PEP 668). A
# lock keeps concurrent setups from building it twice.
KUBERNETES_VALIDATE_VERSION=1.37.0
PYTOOLS=/opt/shunt-pytools
have_kv() { "$PYTOOLS/bin/python" -m pip show kubernetes-validate 2>/dev/null | grep -qx "Version: ${KUBERNETES_VALIDATE_VERSION}"; }
if ! have_kv; then
  (
    flock 9
    if ! have_kv; then
      log "installing kubernetes-validate ${KUBERNETES_VALIDATE_VERSION} into $PYTOOLS (pip)"
      rm -rf "$PYTOOLS"
      /usr/bin/python3 -m venv "$PYTOOLS"
      "$PYTOOLS/bin/python" -m pip install -q --disable-pip-version-check "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"
    fi
  ) 9>/tmp/shunt-pytools.lock
fi

# bpffs: pins live there. Mount it if the machine booted without it.
if ! grep -q ' /sys/fs/bpf bpf ' /proc/mounts; then
  log "mounting bpffs on /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi
log "ok"
