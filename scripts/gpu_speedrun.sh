#!/usr/bin/env bash
# The GPU speedrun, prepared as one command: `genie speedrun --budget-minutes 8 --preset gpu`, then every number
# it wrote into one folder (speedrun.json, speedrun.png, rollouts.gif, speedrun.md: a markdown table of every number,
# speedrun.log: the whole terminal output, env.txt: GPU, driver, torch).
#
#   bash scripts/gpu_speedrun.sh                           # on a GPU machine, from the repository's root
#   OUT=/tmp/gpu bash scripts/gpu_speedrun.sh --seed 1     # arguments go on to genie speedrun (later ones win)
#   DRY_RUN=1 bash scripts/gpu_speedrun.sh                 # print what would run, run nothing
#   bash scripts/gpu_speedrun.sh --preset cpu --budget-minutes 0.2 --episodes 16   # plumbing check on a CPU
#   REPORT_ONLY=1 RUN_DIR=runs/x OUT=/tmp/r bash scripts/gpu_speedrun.sh   # only copy + tabulate a finished run
#
# Environment (all optional):
#   OUT             where the results are copied (default: RUN_DIR). The device tool of this workplace fetches
#                   $OUT, so there the files come back by themselves (5 files, well under its limits).
#   RUN_DIR         genie speedrun --out (default runs/gpu_speedrun)
#   DATA            CoinRun shards, made on the first run and reused after (default data/coinrun_speedrun_gpu;
#                   the gpu preset's 2000 episodes take ~1-2 min on 16 cores). procgen must be importable even
#                   when they are cached: the prep checks the cache through it.
#   BUDGET_MINUTES  training budget (default 8); PRESET (default gpu); PYTHON (default python3)
#
# Installing: nothing when genie and its dependencies already import (checked first). Otherwise, in order:
#   1. wheels in .whl/ (carried to a machine without internet, as scripts/gpu_check.sh does): installed with
#      `pip install --no-index` into /tmp/site, nothing fetched;
#   2. the README's GPU install, in a fresh .venv-gpu: `pip install torch` (PyPI's Linux wheel is a CUDA build),
#      then `pip install -e ".[coinrun]"`. This needs a package index; it is checked first and the script stops
#      with one line if none answers. The device machines lent in this workplace reach no index (nothing
#      outside them can be reached): use route 1 there. Their image has Python 3.12, torch, lightning,
#      transformers, matplotlib, einops and safetensors; it lacks (2026-11) jsonargparse (with docstring-parser,
#      typeshed-client), webdataset (braceexpand), av, procgen-mirror (gym3, gym, gym-notices, cffi, pycparser,
#      glfw, moderngl, glcontext) and wandb; fetch their cp312 manylinux wheels into .whl/ where pip works
#      (/work/.library/device/README.md has the command). procgen-mirror pins numpy<2; install it --no-deps
#      beside the image's numpy 2 (untested there).
set -u -o pipefail

RUN_DIR=${RUN_DIR:-runs/gpu_speedrun}
OUT=${OUT:-$RUN_DIR}
DATA=${DATA:-data/coinrun_speedrun_gpu}
BUDGET_MINUTES=${BUDGET_MINUTES:-8}
PRESET=${PRESET:-gpu}
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
REPORT_ONLY=${REPORT_ONLY:-0}
export PYTHONUNBUFFERED=1 WANDB_MODE=offline

say() { echo "[gpu_speedrun] $*"; }
run() {  # print a command, and run it unless DRY_RUN=1
  say "\$ $*"
  [ "$DRY_RUN" = 1 ] || "$@"
}

imports_ok() {  # genie, its training stack and CoinRun's procgen all import
  "$PYTHON" -c "import genie.train, genie.speedrun, webdataset, av; from data_prep.coinrun import load_procgen; load_procgen()" \
    >/dev/null 2>&1
}

