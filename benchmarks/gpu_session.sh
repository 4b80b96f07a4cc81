#!/usr/bin/env bash
# The prepared GPU check for a lent CUDA machine, in two bounded parts (one `run` call each, about 9 minutes),
# the open questions first. benchmarks/README.md ("On a lent GPU machine") says how to carry nnU-Net's wheels.
#
#   bash benchmarks/gpu_session.sh OUT_DIR [SECONDS] [PART]     # SECONDS: this call's budget (540); PART: 1 or 2
#   GPU_SESSION_DRY_RUN=1 bash benchmarks/gpu_session.sh /tmp/out 600 1   # the same steps on the CPU, tiny networks
#
# Part 1: gpu_check.py 2d (BUSI256 plans: nnU-Net, GRCSF with the RCU's three CUDA attention layouts, FIAS), each
#         row in its own process; where GRCSF's step time goes (profile_step.py, GRCSF and GRCSF without the RCU);
#         rcu_attention_speed.py, eager, in what time is left.
# Part 2: rcu_attention_speed.py eager and compiled; FIAS's diagnostic rows; gpu_check.py 3d_fullres (Hippocampus).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR [SECONDS] [PART]}
seconds=${2:-540}
part=${3:-1}
start=$SECONDS
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! python3 -c "import nnunetv2" 2> /dev/null && ls .whl/*.whl > /dev/null 2>&1; then  # the carried wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
if ! python3 -c "import nnunetv2, SimpleITK, blosc2, dynamic_network_architectures" 2> "$out/imports.log"; then
  echo "nnU-Net's packages are not importable (see $out/imports.log): carry the wheels (benchmarks/README.md)"
  exit 1
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() \
  else 'no CUDA')" | tee "$out/device.txt"
dry=()
attention=(--device cuda --layouts sdpa sdpa_folded window_sum --rounds 10)
if [ -n "${GPU_SESSION_DRY_RUN:-}" ]; then
  dry=(--dry-run)
  attention=(--device cpu --cases busi256 --layouts sdpa keys_first --batch-size 1 --rounds 1)
fi
left() { echo $((seconds - (SECONDS - start))); }
check() {  # gpu_check.py rows, bounded by the time left: check NAME CONFIGURATION FRACTION_PERCENT ROW...
  local name=$1 configuration=$2 share=$3; shift 3
  [ "$(left)" -gt 90 ] || return 0
  timeout $(( $(left) * share / 100 )) python3 benchmarks/gpu_check.py "${dry[@]}" --output-dir "$out/$name" \
    --configurations "$configuration" --rows "$@" --skip-smoke --budget $(( $(left) * share / 100 - 60 )) \
    --row-seconds 100
}
if [ "$part" = 1 ]; then
  check 2d 2d 60 GRCSFTrainer GRCSFTrainer_rcuFolded GRCSFTrainer_rcuWindowSum FIASTrainer
  for trainer in GRCSFTrainer GRCSFTrainer_noRCU; do
    [ "$(left)" -gt 150 ] && timeout 150 python3 benchmarks/profile_step.py "$trainer" "${dry[@]}" \
      --output "$out/profile_$trainer" > /dev/null
  done
  [ "$(left)" -gt 60 ] && timeout $(( $(left) - 20 )) python3 benchmarks/rcu_attention_speed.py "${attention[@]}" \
    --output "$out/rcu_attention"
else
  compiled=(--compile)
  [ -n "${GPU_SESSION_DRY_RUN:-}" ] && compiled=()  # compiling every layout on the CPU takes too long
  for extra in "" "${compiled[@]}"; do
    timeout $(( $(left) / 4 )) python3 benchmarks/rcu_attention_speed.py "${attention[@]}" $extra \
      --output "$out/rcu_attention${extra:+_compiled}"
  done
  check 2d_fias 2d 50 FIASTrainer_noCheckpointing FIASTrainer_loopMSDA
  check 3d 3d_fullres 95 GRCSFTrainer GRCSFTrainer_noRCU FIASTrainer
fi
echo "gpu_session part $part: done in $((SECONDS - start)) s; results in $out"
