"""LightningDataModule over :class:`genie.data.loader.ClipStream`: the one way stages get data.

Shards may be ours (``genie prep ...``) or whole videos written by video2dataset (``mp4`` +
``json``); the latter are windowed, resized and cropped to ``resolution`` while loading, which the
training entry point sets from the model config. :meth:`VideoDataModule.check` knows the
difference: whole videos have no fixed size or length to check.

The data module is also where a run's data position lives: it notes the position each training batch
carries (``on_after_batch_transfer``), saves every rank's positions with the checkpoint (``state_dict``, a
collective under DDP/FSDP) and hands them back to the streams of a resumed run, which then yield exactly
the batches the uninterrupted run would have (see :mod:`genie.data.loader`).

``train_shards`` may be a weighted mixture ``{spec: weight}`` of shard sets (YAML mapping under
``data.train_shards``, or ``--data.train_shards='{data/a: 1, data/b: 3}'``): :meth:`VideoDataModule.check`
probes every source and refuses token shards mixed with video shards or clips of different sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader

from genie.data.contract import ACTIONS_MEMBER, LATENT_ACTIONS_MEMBER, TOKENS_MEMBER, WHOLE_VIDEO, ClipMeta
from genie.data.loader import (
    ClipStream,
    DataError,
    ShardSchedule,
    ShardSpec,
    StreamState,
    expand_shards,
    first_members,
    mixture_weights,
    parse_mixture,
    probe_meta,
    stride_message,
)
from genie.data.video import Backend

log = logging.getLogger(__name__)

# the layout of the saved data position (bumped when it changes; an unknown one is not resumed from)
STATE_VERSION = 1


def _as_mapping(spec: Any, field: str) -> Any:
    """A str that is a YAML mapping (``'{data/a: 1, data/b: x}'``: jsonargparse passes a dict its types refuse
    on as a str) as that mapping, so its weights get a one-line error; any other spec as it is.

    Raises:
        DataError: a str that looks like a mapping (``{...: ...}``) but is not valid YAML.
    """
    if isinstance(spec, str) and spec.startswith("{") and spec.endswith("}") and ": " in spec:
        try:
            loaded = yaml.safe_load(spec)
        except yaml.YAMLError:
            raise DataError(
                f"{field}={spec} looks like a {{spec: weight}} mapping but is not valid YAML: quote specs holding "
                """* [ ] , { } (e.g. '{"data/*/train": 1, data/b: 3}')"""
            ) from None
        if isinstance(loaded, dict):
            return loaded
    return spec


def _go_on_block(furthest: int, shards: int, seed: int, interleave: int, saved: int, consumers: int) -> int:
    """The first block of a ``consumers``-consumer schedule past block ``furthest`` of a ``saved``-consumer one."""
    reached = (furthest + 1) * ShardSchedule(shards, seed, saved, interleave).width * saved
    per_block = ShardSchedule(shards, seed, consumers, interleave).width * consumers
    return -(-reached // per_block)


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

    Training may mix several shard sets by weight (``train_shards={spec: weight}``); each source keeps its own
    shard order and shuffle, and a mixture's position (output slot, then each source's block and samples used)
    is saved with checkpoints and resumed exactly, like a single source's (see :mod:`genie.data.loader`).

    Args:
        train_shards: folder, brace or glob pattern, ``pipe:`` URL or list of them (training split, one source);
            or a mixture ``{spec: weight}``: each source gives about ``weight / sum(weights)`` of the training
            samples (weight 0: not read). Sources must hold the same kind (video or tokens) and clip size.
        val_shards: the same for validation (a mapping: the union of its keys, weights ignored); None disables
            validation.
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
            (matters for whole videos, MBs each; our clips are a few KB); a mixture's sources share it.
        pin_memory: pin batches for faster host-to-GPU copies (only where there is a GPU to copy to).
        interleave: shards each training worker reads at once, alternating samples between them (a batch
            then draws clips from several shards and many videos).
        video_window_every: whole videos (video2dataset shards): one training window per this many frames,
            so long footage gives samples in proportion to its length; None: one window per video and pass.
        max_video_windows: whole videos: at most this many windows per video and pass.
    """

    def __init__(
        self,
        train_shards: str | list[str] | dict[str, float],
        val_shards: str | list[str] | dict[str, float] | None = None,
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
        self.train_shards: ShardSpec = _as_mapping(train_shards, "data.train_shards")
        self.val_shards: ShardSpec | None = _as_mapping(val_shards, "data.val_shards")
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
        """Fail fast, before any training, on missing shards, clips of the wrong size or mismatched sources.

        Returns the first training clip's metadata (of the first source of a mixture).
        """
        resolution = resolution if resolution is not None else self.resolution
        if self.val_shards is not None:
            expand_shards(self.val_shards)
        if not isinstance(self.train_shards, Mapping):
            expand_shards(self.train_shards)
            return self._check_source(self.train_shards, resolution)
        specs = [src.spec for src in parse_mixture(self.train_shards)]
        self._check_mixture(specs)
        return [self._check_source(spec, resolution) for spec in specs][0]

    def _check_mixture(self, specs: list[str]) -> None:
        """Refuse sources that cannot share batches: tokens with video, or our clips of different sizes."""
        probed = [
            (spec, "tokens" if TOKENS_MEMBER in first_members(spec) else "video", probe_meta(spec)) for spec in specs
        ]
        spec0, kind0, _ = probed[0]
        for spec, kind, _ in probed[1:]:
            if kind != kind0:
                raise DataError(
                    f"data.train_shards mixes {kind0} shards ({spec0}) with {kind} shards ({spec}): a batch holds one "
                    "kind; tokenize every source (`genie prep tokenize`) or mix only video shards"
                )
        # whole videos are resized while loading (and so are our video clips with data.resize): no size to agree on
        fixed = [
            (spec, m)
            for spec, kind, m in probed
            if not m.extra.get(WHOLE_VIDEO) and not (self.resize and kind == "video")
        ]
        for spec, meta in fixed[1:]:
            first, m0 = fixed[0]
            if (meta.width, meta.height) != (m0.width, m0.height):
                raise DataError(
                    f"data.train_shards mixes {m0.width}x{m0.height} clips ({first}) with {meta.width}x{meta.height} "
                    f"clips ({spec}): prep every source at one --size (video shards: or set data.resize=true)"
                )

    def _check_source(self, shards: ShardSpec, resolution: int | None) -> ClipMeta:
        """The checks of one source (the whole of ``train_shards`` unless it is a mixture)."""
        meta = probe_meta(shards)
        whole = bool(meta.extra.get(WHOLE_VIDEO))
        if whole or self.resize:
            # resized while loading, to data.resolution: that must be set, and be the model's
            if self.resolution is None:
                what = "hold whole videos (e.g. video2dataset's) that are" if whole else "are"
                raise DataError(f"shards {shards} {what} resized while loading: set data.resolution")
            if resolution is not None and resolution != self.resolution:
                raise DataError(
                    f"data.resolution={self.resolution} but the model expects {resolution}x{resolution}: "
                    f"set data.resolution={resolution}"
                )
            if whole:  # any length: videos shorter than a window are skipped and counted
                return meta
        elif resolution is not None and (meta.height, meta.width) != (resolution, resolution):
            raise DataError(
                f"shards {shards} hold {meta.width}x{meta.height} clips but the model expects "
                f"{resolution}x{resolution}: re-run `genie prep ... --size {resolution}` or change the model size"
            )
        self.check_stride(shards)
        need = (self.num_frames - 1) * self.frame_stride + 1
        if meta.frames < need:
            raise DataError(
                f"clips in {shards} have {meta.frames} frames; num_frames={self.num_frames} at "
                f"frame_stride={self.frame_stride} needs {need}: lower them or prep longer clips"
            )
        return meta

    def check_stride(self, shards: ShardSpec | None = None) -> None:
        """Refuse, before training, a frame stride that the shards' actions cannot follow (one line).

        Args:
            shards: the source to check (default: every training source).
        """
        if self.frame_stride == 1:
            return
        if shards is None:
            sources = self.train_shards
            for spec in [s for _, s, _ in mixture_weights(sources)] if isinstance(sources, Mapping) else [sources]:
                self.check_stride(spec)
            return
        members = first_members(shards)
        if TOKENS_MEMBER in members:
            raise DataError(f"shards {shards}: {stride_message(self.frame_stride, LATENT_ACTIONS_MEMBER)}")
        if self.require_actions and ACTIONS_MEMBER in members:
            raise DataError(f"shards {shards}: {stride_message(self.frame_stride, ACTIONS_MEMBER)}")

    def _stream(self, shards: ShardSpec, train: bool, resume: StreamState | None = None) -> ClipStream:
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
        mine = self._stream_state
        state = StreamState(mine.consumed, dict(mine.positions), mine.start_block, tuple(mine.source_start))
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
            # (block, used), or a mixture's (slot, block_0, used_0, ...)
            self._stream_state.positions[int(batch["stream"])] = tuple(int(x) for x in batch["position"])
            self._stream_state.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Every rank's data position (gathered: all ranks call this when a checkpoint is written)."""
        mine = {
            "consumed": self._stream_state.consumed,
            "positions": {str(k): list(v) for k, v in sorted(self._stream_state.positions.items())},
            "start_block": self._stream_state.start_block,
        }
        if self._stream_state.source_start:
            mine["source_start"] = list(self._stream_state.source_start)
        ranks = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
        state = {
            "version": STATE_VERSION,
            "num_workers": max(1, self.num_workers),
            "world_size": len(ranks),
            "ranks": ranks,
        }
        if isinstance(self.train_shards, Mapping):  # whose blocks a mixture's positions count
            state["sources"] = self._source_specs()
        return state

    def _source_specs(self) -> list[str] | None:
        """The specs of a mixture's read sources, in position order (None: one source)."""
        if not isinstance(self.train_shards, Mapping):
            return None
        return [spec for _, spec, _ in mixture_weights(self.train_shards)]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # resolved when the train loader is made: only then are this run's rank and workers certain
        self._loaded_state = dict(state_dict)

    def _resume_state(self, saved: dict[str, Any]) -> StreamState:
        """This rank's streams from a checkpoint's data position.

        Exact when the run has the ranks and workers it was saved with. Otherwise every stream starts at a
        block past the furthest one any saved stream reached (for a mixture: each source past its own furthest
        block), so the run goes on into new data (not exactly, but without reading its first blocks again). A
        position saved for other mixture sources (or one source against a mixture) is not resumed from.
        """
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        workers = max(1, self.num_workers)
        ranks = saved.get("ranks") or []
        if saved.get("version") != STATE_VERSION or not ranks:
            log.warning("the checkpoint holds no data position genie can read: the data stream starts afresh")
            return StreamState()
        specs = self._source_specs()
        if saved.get("sources") != specs:
            log.warning(
                "the checkpoint's data position is for other data.train_shards sources (%s, now %s): the data "
                "stream starts afresh",
                saved.get("sources") or "one source",
                specs or "one source",
            )
            return StreamState()
        if saved.get("world_size") == world and saved.get("num_workers") == workers:
            mine = ranks[rank]
            positions = {int(k): tuple(int(x) for x in v) for k, v in mine["positions"].items()}
            start = tuple(int(b) for b in mine.get("source_start", ()))
            return StreamState(int(mine["consumed"]), positions, int(mine.get("start_block", 0)), start)
        # where the furthest saved stream got to in the shard sequence, and the block of the new layout there
        saved_consumers = int(saved.get("world_size") or 1) * int(saved.get("num_workers") or 1)
        positions = [v for r in ranks for v in r["positions"].values()]
        if specs is None:
            furthest = max((int(v[0]) for v in positions), default=-1)
            shards = len(expand_shards(self.train_shards))
            starts = [_go_on_block(furthest, shards, self.seed, self.interleave, saved_consumers, world * workers)]
        else:  # a mixture: each source past its own furthest block
            starts = []
            for k, spec in enumerate(specs):
                furthest = max((int(v[1 + 2 * k]) for v in positions if len(v) == 1 + 2 * len(specs)), default=-1)
                shards = len(expand_shards(spec))
                starts.append(
                    _go_on_block(furthest, shards, self.seed, self.interleave, saved_consumers, world * workers)
                )
        if self.trainer is None or self.trainer.is_global_zero:
            log.warning(
                "resumed with %d rank(s) x %d worker(s), saved with %d x %d: the data stream goes on from block %s "
                "(not batch-exact; keep ranks and data.num_workers to resume exactly)",
                world,
                workers,
                saved.get("world_size"),
                saved.get("num_workers"),
                starts[0] if specs is None else starts,
            )
        if specs is None:
            return StreamState(start_block=starts[0])
        return StreamState(source_start=tuple(starts))
