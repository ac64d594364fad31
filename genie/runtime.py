"""Process-wide settings the commands apply once at start: subnormal flushing, glibc malloc tuning, and quiet
third-party chatter (:func:`quiet_third_party`).

Both are about the CPU and both are measured (numbers below); neither changes results beyond flushing values
under 1e-38 to zero.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import warnings

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks under this many bytes come from the heap, not from a fresh mmap (32 MiB is glibc's ceiling on 64-bit).
MMAP_THRESHOLD = 32 * 2**20
# Free memory at the top of the heap is handed back to the kernel only past this many bytes.
TRIM_THRESHOLD = 1 * 2**30


def flush_denormals() -> None:
    """Treat subnormal floats as zero on the CPU.

    Training on real frames drives some activations/gradients into the subnormal range, where x86 floating
    point is 10-100x slower: measured on the speedrun's CPU tokenizer, steps went from 0.09 s to 1.5-6 s after
    the first few. Flushing them costs nothing measurable in accuracy (they are below 1e-38).
    """
    import numpy as np
    import torch

    # numpy measures its float types' smallest subnormal once, lazily; measured after flushing is on, it finds
    # zero and warns ("The value of the smallest subnormal ... is zero") in the middle of a command's output
    for dtype in (np.float16, np.float32, np.float64):
        np.finfo(dtype).smallest_subnormal  # noqa: B018
    torch.set_flush_denormal(True)


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse instead of returning them to the kernel (Linux/glibc only).

    A training step allocates and frees the same few-MB activation buffers every step. With glibc's defaults
    many of them are fresh ``mmap`` s or sit at a heap top that gets trimmed, so every step the kernel hands the
    process new zeroed pages: measured on this project's 2-core CI CPU at the issue-8 reference tokenizer
    (bf16), 19,400 page faults and 33 ms of kernel time per step, 0.234 s/step; with this, 137 faults, 1.4 ms
    and 0.208 s/step. The cost is that memory freed after a peak stays with the process (peak RSS is
    unchanged). This is what PyTorch's CPU tuning guide gets from swapping in jemalloc or tcmalloc, without
    preloading a library.

    Skipped when the user set any ``MALLOC_*`` tunable in the environment (theirs win) or when
    ``GENIE_MALLOC_TUNING=0``.

    Returns:
        Whether the settings were applied.
    """
    if not sys.platform.startswith("linux") or os.environ.get("GENIE_MALLOC_TUNING", "1") == "0":
        return False
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # order matters: setting the mmap threshold turns off glibc's dynamic thresholds, trim included
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


# What a newcomer's terminal should not show: they say nothing about their run. Real warnings stay.
_LIGHTNING_INFO_LOGGER = "lightning.pytorch.utilities.rank_zero"
_TIP_PREFIX = "💡 Tip:"  # Lightning's adverts for its cloud products (litlogger, litmodels), on every Trainer
_NOISE_WARNINGS = (
    # Lightning 2.6's own pytree helper calls an API torch 2.13 deprecated: nothing a user can act on
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # Lightning checks module modes before the stage's on_train_start: genie's stages load their pretrained parts
    # (eval mode, as from_pretrained hands them over) and set the trained ones to train mode there, and keep frozen
    # ones in eval on purpose (fine-tuning with the dynamics model frozen)
    r"Found \d+ module\(s\) in eval mode at the start of training",
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_TIP_PREFIX)


PIPED_PROGRESS_SECONDS = 30


def sparse_progress_bars_when_piped() -> bool:
    """Make tqdm bars redraw at most every 30 s when stderr is not a terminal (a pipe, a log file).

    A bar redraws in place with carriage returns; piped, every redraw stays in the output: ``genie demo``'s
    tokenize bars alone wrote ~100 of them in 75 s. With ``TQDM_MININTERVAL`` (tqdm's own environment default,
    for every bar in the process, ours and the libraries') they come every 30 s, plus the final one. Skipped in
    a Jupyter kernel (its bars are widgets) and when the user set ``TQDM_MININTERVAL``.

    Returns:
        Whether the setting was applied.
    """
    if sys.stderr.isatty() or "ipykernel" in sys.modules or "TQDM_MININTERVAL" in os.environ:
        return False
    os.environ["TQDM_MININTERVAL"] = str(PIPED_PROGRESS_SECONDS)
    return True


def quiet_third_party() -> None:
    """Silence third-party tips and deprecation notices that say nothing to a user (idempotent).

    Drops Lightning's "💡 Tip" product adverts, the ``LeafSpec`` deprecation warning that Lightning's own code
    triggers under torch 2.13, and its "Found N module(s) in eval mode" warning (genie's stages set their modules'
    modes themselves, after Lightning looks). Everything else Lightning, torch and friends log or warn still
    shows. Elsewhere: transformers' load/save progress bars (:func:`genie.models.hub.no_progress_bars`), wandb's
    ``anonymous`` deprecation, Lightning's model summary table and its live bar in a pipe (:mod:`genie.train`),
    gym's import notice (:func:`data_prep.coinrun.load_procgen`).
    """
    logger = logging.getLogger(_LIGHTNING_INFO_LOGGER)
    if not any(isinstance(f, _DropTips) for f in logger.filters):
        logger.addFilter(_DropTips())
    for message in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