setup() {
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"  # this checkout's genie, installed or not
  if imports_ok; then
    return 0
  fi
  if ls .whl/*.whl >/dev/null 2>&1; then
    say "installing the wheels in .whl/ into /tmp/site (no index)"
    run "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || return 1
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
    if [ "$DRY_RUN" = 1 ] || imports_ok; then
      return 0
    fi
    say "still missing after .whl/: $("$PYTHON" -c 'import genie.train, genie.speedrun, webdataset, av' 2>&1 | tail -1)"
    return 1
  fi
  if ! timeout 20 "$PYTHON" -m pip index versions pip >/dev/null 2>&1; then
    say "error: genie's dependencies do not import and no package index answers (no internet here?): carry wheels" \
      "in .whl/ (see this script's header) or install genie first"
    return 1
  fi
  say "installing as the README says for GPUs, in .venv-gpu (torch with CUDA, then genie[coinrun])"
  run "$PYTHON" -m venv .venv-gpu || return 1
  PYTHON=$PWD/.venv-gpu/bin/python
  run "$PYTHON" -m pip install -q torch || return 1
  run "$PYTHON" -m pip install -q -e ".[coinrun]" || return 1
}

environment() {  # what ran where: GPU name, memory, driver, torch and its CUDA
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  else
    echo "nvidia-smi: not found (no NVIDIA driver here)"
  fi
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>&1 | tail -1
}

report() {  # copy the run's report and picture to $OUT, and tabulate every number of speedrun.json
  mkdir -p "$OUT"
  for f in speedrun.json speedrun.png rollouts.gif; do
    if [ -f "$RUN_DIR/$f" ] && [ "$(cd "$RUN_DIR" && pwd -P)" != "$(cd "$OUT" && pwd -P)" ]; then
      cp "$RUN_DIR/$f" "$OUT/"
    fi
  done
  "$PYTHON" - "$RUN_DIR/speedrun.json" "$OUT/speedrun.md" <<'PY'
"""speedrun.json -> a markdown table with one row per number (nested keys joined by '.', lists in one cell)."""
import json
import sys
from pathlib import Path


def cell(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(cell(v) for v in value)
    return "-" if value is None else str(value)


def rows(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from rows(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, cell(node)


src, dst = Path(sys.argv[1]), Path(sys.argv[2])
report = json.loads(src.read_text())
m = report.get("metrics", {})
lines = [
    f"# genie speedrun: {report.get('preset')} preset, {report.get('budget_minutes')} min of training"
    f" on {report.get('gpu') or report.get('device')}",
    "",
]
copy = m.get("copy_psnr_per_step") or []
if copy:  # the bar the world must clear: holding the prompt frame, over the same 10 steps
    m["copy_psnr_10_from_1"] = sum(copy[:10]) / len(copy[:10])
headline = [
    ("tokenizer PSNR (dB)", "tokenizer_psnr"),
    ("world, 10 frames from 1: PSNR (dB)", "rollout_psnr_10_from_1"),
    ("copying the prompt frame, same 10 steps: PSNR (dB)", "copy_psnr_10_from_1"),
    ("ΔtPSNR(4) (dB)", "delta_psnr_t4"),
    ("teacher-forced token accuracy", "teacher_forced_token_accuracy"),
    ("LAM NMI, raw actions", "lam_nmi"),
    ("LAM NMI, effective actions", "lam_nmi_effective"),
    ("LAM codes used", "lam_codes_used"),
]
lines += ["| headline | value |", "|---|---|"]
lines += [f"| {name} | {cell(m.get(key))} |" for name, key in headline if key in m]
lines += ["", "| key | value |", "|---|---|"]
lines += [f"| {key} | {value} |" for key, value in rows(report)]
dst.write_text("\n".join(lines) + "\n")
print(f"[gpu_speedrun] table of every number: {dst}")
PY
}

main() {
  mkdir -p "$OUT" || exit 1
  if [ "$REPORT_ONLY" = 1 ]; then
    report
    return
  fi
  setup || exit 1
  environment | tee "$OUT/env.txt"
  run "$PYTHON" -m genie.cli speedrun --budget-minutes "$BUDGET_MINUTES" --preset "$PRESET" --out "$RUN_DIR" \
    --data "$DATA" "$@" 2>&1 | tee "$OUT/speedrun.log"
  local code=$?
  [ "$DRY_RUN" = 1 ] && return 0
  if [ "$code" != 0 ] || [ ! -f "$RUN_DIR/speedrun.json" ]; then
    say "error: genie speedrun failed (exit $code); its output is in $OUT/speedrun.log"
    exit 1
  fi
  report
  say "done: the results are in $OUT:"
  ls -l "$OUT"
}

main "$@"
