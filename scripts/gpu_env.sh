#!/usr/bin/env bash
# Sourced by the GPU scripts (gpu_check.sh, gpu_realtime.sh): makes `python3 -c "import genie"` and the `genie` command
# work on a device machine that has torch but not genie's other packages and no package index. Missing packages
# come as wheels in .whl/ (installed to /tmp/site, no index; see gpu_speedrun.sh's header for which and how), and
# this checkout is put on PYTHONPATH with a `genie` shim on PATH when genie is not pip-installed.
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import jsonargparse, webdataset, av" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
if ! command -v genie >/dev/null; then  # not pip-installed there: a `genie` on PATH that runs this checkout
  mkdir -p /tmp/genie_bin
  printf '#!/bin/sh\nexec python3 -c "import sys; from genie.cli import main; sys.exit(main(sys.argv[1:]))" "$@"\n' \
    >/tmp/genie_bin/genie
  chmod +x /tmp/genie_bin/genie
  export PATH=/tmp/genie_bin:$PATH
fi
