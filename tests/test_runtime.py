"""genie/runtime.py: the process-wide CPU settings every `genie` command applies."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Through libc itself: is a 16 MiB block mmapped (glibc's default) or taken from the heap, and does the heap keep
# 100 MiB of freed 1 MiB blocks (for the next step to reuse without faulting pages in) or hand them back?
MALLOC_PROBE = """
import ctypes, sys
libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "tuned":
    from genie.runtime import keep_freed_memory
    assert keep_freed_memory()
before = libc.mallinfo2().hblks
big = libc.malloc(16 << 20)
mmapped = libc.mallinfo2().hblks - before
libc.free(big)
blocks = [libc.malloc(1 << 20) for _ in range(100)]
for b in blocks:
    libc.free(b)
print(mmapped, libc.mallinfo2().arena >> 20)
"""


def _probe(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE, mode], capture_output=True, text=True, check=True)
    mmapped, heap_mib = out.stdout.split()
    return int(mmapped), int(heap_mib)


def _has_mallinfo2() -> bool:
    import ctypes

    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not (sys.platform.startswith("linux") and _has_mallinfo2()), reason="needs glibc >= 2.33")
def test_keep_freed_memory_keeps_blocks_in_the_heap():
    """glibc's defaults mmap a 16 MiB block and trim 100 MiB of freed heap (so a training step's activations
    fault in as fresh pages every step); after keep_freed_memory() both stay in the heap for reuse."""
    assert _probe("plain") == (1, pytest.approx(0, abs=8))
    mmapped, heap_mib = _probe("tuned")
    assert mmapped == 0 and heap_mib >= 100


def test_keep_freed_memory_leaves_user_settings_alone(monkeypatch):
    from genie.runtime import keep_freed_memory

    monkeypatch.setenv("GENIE_MALLOC_TUNING", "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("GENIE_MALLOC_TUNING")
    monkeypatch.setenv("MALLOC_ARENA_MAX_", "2")
    assert keep_freed_memory() is False


def test_flush_denormals_flushes_without_numpy_warnings():
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "from genie.runtime import flush_denormals; flush_denormals()\n"
        "import numpy as np, torch\n"
        "np.finfo(np.float32); np.finfo(np.float64)\n"
        "print(float(torch.tensor(1e-39) * 1.0))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.0" and "Warning" not in out.stderr


def test_third_party_tips_and_deprecation_noise_are_dropped_real_messages_kept(caplog):
    import logging
    import warnings

    from lightning.pytorch.utilities import rank_zero_info

    from genie.runtime import quiet_third_party

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        quiet_third_party()  # idempotent
        leaf = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`"
        warnings.warn(leaf, FutureWarning, stacklevel=1)
        warnings.warn("a real warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a real warning"]
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        rank_zero_info(
            "💡 Tip: For seamless cloud logging, try installing [litlogger](https://pypi.org/project/litlogger/)"
        )
        rank_zero_info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


# a few seconds of training: a 24-px sprites tokenizer shrunk to width 32, one block each side
TINY_FIT = [
    "--config", "configs/tiny/sprites_tokenizer.yaml", "--trainer.max_steps=10", "--trainer.val_check_interval=5",
    "--trainer.limit_val_batches=1", "--data.batch_size=4", "--data.num_workers=0", "--model.init_args.model.width=32",
    "--model.init_args.model.num_heads=2", "--model.init_args.model.encoder_depth=1",
    "--model.init_args.model.decoder_depth=1",
]  # fmt: skip
NOISE = ["Tip", "LeafSpec", "Writing model shards", "Loading weights", "anonymous", "FLOPs", "in eval mode"]


def test_piped_fit_prints_plain_progress_lines_and_no_third_party_noise(tmp_path):
    """`genie fit` with stdout piped (not a terminal): plain `[stage] step ...` lines instead of Lightning's live
    bar, a line after each validation, a one-line model summary, and none of the known third-party chatter
    (wandb's logger on, offline, as by default)."""
    from genie.cli import main

    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "sprites"
    args = ["prep", "sprites", "--out", str(data), "--size", "24", "--step", "4", "--sprite-size", "4"]
    assert main([*args, "--episodes", "24", "--val-episodes", "4", "--distractors", "0", "--workers", "0"]) == 0
    fit = ["fit", *TINY_FIT, f"--data.train_shards={data / 'train'}", f"--data.val_shards={data / 'val'}"]
    fit += [f"--trainer.default_root_dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    code = "import sys; from genie.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run(
        [sys.executable, "-c", code, *fit], capture_output=True, text=True, cwd=root, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    steps = [line for line in lines if line.startswith("[tokenizer] step ")]
    assert steps and "loss" in steps[0] and "steps/s" in steps[0], out.stdout
    assert any(line.startswith("[tokenizer] validation at step 5: val/loss") for line in lines), out.stdout
    assert any(line.startswith("[tokenizer] done: step 10/10") for line in lines), out.stdout
    assert "━" not in out.stdout and "Epoch" not in out.stdout  # no live bar
    assert "model: net (VideoTokenizer" in out.stderr
    for text in NOISE:
        assert text not in out.stdout + out.stderr, text


def test_progress_bars_redraw_sparsely_when_piped():
    """stderr piped: tqdm bars (ours and the libraries') redraw every 30 s, not on every update; a user's own
    TQDM_MININTERVAL wins."""
    code = (
        "from genie.runtime import sparse_progress_bars_when_piped as sparse\n"
        "print(sparse())\n"
        "from tqdm.auto import tqdm\n"
        "print(tqdm(total=1, disable=False).mininterval)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["True", "30.0"]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**env, "TQDM_MININTERVAL": "2"}
    )
    assert out.stdout.split() == ["False", "2.0"]
