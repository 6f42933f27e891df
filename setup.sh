#!/bin/sh
# Install this project (editable, with the dev and float8 extras) for the Makefile's targets.
#
#   ./setup.sh PYTHON            install into PYTHON's environment (an active virtual or conda env)
#   ./setup.sh PYTHON ENV_DIR    install into ENV_DIR, a virtual environment created from PYTHON if absent
#
# ENV_DIR keeps system Pythons that refuse pip installs (PEP 668: Debian 12, Ubuntu 24.04) untouched.
# An installed torch is reused where it can be: a base PYTHON with torch 2.11-2.13 gives ENV_DIR its
# site-packages; otherwise exactly torch==2.13.0 is installed, so pip never picks a newer (CUDA) build.
set -eu

base=$1
env_dir=${2:-}

# torch_fits PY: whether PY imports a torch within the project's range (>=2.11,<2.14).
torch_fits() {
    "$1" -c 'import sys, torch; sys.exit(not (2, 11) <= tuple(map(int, torch.__version__.split(".")[:2])) < (2, 14))' \
        2>/dev/null
}

# create_env: ENV_DIR as a virtual environment of $base, seeing $base's packages when its torch fits.
create_env() {
    if ! "$base" -c 'import venv, ensurepip' 2>/dev/null; then
        fix="install it (Debian/Ubuntu: sudo apt install python3-venv) or activate a virtual or conda environment"
        echo "error: $base cannot create $env_dir: no venv/ensurepip module. Fix: $fix, then rerun make." >&2
        exit 1
    fi
    site=""
    if torch_fits "$base"; then site=--system-site-packages; fi
    echo "setup: creating $env_dir from $base $site (to run commands yourself: . $env_dir/bin/activate)"
    "$base" -m venv $site "$env_dir" || { rm -rf "$env_dir"; exit 1; }
}

if [ -n "$env_dir" ]; then
    [ -x "$env_dir/bin/python" ] || create_env
    py=$env_dir/bin/python
else
    py=$base
fi
torch_fits "$py" || "$py" -m pip install -q "torch==2.13.0"
"$py" -m pip install -q -e ".[dev,float8]"
