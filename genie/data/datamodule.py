"""LightningDataModule over :class:`genie.data.loader.ClipStream`: the one way stages get data.

Shards may be ours (``genie prep ...``) or whole videos written by video2dataset (``mp4`` +
``json``); the latter are windowed, resized and cropped to ``resolution`` while loading, which the
training entry point sets from the model config. :meth:`VideoDataModule.check` knows the
difference: whole videos have no fixed size or length to check.
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from genie.data.contract import WHOLE_VIDEO, ClipMeta
from genie.data.loader import ClipStream, DataError, expand_shards, probe_meta
from genie.data.video import Backend


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
        pin_memory: pin batches for faster host-to-GPU copies.
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
        need = (self.num_frames - 1) * self.frame_stride + 1
        if meta.frames < need:
            raise DataError(
                f"clips in {self.train_shards} have {meta.frames} frames; num_frames={self.num_frames} at "
                f"frame_stride={self.frame_stride} needs {need}: lower them or prep longer clips"
            )
        return meta

    def _stream(self, shards: str | list[str], train: bool) -> ClipStream:
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
        )

    def train_dataloader(self) -> DataLoader:
        return _loader(self._stream(self.train_shards, True), self.num_workers, self.pin_memory)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_shards is None:
            return []
        # validation is small and must be identical run to run: at most one worker per process
        return _loader(self._stream(self.val_shards, False), min(self.num_workers, 1), self.pin_memory)
