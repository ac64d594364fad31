"""``genie prep tokenize``: video shards -> token shards for dynamics training.

Each input clip is tokenized by the frozen tokenizer and its latent actions inferred by the frozen LAM,
once, so that training the dynamics model skips both forward passes (``genie bench train --stage
dynamics`` measures the difference). Output shards mirror the input: one output shard per input shard,
same name and keys, each sample holding::

    json                 the clip's metadata, plus extra.tokenized = {tokenizer, lam, num_codes, grid_size, ...}
    tokens.npy           uint16 [T, h, w]   token ids of every frame
    latent_actions.npy   uint8  [T-1]       latent action of every transition
    actions.npy          (copied when the input has true actions)

Resumable: output shards are written under a temporary name and renamed when complete, and a rerun
skips shards that already exist. Clips that cannot be decoded are skipped, counted and reported.
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from data_prep.common import PrepError
from genie.data.contract import (
    ACTIONS_MEMBER,
    LATENT_ACTIONS_MEMBER,
    META_MEMBER,
    TOKENS_MEMBER,
    VIDEO_MEMBER,
    ClipMeta,
    npy_bytes,
    read_samples,
    write_sample,
)
from genie.data.loader import expand_shards
from genie.data.video import decode_clip


def tokenize_shard(src: str, dst: Path, encoders: Any, batch_size: int, device: torch.device, bar: tqdm) -> dict:
    """Tokenize one shard into ``dst`` (atomically). Returns ``{"clips": n, "skipped": {key: reason}}``."""
    tok, lam = encoders.tokenizer, encoders.lam
    info = {
        "tokenizer": str(encoders.tokenizer_path),
        "lam": str(encoders.lam_path),
        "num_codes": tok.config.num_codes,
        "grid_size": tok.config.grid_size,
        "num_actions": lam.num_actions,
    }
    skipped: dict[str, str] = {}
    ready: list[tuple[str, ClipMeta, np.ndarray, dict[str, bytes]]] = []
    for key, members in read_samples(src):
        try:
            if VIDEO_MEMBER not in members or META_MEMBER not in members:
                raise ValueError(f"needs {VIDEO_MEMBER} and {META_MEMBER} members")
            meta = ClipMeta.from_bytes(members[META_MEMBER])
            if (meta.height, meta.width) != (tok.config.image_size,) * 2:
                raise ValueError(f"clip is {meta.width}x{meta.height}, the tokenizer takes {tok.config.image_size}")
            frames = decode_clip(members[VIDEO_MEMBER], list(range(meta.frames)))
            ready.append((key, meta, frames, members))
        except Exception as e:  # noqa: BLE001 - any bad clip is skipped and reported, never fatal
            skipped[key] = f"{type(e).__name__}: {e}"
            bar.update(1)
    tmp = dst.with_name(dst.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        # batches of equal-length clips, in file order
        i = 0
        while i < len(ready):
            T = ready[i][2].shape[0]
            j = i
            while j < len(ready) and j - i < batch_size and ready[j][2].shape[0] == T:
                j += 1
            chunk = ready[i:j]
            frames = torch.from_numpy(np.stack([c[2] for c in chunk])).to(device)
            with torch.no_grad():
                tokens = tok.encode(frames).cpu().numpy().astype(np.uint16)  # (B, T, h, w)
                latent = lam.infer_actions(frames).cpu().numpy().astype(np.uint8)  # (B, T-1)
            for (key, meta, _, members), t, a in zip(chunk, tokens, latent, strict=True):
                meta.extra = {**meta.extra, "tokenized": info}
                out = {META_MEMBER: meta.to_bytes(), TOKENS_MEMBER: npy_bytes(t), LATENT_ACTIONS_MEMBER: npy_bytes(a)}
                if ACTIONS_MEMBER in members:
                    out[ACTIONS_MEMBER] = members[ACTIONS_MEMBER]
                write_sample(tar, key, out)
            bar.update(len(chunk))
            i = j
    os.replace(tmp, dst)
    return {"clips": len(ready), "skipped": skipped}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Tokenize video shards with a trained tokenizer and infer their latent actions with a trained LAM, "
        "writing token shards (tokens.npy + latent_actions.npy per clip) that `genie fit` on the dynamics "
        "stage reads without running either model. One output shard per input shard; reruns skip finished ones."
    )
    add = parser.add_argument
    add(
        "--data",
        required=True,
        nargs="+",
        help="input video shards: folder, brace pattern or list; several folders (e.g. one per game) are tokenized "
        "in one process, each into OUT/<its path below their common parent>",
    )
    add("--out", type=Path, required=True, help="output folder for the token shards")
    add("--tokenizer", type=Path, required=True, help="exported tokenizer folder")
    add("--lam", type=Path, required=True, help="exported LAM folder")
    add("--batch-size", type=int, default=16, help="clips per forward pass (default 16)")
    add("--device", default="auto", help="auto, cpu, cuda ...")


def output_folders(inputs: list[str], out: Path) -> list[tuple[str, Path]]:
    """Where each input's token shards go: ``out`` for one input; for several folders, ``out`` / the folder's
    path below their common parent (``data/pg/a/train``, ``data/pg/b/train`` -> ``out/a/train``, ``out/b/train``:
    shard names repeat across folders, so they cannot share one)."""
    if len(inputs) == 1:
        return [(inputs[0], out)]
    folders = [Path(d) for d in inputs]
    not_dirs = [str(d) for d in folders if not d.is_dir()]
    if not_dirs:
        raise PrepError(f"with several --data inputs each must be a folder; not folders: {', '.join(not_dirs)}")
    common = Path(os.path.commonpath([d.resolve() for d in folders]))
    return [(str(d), out / d.resolve().relative_to(common)) for d in folders]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from genie.eval.common import pick_device
    from genie.stages.dynamics import FrozenEncoders

    for what, folder in (("--tokenizer", args.tokenizer), ("--lam", args.lam)):
        if not (folder / "config.json").is_file():
            raise PrepError(f"{what} {folder} is not an exported model folder (no config.json)")
    if args.batch_size < 1:
        raise PrepError("--batch-size must be >= 1")
    jobs = [(expand_shards(data), out) for data, out in output_folders(list(args.data), args.out)]
    device = pick_device(args.device)
    encoders = FrozenEncoders(args.tokenizer, args.lam).load(device)
    results = [tokenize_folder(urls, out, encoders, args.batch_size, device) for urls, out in jobs]
    return results[0] if len(results) == 1 else {"folders": results}


def tokenize_folder(urls: list[str], out: Path, encoders: Any, batch_size: int, device: torch.device) -> dict:
    """Tokenize the shards ``urls`` into ``out`` (finished shards are skipped); write and print the summary."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    totals = {"shards": len(urls), "shards_done_before": 0, "clips": 0, "skipped": 0, "skip_reasons": {}}
    todo = []
    for url in urls:
        dst = out / Path(url).name
        if dst.exists():
            totals["shards_done_before"] += 1
        else:
            todo.append((url, dst))
    with tqdm(desc="tokenize", unit="clip") as bar:
        for url, dst in todo:
            res = tokenize_shard(url, dst, encoders, batch_size, device, bar)
            totals["clips"] += res["clips"]
            totals["skipped"] += len(res["skipped"])
            totals["skip_reasons"].update(res["skipped"])
    totals["seconds"] = round(time.time() - t0, 2)
    totals["clips_per_s"] = round(totals["clips"] / max(totals["seconds"], 1e-9), 1)
    (out / "summary.json").write_text(json.dumps(totals, indent=1))
    print(
        f"{out}: {totals['clips']} clips tokenized in {totals['seconds']}s ({totals['clips_per_s']} clips/s), "
        f"{totals['skipped']} skipped, {totals['shards_done_before']} shard(s) already done"
    )
    for key, reason in list(totals["skip_reasons"].items())[:10]:
        print(f"  skipped {key}: {reason}")
    return totals
