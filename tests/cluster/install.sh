#!/usr/bin/env bash
# Install the Debian packages the tests need: the local test cluster's (see tests/cluster/) and
# jemalloc, the ranks' default malloc.
# Fast no-op when everything is already installed; `apt-get update` only when something is missing.
set -euo pipefail

PACKAGES=(
  openssh-server openssh-client iproute2 iputils-ping munge slurm-wlm
  openmpi-bin libopenmpi-dev util-linux procps
  g++ python3-dev numactl nftables
  libjemalloc2  # engine/cpu_alloc.py: the ranks' default malloc (cpu_allocator: auto)
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
  [[ "$status" == ii* ]] || missing+=("$pkg")
done

if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "tests/cluster/install.sh: must run as root to install: ${missing[*]}" >&2
  exit 1
fi

echo "tests/cluster/install.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d keeps the packages' init scripts from starting system-wide daemons
# (sshd, munged, slurmd) that would collide with the cluster's own.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  created_policy=1
fi
trap 'if [[ $created_policy -eq 1 ]]; then rm -f "$policy"; fi' EXIT
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "tests/cluster/install.sh: done" >&2
