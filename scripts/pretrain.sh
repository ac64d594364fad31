#!/usr/bin/env bash
# Pretrain a world on all 16 Procgen games, every game weighted equally (configs/pretrain/<size>/), then score
# the LAM per game and the world on held-out CoinRun levels.
#   bash scripts/pretrain.sh tiny        # CPU: 32x32, about 30 min on 2 cores (README "Pretrain, then fine-tune")
#   bash scripts/pretrain.sh gpu         # GPU sizes: 64x64, the CoinRun case study's models
# Environment: DATA (default data), RUNS (default runs/pretrain/<size>), EPISODES (training episodes per game).
# Every step is an ordinary genie command, printed as it runs; the data steps are resumable and cached.
set -euo pipefail
SIZE=${1:-tiny}
case $SIZE in
  tiny) PX=32; DATA=${DATA:-data}/procgen32; EPISODES=${EPISODES:-64}; PREP=(--max-episode-frames 64 --val-episodes 8);;
  gpu)  PX=64; DATA=${DATA:-data}/procgen; EPISODES=${EPISODES:-2000}; PREP=(--max-episode-frames 200);;
  *) echo "usage: bash scripts/pretrain.sh tiny|gpu" >&2; exit 2;;
esac
RUNS=${RUNS:-runs/pretrain/$SIZE}
CFG=configs/pretrain/$SIZE
GAMES=(bigfish bossfight caveflyer chaser climber coinrun dodgeball fruitbot heist jumper leaper maze miner ninja plunder starpilot)
run() { echo "+ genie $*"; genie "$@"; }
# the configs name data/procgen{32,}[_tokens] and runs/pretrain/<size>; point them at DATA and RUNS
paths=(--trainer.logger=false)
mixed() {  # the 16-game weighted mix of folder $1 as a --data.train_shards value
  local s="{"; for g in "${GAMES[@]}"; do s+="$1/$g/train: 1.0, "; done; echo "${s%, }}"
}
start=$(date +%s)
run prep procgen --games all --out "$DATA" --size $PX --episodes "$EPISODES" "${PREP[@]}"
run fit --config $CFG/tokenizer.yaml "${paths[@]}" --trainer.default_root_dir=$RUNS/tokenizer \
  --data.train_shards="$(mixed "$DATA")" --data.val_shards="$DATA/coinrun/val"
run fit --config $CFG/lam.yaml "${paths[@]}" --trainer.default_root_dir=$RUNS/lam \
  --data.train_shards="$(mixed "$DATA")" --data.val_shards="$DATA/coinrun/val"
# every game's train and val folders in one process (one output folder per input: shard names repeat across games)
run prep tokenize --data "$DATA"/*/train "$DATA"/*/val --out "${DATA}_tokens" \
  --tokenizer $RUNS/tokenizer/export --lam $RUNS/lam/export
run fit --config $CFG/dynamics.yaml "${paths[@]}" --trainer.default_root_dir=$RUNS/dynamics \
  --model.init_args.tokenizer=$RUNS/tokenizer/export --model.init_args.lam=$RUNS/lam/export \
  --data.train_shards="$(mixed "${DATA}_tokens")" --data.val_shards="${DATA}_tokens/coinrun/val"
run export world --tokenizer $RUNS/tokenizer/export --lam $RUNS/lam/export --dynamics $RUNS/dynamics/export \
  --out $RUNS/world --steps 8 --unmask confidence --temperature 0
echo "pretraining took $(( ($(date +%s) - start) / 60 )) min"
for g in "${GAMES[@]}"; do
  run eval lam --model $RUNS/lam/export --data "$DATA/$g/val" --out $RUNS/lam/eval/$g --clips 64 >/dev/null
done
python - "$RUNS" "${GAMES[@]}" <<'PY'
import json, sys
from pathlib import Path
runs, games = Path(sys.argv[1]), sys.argv[2:]
rows = {g: json.loads((runs / "lam" / "eval" / g / "lam_eval.json").read_text()) for g in games}
print(f"{'game':<10} {'NMI (raw actions)':>17} {'codes used':>10}")
for g, r in rows.items():
    print(f"{g:<10} {r['nmi']:>17.3f} {r['codes_used']:>10}")
(runs / "lam" / "eval" / "per_game.json").write_text(json.dumps(rows, indent=2))
PY
run eval world --world $RUNS/world --data "$DATA/coinrun/val" --clips 64 --horizon 4
