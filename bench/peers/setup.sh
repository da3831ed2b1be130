#!/usr/bin/env bash
# Creates .venv-peers/ (the peers' own venv, apart from budgeter's) and installs
# bench/peers/requirements.txt into it; does nothing when litellm is already there.
# Called by bench/bench_peers.py; may be run by hand: bash bench/peers/setup.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/.venv-peers"
if [ -x "$venv/bin/litellm" ]; then
  echo "peers: $venv ready"
  exit 0
fi
echo "peers: creating $venv"
python3 -m venv "$venv"
echo "peers: installing $(grep -v '^#' "$root/bench/peers/requirements.txt" | xargs) (a few minutes)"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/bench/peers/requirements.txt"
echo "peers: installed $("$venv/bin/litellm" --version 2>/dev/null | tail -1 || echo litellm)"
