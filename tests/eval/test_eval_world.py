"""`evaluate_world`'s baselines on hand-made clips: copying the prompt, on every frame and on the frames that changed,
and the every-patch-decoded rollout beside the world's own (keep_pixels)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from genie.data.contract import ClipMeta, ShardWriter, clip_key
from genie.data.video import encode_clip
from genie.eval.metrics import MAX_PSNR, frame_psnr
from genie.eval.world import evaluate_world
from genie.models.sampler import SamplerConfig
from genie.world import World
from tests.worlds import S
from tests.worlds import tiny_world_parts as parts

T = 4


def write_clips(out: Path, clips: list[np.ndarray]) -> Path:
    """Lossless shards of uint8 clips (T, S, S, 3)."""
    with ShardWriter(out, prefix="val", shard_size=len(clips)) as writer:
        for i, frames in enumerate(clips):
            meta = ClipMeta(source="test", fps=10.0, frames=T, width=S, height=S, video_id=f"c{i}", lossless=True)
            writer.write(
                clip_key(f"c{i}", 0), {"mp4": encode_clip(frames, 10.0, lossless=True), "json": meta.to_bytes()}
            )
    return out


def test_copying_is_scored_on_every_frame_and_on_the_frames_that_changed(tmp_path: Path):
    rng = np.random.default_rng(0)
    still = np.repeat(rng.integers(0, 256, (1, S, S, 3), dtype=np.uint8), T, axis=0)  # nothing moves: copying is exact
    moving = rng.integers(0, 256, (T, S, S, 3), dtype=np.uint8)
    shards = write_clips(tmp_path / "val", [still, moving])
    world = World(*parts(), SamplerConfig(steps=2, temperature=0.0), seed=0)
    r = evaluate_world(world, str(shards), context=1, horizon=T - 1, max_clips=2, batch_size=2)
    assert r["clips"] == 2 and r["changed_frames_per_step"] == [1] * (T - 1)
    copy_moving = frame_psnr(
        torch.from_numpy(moving[:1]).expand(T - 1, -1, -1, -1)[None], torch.from_numpy(moving[1:])[None]
    )[0]
    for f in range(T - 1):
        assert math.isclose(r["copy_psnr_changed_per_step"][f], float(copy_moving[f]), rel_tol=1e-5)
        assert math.isclose(r["copy_psnr_per_step"][f], (MAX_PSNR + float(copy_moving[f])) / 2, rel_tol=1e-5)
    # keep_pixels (the default) is reported next to the same rollout decoded whole; the world's changed-frame PSNR
    # is its PSNR on the moving clip alone
    assert len(r["psnr_decoded_per_step"]) == T - 1 and r["psnr_decoded_per_step"] != r["psnr_per_step"]
    assert all(c is not None and math.isfinite(c) for c in r["psnr_changed_per_step"])
    whole = evaluate_world(
        world.fork(sampler=SamplerConfig(steps=2, temperature=0.0, keep_pixels=False)), str(shards), 1, T - 1, 2, 2
    )
    assert "psnr_decoded_per_step" not in whole
    assert np.allclose(
        whole["psnr_per_step"], r["psnr_decoded_per_step"]
    )  # same seed, same tokens, every patch decoded
