#!/usr/bin/env bash
# The GPU checks, for a machine with CUDA (under 3 minutes):
#   bench/gpu.sh
# 1. the CUDA half of the contract suite (tests marked gpu: growth, the sparse
#    step against the dense reference, learning a planted stream; the torch
#    retrieval search on CUDA, and faiss-gpu's k cap when faiss-gpu is there);
# 2. bench/train.py on CUDA: trainer vs SparseAdam vs dense Adam, then the
#    device-resident step (ncf_stream/device_step.py) at batches 8k-1M and under
#    bf16 autocast, same run, on a Zipf stream of 1M users x 200k items x EVENTS
#    interactions (20M by default to stay in the 3 minutes; the issue's target is
#    stated at 100M: EVENTS=100000000);
# 3. bench/retrieval.py at 100k/1M items with the model on CUDA, each size's index
#    searched by FAISS (the GPU only with faiss-gpu) and by the torch search (on
#    CUDA), on the same trained model. The 1M size has not been timed on a GPU
#    machine yet: if it breaks the 3 minutes, drop it to --sizes 100000 first.
# The last line is one JSON object (train_samples_per_s, amp_samples_per_s, ...,
# retrieval per size). Uses the project's environment (scripts/ensure-venv) or PYTHON if set. On a
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
"$python" -m pytest -q -m gpu -p no:cacheprovider tests/test_model.py tests/test_retrieval.py \
    tests/test_device_step.py
train=$("$python" bench/train.py --quick --device cuda --users 1000000 --items 200000 \
    --events "${EVENTS:-20000000}" | tail -n 1)
echo "train: $train"
retrieval=$("$python" bench/retrieval.py --quick --device cuda --sizes 100000,1000000 \
    --backend faiss,torch | tail -n 1)
echo "retrieval: $retrieval"
# One JSON line last: the training figures, and retrieval per size.
TRAIN=$train RETRIEVAL=$retrieval "$python" - <<'PY'
import json, os
train, retrieval = json.loads(os.environ["TRAIN"]), json.loads(os.environ["RETRIEVAL"])
print(json.dumps({**{k: train[k] for k in (
    "device", "train_samples_per_s", "train_batch_samples_per_s", "sparseadam_samples_per_s",
    "amp_samples_per_s", "device_step_samples_per_s", "device_step_best_batch",
    "device_step_negative_shortfall")}, "train": train, "retrieval": retrieval}))
PY
