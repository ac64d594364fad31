"""LightningDataModule over :class:`genie.data.loader.ClipStream`: the one way stages get data.

Shards may be ours (``genie prep ...``) or whole videos written by video2dataset (``mp4`` +
``json``); the latter are windowed, resized and cropped to ``resolution`` while loading, which the
training entry point sets from the model config. :meth:`VideoDataModule.check` knows the
difference: whole videos have no fixed size or length to check.

The data module is also where a run's data position lives: it notes the position each training batch
carries (``on_after_batch_transfer``), saves every rank's positions with the checkpoint (``state_dict``, a
collective under DDP/FSDP) and hands them back to the streams of a resumed run, which then yield exactly
the batches the uninterrupted run would have (see :mod:`genie.data.loader`).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from genie.data.contract import ACTIONS_MEMBER, LATENT_ACTIONS_MEMBER, TOKENS_MEMBER, WHOLE_VIDEO, ClipMeta
from genie.data.loader import (
    ClipStream,
    DataError,
    ShardSchedule,
    StreamState,
    expand_shards,
    first_members,
    probe_meta,
    stride_message,
)
from genie.data.video import Backend

log = logging.getLogger(__name__)

# the layout of the saved data position (bumped when it changes; an unknown one is not resumed from)
STATE_VERSION = 1


def _loader(ds: ClipStream, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=None,  # batches are made inside the workers
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )


class VideoDataModule(L.LightningDataModule):
    """Training and validation clips from webdataset shards.

    Args:
        train_shards: folder, brace pattern, ``pipe:`` URL or list of them (training split).
        val_shards: the same for validation; None disables validation.
        num_frames: frames per training window (T).
        frame_stride: keep every n-th frame of a clip.
        batch_size: clips per batch, per process.
        val_batch_size: clips per validation batch (default: batch_size).
        num_workers: DataLoader worker processes per training process (0: load in-process).
        shuffle_buffer: encoded samples held for shuffling in each worker.
        val_clips: at most this many validation clips per process (None: all).
        seed: base seed of window sampling and shuffling.
        decode_backend: ``auto`` (decord, PyAV fallback), ``decord`` or ``pyav``.
        require_actions: skip clips without ``actions.npy`` (e.g. for action-supervised stages).
        resolution: frame size; set by the stage from its model config when left None. Our clips
            of another size are skipped (see ``resize``); whole videos are resized to it.
        resize: resize and center-crop our own clips of another size instead of skipping them.
        shuffle_bytes: cap on the bytes of encoded samples each worker's shuffle buffer holds
            (matters for whole videos, MBs each; our clips are a few KB).
        pin_memory: pin batches for faster host-to-GPU copies (only where there is a GPU to copy to).
        interleave: shards each training worker reads at once, alternating samples between them (a batch
            then draws clips from several shards and many videos).
        video_window_every: whole videos (video2dataset shards): one training window per this many frames,
            so long footage gives samples in proportion to its length; None: one window per video and pass.
        max_video_windows: whole videos: at most this many windows per video and pass.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        num_frames: int = 16,
        frame_stride: int = 1,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 256,
        val_clips: int | None = None,
        seed: int = 0,
        decode_backend: Backend = "auto",
        require_actions: bool = False,
        resolution: int | None = None,
        pin_memory: bool = True,
        resize: bool = False,
        shuffle_bytes: int = 256 << 20,
        interleave: int = 4,
        video_window_every: int | None = 256,
        max_video_windows: int = 64,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.num_frames, self.frame_stride = num_frames, frame_stride
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.val_clips = val_clips
        self.seed = seed
        self.decode_backend: Backend = decode_backend
        self.require_actions = require_actions
        self.resolution = resolution
        self.pin_memory = pin_memory
        self.resize = resize
        self.shuffle_bytes = shuffle_bytes
        self.interleave = interleave
        self.video_window_every, self.max_video_windows = video_window_every, max_video_windows
        self._stream_state = StreamState()  # this rank's data position (what a checkpoint saves)
        self._loaded_state: dict[str, Any] | None = None  # a checkpoint's, until the train loader is made

    def check(self, resolution: int | None = None) -> ClipMeta:
        """Fail fast, before any training, on missing shards or clips of the wrong size.

        Returns the first training clip's metadata.
        """
        resolution = resolution if resolution is not None else self.resolution
        expand_shards(self.train_shards)
        if self.val_shards is not None:
            expand_shards(self.val_shards)
        meta = probe_meta(self.train_shards)
        whole = bool(meta.extra.get(WHOLE_VIDEO))
        if whole or self.resize:
            # resized while loading, to data.resolution: that must be set, and be the model's
            if self.resolution is None:
                what = "hold whole videos (e.g. video2dataset's) that are" if whole else "are"
                raise DataError(f"shards {self.train_shards} {what} resized while loading: set data.resolution")
            if resolution is not None and resolution != self.resolution:
                raise DataError(
                    f"data.resolution={self.resolution} but the model expects {resolution}x{resolution}: "
                    f"set data.resolution={resolution}"
                )
            if whole:  # any length: videos shorter than a window are skipped and counted
                return meta
        elif resolution is not None and (meta.height, meta.width) != (resolution, resolution):
            raise DataError(
                f"shards {self.train_shards} hold {meta.width}x{meta.height} clips but the model expects "
                f"{resolution}x{resolution}: re-run `genie prep ... --size {resolution}` or change the model size"
            )
        self.check_stride()
        need = (self.num_frames - 1) * self.frame_stride + 1
        if meta.frames < need:
            raise DataError(
                f"clips in {self.train_shards} have {meta.frames} frames; num_frames={self.num_frames} at "
                f"frame_stride={self.frame_stride} needs {need}: lower them or prep longer clips"
            )
        return meta

    def check_stride(self) -> None:
        """Refuse, before training, a frame stride that the shards' actions cannot follow (one line)."""
        if self.frame_stride == 1:
            return
        members = first_members(self.train_shards)
        if TOKENS_MEMBER in members:
            raise DataError(f"shards {self.train_shards}: {stride_message(self.frame_stride, LATENT_ACTIONS_MEMBER)}")
        if self.require_actions and ACTIONS_MEMBER in members:
            raise DataError(f"shards {self.train_shards}: {stride_message(self.frame_stride, ACTIONS_MEMBER)}")

    def _stream(self, shards: str | list[str], train: bool, resume: StreamState | None = None) -> ClipStream:
        return ClipStream(
            shards,
            num_frames=self.num_frames,
            frame_stride=self.frame_stride,
            batch_size=self.batch_size if train else self.val_batch_size,
            train=train,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            backend=self.decode_backend,
            require_actions=self.require_actions,
            resolution=self.resolution,
            max_clips=None if train else self.val_clips,
            resize=self.resize,
            shuffle_bytes=self.shuffle_bytes,
            interleave=self.interleave,
            video_window_every=self.video_window_every,
            max_video_windows=self.max_video_windows,
            resume=resume,
        )

    def train_dataloader(self) -> DataLoader:
        if self._loaded_state is not None:
            self._stream_state = self._resume_state(self._loaded_state)
            self._loaded_state = None
        state = StreamState(
            self._stream_state.consumed, dict(self._stream_state.positions), self._stream_state.start_block
        )
        return _loader(self._stream(self.train_shards, True, state), self.num_workers, self._pin())

    def val_dataloader(self) -> DataLoader | list:
        if self.val_shards is None:
            return []
        # validation is small and must be identical run to run: at most one worker per process
        return _loader(self._stream(self.val_shards, False), min(self.num_workers, 1), self._pin())

    def _pin(self) -> bool:
        # pinning needs an accelerator to copy to; on a CPU-only machine torch warns and does nothing
        return self.pin_memory and torch.cuda.is_available()

    # -- the data position: noted per batch, saved with checkpoints, resumed exactly ----------------------

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, dict) and "position" in batch:
            block, used = (int(x) for x in batch["position"])
            self._stream_state.positions[int(batch["stream"])] = (block, used)
            self._stream_state.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Every rank's data position (gathered: all ranks call this when a checkpoint is written)."""
        mine = {
            "consumed": self._stream_state.consumed,
            "positions": {str(k): list(v) for k, v in sorted(self._stream_state.positions.items())},
            "start_block": self._stream_state.start_block,
        }
        ranks = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
        return {
            "version": STATE_VERSION,
            "num_workers": max(1, self.num_workers),
            "world_size": len(ranks),
            "ranks": ranks,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # resolved when the train loader is made: only then are this run's rank and workers certain
        self._loaded_state = dict(state_dict)

    def _resume_state(self, saved: dict[str, Any]) -> StreamState:
        """This rank's streams from a checkpoint's data position.

        Exact when the run has the ranks and workers it was saved with. Otherwise every stream starts at a
        block past the furthest one any saved stream reached, so the run goes on into new data (not exactly,
        but without reading its first blocks again).
        """
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        workers = max(1, self.num_workers)
        ranks = saved.get("ranks") or []
        if saved.get("version") != STATE_VERSION or not ranks:
            log.warning("the checkpoint holds no data position genie can read: the data stream starts afresh")
            return StreamState()
        if saved.get("world_size") == world and saved.get("num_workers") == workers:
            mine = ranks[rank]
            positions = {int(k): (int(v[0]), int(v[1])) for k, v in mine["positions"].items()}
            return StreamState(int(mine["consumed"]), positions, int(mine.get("start_block", 0)))
        # where the furthest saved stream got to in the shard sequence, and the block of the new layout there
        furthest = max((int(v[0]) for r in ranks for v in r["positions"].values()), default=-1)
        shards = len(expand_shards(self.train_shards))
        saved_consumers = int(saved.get("world_size") or 1) * int(saved.get("num_workers") or 1)
        reached = (furthest + 1) * ShardSchedule(shards, self.seed, saved_consumers, self.interleave).width
        reached *= saved_consumers
        per_block = ShardSchedule(shards, self.seed, world * workers, self.interleave).width * world * workers
        start = -(-reached // per_block)
        if self.trainer is None or self.trainer.is_global_zero:
            log.warning(
                "resumed with %d rank(s) x %d worker(s), saved with %d x %d: the data stream goes on from block %d "
                "(not batch-exact; keep ranks and data.num_workers to resume exactly)",
                world,
                workers,
                saved.get("world_size"),
                saved.get("num_workers"),
                start,
            )
        return StreamState(start_block=start)
