#!/usr/bin/env bash
# FSDP with dead-code restarts on a real GPU: the speedrun tokenizer under --trainer.strategy=fsdp with a low
# restart threshold, on CoinRun shards in gpu_data/coinrun (genie prep coinrun --lossy); prints training.json
# and the number of restarts in the export. Wheels for missing packages in .whl/ (see scripts/gpu_check.sh).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/genie_bin; printf '#!/bin/sh\nexec python3 -c "import sys; from genie.cli import main; sys.exit(main(sys.argv[1:]))" "$@"\n' >/tmp/genie_bin/genie; chmod +x /tmp/genie_bin/genie; export PATH=/tmp/genie_bin:$PATH
timeout 140 genie fit --config configs/speedrun/gpu/tokenizer.yaml --data.train_shards=gpu_data/coinrun/train --data.val_shards=gpu_data/coinrun/val --trainer.max_steps=80 --trainer.max_time=null --trainer.limit_val_batches=0 --trainer.logger=false --trainer.enable_progress_bar=false --trainer.default_root_dir=/tmp/fsdp --checkpoint_every=100000 --data.num_workers=8 --trainer.strategy=fsdp --model.init_args.model.dead_code_threshold=2 2>&1 | grep -v "Warn\|warn" | tail -6
cat /tmp/fsdp/export/training.json
python3 -c "from safetensors.torch import load_file; d=load_file('/tmp/fsdp/export/model.safetensors'); print('restarts', int(d['quantizer.num_restarts']))"
