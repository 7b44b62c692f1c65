#!/usr/bin/env bash
# Install SLURM (slurmctld, slurmd, sbatch, ...) and munge from Debian's packages, for the SLURM test
# (tests/test_slurm.py, which starts a one-node cluster with scripts/slurm/local_cluster.sh).
# Debian/Ubuntu only; exits non-zero when it cannot install, and the test then skips.
set -euo pipefail

PATH=$PATH:/usr/sbin:/sbin
if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
    command -v munged >/dev/null; then
    echo "ci_install: SLURM and munge already installed"
    exit 0
fi

command -v apt-get >/dev/null || { echo "ci_install: apt-get not found (not Debian/Ubuntu)" >&2; exit 1; }
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "ci_install: needs root or sudo" >&2; exit 1; }
    sudo="sudo -n"
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "ci_install: apt-get could not install slurm-wlm and munge" >&2
    exit 1
fi
echo "ci_install: installed slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm), munge $(dpkg-query -W -f='${Version}' munge)"
