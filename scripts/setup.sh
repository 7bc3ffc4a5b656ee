#!/usr/bin/env bash
# Set up a fresh machine: Debian packages (as root), the virtual environment at .venv, the aace package.
# Usage: scripts/setup.sh [--test]   (--test also installs Chromium for the book's browser checks, and Slurm
#                                    with munge for the Slurm executor's test)
set -euo pipefail
cd "$(dirname "$0")/.."

debian_packages=()
[[ -d /usr/share/datasets/fashion-mnist ]] || debian_packages+=(dataset-fashion-mnist)
if [[ ${1:-} == --test ]] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then debian_packages+=(chromium chromium-driver); fi
# --test: a single-node Slurm for the Slurm executor's test (tests/slurm_cluster.py starts it)
if [[ ${1:-} == --test ]] && ! { command -v slurmctld && command -v slurmd && command -v munged; } >/dev/null; then debian_packages+=(slurm-wlm munge); fi
if ((${#debian_packages[@]})); then
  if [[ $(id -u) == 0 ]]; then
    apt-get install -y -q "${debian_packages[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${debian_packages[@]}" >/dev/null; }
  else
    echo "Missing Debian packages: ${debian_packages[*]}. Install them with:" >&2
    echo "  sudo apt-get install ${debian_packages[*]}" >&2
    echo "(or give Fashion-MNIST's IDX files another way: see README, 'Data')" >&2
  fi
fi

stamp=.venv/.aace-installed
if [[ ! -f $stamp || requirements.txt -nt $stamp || pyproject.toml -nt $stamp ]]; then
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  # torch 2.14.1 and torchvision 0.29.1 install from this machine's disk; pip, not uv or poetry.
  # Byte-compiled on every core afterwards instead of one file at a time by pip: 73 s against 85 on the fast kind.
  # compileall's status is ignored as pip ignores it: a few packages ship files that are not meant to compile.
  .venv/bin/pip install -q --disable-pip-version-check --no-compile -r requirements.txt
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
  .venv/bin/python -m compileall -q -j 0 .venv/lib >/dev/null 2>&1 || :
  touch "$stamp"
fi
