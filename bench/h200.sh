#!/usr/bin/env bash
# One-command GPU benchmark for a lent NVIDIA H200 (the `run` device tool), < 10 minutes:
#
#   run(command="bash bench/h200.sh", timeout_s=580)            # plus carry=[".whl"] if made
#
# 1. JAX with CUDA: the machine's image ships jax + jax-cuda13-plugin (KINDS.md, in
#    /work/.library/device/); nothing can be downloaded there. Python packages moejax needs
#    and the image lacks (ml-collections, grain, tensorboardX, array-record, ...) travel as
#    wheels in .whl/ (ignored by git), made here beforehand with
#      echo /.whl/ >> .git/info/exclude
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#        --platform manylinux2014_x86_64 -d .whl ml-collections grain tensorboardX array-record
#    and this script installs them into /tmp/site (no index, no dependencies). Should JAX
#    see no GPU there, carry jax-cuda13-plugin and jax-cuda13-pjrt wheels of the image's
#    jax version (python3 -m pip show jax there) in .whl/ too.
# 2. bench/train_step.py --config configs/small.py (bf16 compute over fp32 master weights:
#    model.dtype=bfloat16) -> $OUT/train_step_small.jsonl. `mfu` is against the matmul
#    peak measured in the same run (8192^3 bf16), `table_mfu` against the H200 dense bf16
#    figure seen here (~790 TFLOP/s, train.peak_flops_per_device=7.9e14).
# 3. bench/moe_layer.py with every dispatch moejax.config.DISPATCHES lists (the accelerator
#    paths included) -> $OUT/moe_layer.jsonl.
# Logs and nvidia-smi go to $OUT too. Each stage has its own timeout, so a slow stage
# still leaves the others' results.
set -u -o pipefail
OUT=${OUT:-/tmp/h200_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # report what the step needs, not 75 % of HBM
PY=python3

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$OUT/nvidia-smi.txt"

if ! $PY -c "import ml_collections, grain, tensorboardX" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site" || exit 1
  else
    echo "moejax's dependencies are missing and no .whl/ was carried: see this file's header" \
      | tee "$OUT/error.txt"
    exit 1
  fi
fi

$PY - <<'EOF' 2>&1 | tee "$OUT/devices.txt"
import jax
print("jax", jax.__version__, "devices", jax.devices())
assert jax.devices()[0].platform == "gpu", "JAX sees no GPU: check the CUDA plugin"
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

timeout 330 $PY bench/train_step.py --config configs/small.py --json \
  --config.model.dtype=bfloat16 --config.train.peak_flops_per_device=7.9e14 \
  --warmup 3 --repeats 20 --peak-size 8192 \
  > "$OUT/train_step_small.jsonl" 2> "$OUT/train_step_small.log"
echo "train_step: exit $?" | tee -a "$OUT/status.txt"

# dropless is ragged_dot on the GPU; dropless:bulk is the CPU default's layout, for comparison
DISPATCHES=$($PY -c "from moejax.config import DISPATCHES; print(','.join(DISPATCHES))"),dropless:bulk
timeout 180 $PY bench/moe_layer.py --json --repeats 10 --dispatch "$DISPATCHES" \
  > "$OUT/moe_layer.jsonl" 2> "$OUT/moe_layer.log"
echo "moe_layer ($DISPATCHES): exit $?" | tee -a "$OUT/status.txt"
cat "$OUT"/*.jsonl
