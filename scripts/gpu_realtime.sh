#!/usr/bin/env bash
# Issue 18's GPU numbers in one go (a lent GPU has ~15 minutes; this takes ~6-8): what a player waits for, and
# training MFU. Run scripts/gpu_speedrun.sh first in a GPU window (world quality comes first); this script then
# also sweeps the sampler on the world it trained.
#
#   OUT=/tmp/rt bash scripts/gpu_realtime.sh              # on the GPU machine, from the repository's root
#   DEVICE=cpu CONFIGS=/tmp/tiny_cfgs FRAMES=2 STEPS=2 TRAIN_STEPS=1 OUT=/tmp/rt bash scripts/gpu_realtime.sh   # plumbing
#
# 1. World.step end to end (`genie bench sample --world`): the CoinRun-size world (untrained, $CONFIGS: speed does
#    not depend on the weights) at 25 MaskGIT steps and at $PLAY_STEPS, eager and compiled (torch.compile over the
#    ring KV cache: CUDA graphs), batch 1 and batch $BATCH.  Target: >= 30 frames/s at 25 steps, >= 60 at the play
#    default.
# 2. If $WORLD (default runs/gpu_speedrun/world) and $VAL (default data/coinrun_speedrun_gpu/val) exist: the
#    steps/quality sweep (`genie eval sampler`: steps 1..25 x unmasking x temperature) picks the CoinRun play
#    default, and step 1 is repeated on that world at it.
# 3. Training MFU in bf16 (`genie bench train`), eager and --compile, for the tokenizer, LAM and dynamics configs.
#    Target: >= 40 % for the tokenizer and dynamics.
# Every result is a JSON file in $OUT (plus realtime.log); the device tool fetches $OUT.
set -u
OUT=${OUT:?set OUT}
CONFIGS=${CONFIGS:-configs/coinrun}
DEVICE=${DEVICE:-cuda}
PLAY_STEPS=${PLAY_STEPS:-4}
BATCH=${BATCH:-16}
FRAMES=${FRAMES:-50}
STEPS=${STEPS:-25}
TRAIN_STEPS=${TRAIN_STEPS:-10}
WORLD=${WORLD:-runs/gpu_speedrun/world}
VAL=${VAL:-data/coinrun_speedrun_gpu/val}
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
mkdir -p "$OUT"
. "$(dirname "$0")/gpu_env.sh"  # wheels from .whl/ where needed, and a `genie` command
exec > >(tee "$OUT/realtime.log") 2>&1
stamp() { echo "== $(date +%T) $*"; }
sample() {  # name, world, steps: World.step eager and compiled
  timeout 240 genie bench sample --world "$2" --device "$DEVICE" --steps "$3" --modes eager,compiled \
    --batch-size "$BATCH" --frames "$FRAMES" --json "$OUT/sample_$1.json" 2>&1 | grep -v Warning
}

stamp env
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

stamp "world step, $CONFIGS size, $STEPS and $PLAY_STEPS MaskGIT steps"
sample "${STEPS}steps" "$CONFIGS" "$STEPS"
sample "${PLAY_STEPS}steps" "$CONFIGS" "$PLAY_STEPS"

if [ -f "$WORLD/world.json" ] && [ -d "$VAL" ]; then
  stamp "sampler sweep on $WORLD"
  timeout 300 genie eval sampler --world "$WORLD" --data "$VAL" --device "$DEVICE" --steps 1,2,4,8,16,25 \
    --unmask random,confidence --temperatures 0,1 --clips 64 --horizon 10 --out "$OUT/sweep" 2>&1 | grep -v Warning
  play=$(python3 -c "import json; print(json.load(open('$OUT/sweep/sampler_sweep.json'))['play_default']['steps'])")
  stamp "world step of $WORLD at its play default ($play steps)"
  sample trained_play "$WORLD" "$play"
else
  stamp "no trained world at $WORLD (run scripts/gpu_speedrun.sh first): sweep skipped"
fi

for stage in tokenizer dynamics lam; do
  for compile in "" --compile; do
    stamp "train $stage bf16 ${compile:-eager}"
    timeout 200 genie bench train --stage $stage --config "$CONFIGS/$stage.yaml" --device "$DEVICE" --precision bf16 \
      --steps "$TRAIN_STEPS" $compile --json "$OUT/train_${stage}${compile:+_compile}.json" 2>&1 | grep -v Warning
  done
done
stamp done
ls -l "$OUT"
