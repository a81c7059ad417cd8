#!/usr/bin/env bash
# On the offline GPU device machine, after ../shared/gpu/make-kit.sh's kit is
# installed into /tmp/site: install this package (plugin entry point included)
# there too. No network, so no build isolation; setuptools is on the image.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . 2>&1 \
  | grep -iv "warning\|already exists" || true
cd /tmp && python3 - <<'PY'
from importlib.metadata import entry_points
import vllm_kvcomp.kernels.triton_decode  # noqa: F401
eps = [e.value for e in entry_points(group="vllm.general_plugins") if e.name == "kvcomp"]
assert eps, "vllm-kvcomp's plugin entry point is not visible"
print("vllm-kvcomp installed; plugin entry point:", eps[0])
PY
