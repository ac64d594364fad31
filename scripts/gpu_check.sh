#!/usr/bin/env bash
# One GPU session's checks, in one go (the device is lent for ~15 minutes): coinrun configs' training
# throughput and MFU with bf16, eager and torch.compile'd (`genie bench train`), then a short real
# `genie fit` on CoinRun shards to see whether the loader keeps the GPU fed.
#
#   OUT=/tmp/gpu bash scripts/gpu_check.sh                 # on the GPU machine
#   CONFIGS=configs/tiny STEPS=2 FIT_STEPS=5 DATA=... OUT=/tmp/x bash scripts/gpu_check.sh   # plumbing test on a CPU
#
# Missing Python packages can come as wheels in .whl/ (installed to /tmp/site); shards in $DATA (default
# gpu_data/coinrun, made by `genie prep coinrun --lossy`). Every result lands in $OUT as JSON plus a log.
set -u
OUT=${OUT:?set OUT}
CONFIGS=${CONFIGS:-configs/coinrun}
STEPS=${STEPS:-8}
FIT_STEPS=${FIT_STEPS:-300}
FIT_CONFIG=${FIT_CONFIG:-configs/speedrun/gpu/tokenizer.yaml}
DATA=${DATA:-gpu_data/coinrun}
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
. "$(dirname "$0")/gpu_env.sh"  # wheels from .whl/ where needed, and a `genie` command
stamp() { echo "== $(date +%T) $*"; }

stamp env
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

for stage in tokenizer lam dynamics; do
  stamp bench $stage eager
  timeout 150 genie bench train --stage $stage --config $CONFIGS/$stage.yaml --precision bf16 --steps $STEPS \
    --json $OUT/bench_${stage}.json 2>&1 | grep -v Warning
done

stamp fit eager
timeout 150 genie fit --config $FIT_CONFIG --data.train_shards=$DATA/train --data.val_shards=$DATA/val \
  --trainer.max_steps=$FIT_STEPS --trainer.max_time=null --trainer.limit_val_batches=0 --trainer.logger=false \
  --trainer.enable_progress_bar=false --trainer.default_root_dir=/tmp/fit_eager --checkpoint_every=100000 \
  --data.num_workers=12 2>&1 | grep -v Warning | tail -5
cp /tmp/fit_eager/export/training.json $OUT/fit_eager.json 2>/dev/null
stamp bench of the fit config, random data: the gap to the fit above is the loader
timeout 100 genie bench train --stage tokenizer --config $FIT_CONFIG --precision bf16 --steps $STEPS \
  --json $OUT/bench_fit_config.json 2>&1 | grep -v Warning | tail -3

stamp which SDPA kernel runs in bf16
python3 - <<'PY' 2>&1 | tail -3
import torch, torch.nn.functional as F
from torch.profiler import profile
if torch.cuda.is_available():
    q = torch.randn(256, 8, 64, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with profile() as p:
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    names = {e.key for e in p.key_averages() if "attention" in e.key.lower() or "flash" in e.key.lower()}
    print("SDPA kernels:", sorted(names)[:6])
PY

for stage in tokenizer lam dynamics; do
  stamp bench $stage compile
  timeout 180 genie bench train --stage $stage --config $CONFIGS/$stage.yaml --precision bf16 --steps $STEPS \
    --compile --json $OUT/bench_${stage}_compile.json 2>&1 | grep -v Warning
done
stamp fit compiled
timeout 150 genie fit --config $FIT_CONFIG --data.train_shards=$DATA/train --data.val_shards=$DATA/val \
  --trainer.max_steps=$FIT_STEPS --trainer.max_time=null --trainer.limit_val_batches=0 --trainer.logger=false \
  --trainer.enable_progress_bar=false --trainer.default_root_dir=/tmp/fit_compiled --checkpoint_every=100000 \
  --data.num_workers=12 --compile=true 2>&1 | grep -v Warning | tail -3
cp /tmp/fit_compiled/export/training.json $OUT/fit_compiled.json 2>/dev/null
stamp done
