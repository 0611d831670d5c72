#!/usr/bin/env bash
# The GPU checks, for a machine with CUDA (under 3 minutes):
#   bench/gpu.sh
# 1. the CUDA half of the contract suite (tests marked gpu: growth, the sparse
#    step against the dense reference, learning a planted stream);
# 2. bench/train.py on CUDA: trainer vs SparseAdam vs dense Adam, same run;
# 3. bench/retrieval.py at 10k/100k items with the model on CUDA.
# Uses the project's environment (scripts/ensure-venv) or PYTHON if set. On a
# machine whose Python has torch but not the rest (no registry there), WHEELS
# names a folder of wheels for what is missing; they are unpacked into a
# temporary folder put first on the path, the machine's own packages untouched:
#   WHEELS=.device/wheels PYTHON=python3 bench/gpu.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-$(scripts/ensure-venv)/bin/python}
if [[ -n "${WHEELS:-}" ]]; then
    extra=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --target "$extra" "$WHEELS"/*.whl
    export PYTHONPATH="$extra:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY
"$python" -m pytest -q -m gpu -p no:cacheprovider tests/test_model.py
"$python" bench/train.py --quick --device cuda | tail -n 1
"$python" bench/retrieval.py --quick --device cuda --sizes 10000,100000 | tail -n 1
