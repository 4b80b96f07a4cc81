#!/usr/bin/env bash
# The prepared GPU check for a lent CUDA machine, in the order that decides the open questions first; every step
# bounded, so that one call of about 9 minutes returns what finished. benchmarks/README.md ("On a lent GPU
# machine") says how to carry the wheels nnU-Net needs there.
#
#   bash benchmarks/gpu_session.sh OUT_DIR [SECONDS]       # SECONDS: the whole run's budget (default 540)
#   GPU_SESSION_DRY_RUN=1 bash benchmarks/gpu_session.sh /tmp/out 300   # the same steps on the CPU, tiny networks
#
# 1. gpu_check.py, 2d (BUSI256 plans): nnU-Net, GRCSF with the RCU's three CUDA attention layouts, FIAS (its MSDA's
#    flex_attention now outside the compiled graph) and FIAS's diagnostic rows; each row in its own process;
# 2. rcu_attention_speed.py --device cuda, eager and compiled: which RCU layout is fastest per RCU;
# 3. gpu_check.py, 3d_fullres (Hippocampus plans) for the rows of step 1, in what time is left.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR [SECONDS]}
seconds=${2:-540}
start=$SECONDS
cd "$(dirname "$0")/.."
mkdir -p "$out"
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! python3 -c "import nnunetv2, SimpleITK, blosc2, dynamic_network_architectures" 2> "$out/imports.log"; then
  echo "nnU-Net's packages are not importable (see $out/imports.log): carry the wheels (benchmarks/README.md)"
  exit 1
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() \
  else 'no CUDA')" | tee "$out/device.txt"
dry=()
attention=(--device cuda --layouts sdpa sdpa_folded window_sum --rounds 10)
compiled_too=("" "--compile")
if [ -n "${GPU_SESSION_DRY_RUN:-}" ]; then
  dry=(--dry-run)
  attention=(--device cpu --cases busi256 --layouts sdpa keys_first --batch-size 1 --rounds 1)
  compiled_too=("")
fi
left() { echo $((seconds - (SECONDS - start))); }
rows=(GRCSFTrainer GRCSFTrainer_rcuFolded GRCSFTrainer_rcuWindowSum GRCSFTrainer_noRCU FIASTrainer
      FIASTrainer_noCheckpointing FIASTrainer_loopMSDA)

timeout $(( $(left) * 55 / 100 )) python3 benchmarks/gpu_check.py "${dry[@]}" --output-dir "$out/2d" \
  --configurations 2d --rows "${rows[@]}" --skip-smoke --budget $(( $(left) * 45 / 100 )) --row-seconds 100
for compiled in "${compiled_too[@]}"; do
  [ "$(left)" -gt 60 ] || break
  timeout $(( $(left) / 3 )) python3 benchmarks/rcu_attention_speed.py "${attention[@]}" $compiled \
    --output "$out/rcu_attention${compiled:+_compiled}"
done
[ "$(left)" -gt 90 ] && timeout $(( $(left) - 15 )) python3 benchmarks/gpu_check.py "${dry[@]}" --output-dir "$out/3d" \
  --configurations 3d_fullres --rows "${rows[@]}" --skip-smoke --budget $(( $(left) - 120 )) --row-seconds 100
echo "gpu_session: done in $((SECONDS - start)) s; results in $out"
