"""Pure video functions: encode frames to an H.264 mp4, decode chosen frames back, read sources.

Shapes: T frames, H height, W width, C = 3 channels; frames are uint8 ``[T, H, W, C]``.

Decoding is one function, :func:`decode_clip`, with decord as the default backend (fast
random access) and PyAV as the fallback. decord is imported lazily: importing it before
torch has frozen DataLoader workers (decord #251).

Whole videos of any size (shards written by other tools, e.g. video2dataset) go through
:func:`probe_video` (frame count, size and rate from the container header, no decoding) and
:func:`decode_resized` (only the wanted frames, resized so the short side is ``size`` and
center-cropped). decord decodes them straight to the reduced size (its ffmpeg scale filter runs
in the decoder's frame conversion: 1.4-1.5x the frames/s of decoding 640x360 frames in full and
resizing them to 64, measured on one core); PyAV (the fallback) seeks to the keyframe before the
window instead of decoding from the start, and resizes with :func:`resize_center_crop`, the
resampling ``genie prep videos`` uses (PyAV's own scaled conversion measured no faster).
decord's scaled frames differ from that resampling by about 2 levels on average (of 255).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, Literal

import av
import numpy as np

Backend = Literal["auto", "decord", "pyav"]

# Keyframe interval of every clip we write: a random window then needs at most 15 frames of
# lead-in decoding instead of up to 250 (x264's default), see PITFALLS.md.
DEFAULT_GOP = 16


class DecodeError(RuntimeError):
    """A clip that cannot be decoded (corrupt, truncated, not a video, too short)."""


def encode_clip(
    frames_THWC: np.ndarray,
    fps: float,
    *,
    lossless: bool = False,
    crf: int = 18,
    gop: int = DEFAULT_GOP,
) -> bytes:
    """Encode uint8 frames ``[T, H, W, 3]`` as an H.264 mp4 and return its bytes.

    ``lossless=True`` uses libx264rgb at crf 0 (rgb24, frame-exact through decord and PyAV);
    otherwise libx264 yuv420p at ``crf``. Width and height must be even for yuv420p.
    Single-threaded and CPU-independent (see below), so equal input gives equal bytes.
    """
    if frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3 or frames_THWC.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames_THWC.dtype} {frames_THWC.shape}")
    t, h, w, _ = frames_THWC.shape
    if not lossless and (h % 2 or w % 2):
        raise ValueError(f"lossy H.264 (yuv420p) needs even width and height, got {w}x{h}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        rate = Fraction(fps).limit_denominator(1001)
        codec = "libx264rgb" if lossless else "libx264"
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "rgb24" if lossless else "yuv420p"
        stream.thread_count = 1
        stream.options = {
            "crf": "0" if lossless else str(crf),
            "preset": "veryfast",
            "g": str(gop),
            "keyint_min": str(gop),
            "sc_threshold": "0",
            "bf": "0",  # no B-frames: decode order == display order, cheaper random access
            "threads": "1",
            # x264's assembly for mb-tree rate control reads uninitialised memory when the frame is
            # not a multiple of 64 px wide (32, 96, 160, ...), so equal frames gave different bytes
            # (and different pixels) from run to run; cpu-independent selects the exact routines
            # (same size, quality and speed here) and also makes the bytes match across CPUs
            "x264-params": "cpu-independent=1",
        }
        stream.codec_context.time_base = Fraction(1) / rate
        for i, frame in enumerate(frames_THWC):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            if not lossless:
                vf = vf.reformat(format="yuv420p", interpolation="BILINEAR")
            # explicit timestamps: left unset, they come from encoder state and the bytes vary
            vf.pts = i
            vf.time_base = stream.codec_context.time_base
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


DECORD_WIDTH_MULTIPLE = 32  # decord decodes other widths, then fails copying the frames out (see decode_clip)


def _decode_decord(data: bytes, indices: Sequence[int]) -> np.ndarray:
    import decord  # lazy: see module docstring

    try:
        vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
    except Exception as e:  # decord raises its own DECORDError and RuntimeError
        raise DecodeError(f"decord cannot open clip: {str(e).splitlines()[0][:200]}") from e
    n = len(vr)
    if max(indices) >= n:
        raise DecodeError(f"clip has {n} frames, asked for frame {max(indices)}")
    try:
        out = vr.get_batch(list(indices)).asnumpy()
    except Exception as e:
        raise DecodeError(f"decord failed to decode frames: {str(e).splitlines()[0][:200]}") from e
    return out


def _rgb(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as uint8 (H, W, 3) RGB.

    Lossless clips (libx264rgb) decode to planar ``gbrp``, which PyAV hands over as (H, W, 3) RGB itself, the same
    pixels as a conversion to ``rgb24`` without swscale: 2.5x faster per 24 px clip (1.4 against 3.4 ms for 4 frames,
    measured on the Zen 3 EPYC), where the conversion's set-up is most of the cost.
    """
    if frame.format.name in ("gbrp", "rgb24"):
        return frame.to_ndarray()
    return frame.to_ndarray(format="rgb24")


def _decode_pyav(data: bytes, indices: Sequence[int]) -> np.ndarray:
    wanted = sorted(set(indices))
    got: dict[int, np.ndarray] = {}
    last = wanted[-1]
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    got[i] = _rgb(frame)
                if i >= last:
                    break
    except (av.FFmpegError, IndexError, ValueError) as e:
        raise DecodeError(f"PyAV cannot decode clip: {e}") from e
    if len(got) != len(wanted):
        raise DecodeError(f"clip ended after {len(got)} of the wanted frames (asked up to {last})")
    return np.stack([got[i] for i in indices])


def check_indices(indices: Sequence[int]) -> None:
    """ValueError for an empty or negative frame-index request (shared by the decode functions)."""
    if len(indices) == 0:
        raise ValueError("indices must not be empty")
    if min(indices) < 0:
        raise ValueError(f"negative frame index in {list(indices)}")


def decode_clip(data: bytes, indices: Sequence[int], backend: Backend = "auto", width: int | None = None) -> np.ndarray:
    """Decode only the frames at ``indices`` of an encoded clip.

    Args:
        data: the encoded video file's bytes (mp4 as written by :func:`encode_clip`).
        indices: frame indices to return, in the order wanted.
        backend: ``"decord"``, ``"pyav"``, or ``"auto"`` (decord, then PyAV if decord fails or
            is not installed).
        width: the clip's width in pixels, when known (clip metadata): ``"auto"`` then goes straight to PyAV for
            widths decord cannot copy out (not a multiple of 32: decord 0.6 fails every such clip after decoding
            it, "DECORDArrayCopyFromTo: The size must exactly match", which cost 2.5 ms per 24 px clip).

    Returns:
        uint8 array ``[len(indices), H, W, 3]``.

    Raises:
        DecodeError: the clip is corrupt, truncated, or shorter than the largest index.
    """
    check_indices(indices)
    if not data:
        raise DecodeError("empty video member")
    if backend == "pyav":
        return _decode_pyav(data, indices)
    if backend == "decord":
        return _decode_decord(data, indices)
    if backend != "auto":
        raise ValueError(f"unknown decode backend {backend!r}; use auto, decord or pyav")
    if width is not None and width % DECORD_WIDTH_MULTIPLE:
        return _decode_pyav(data, indices)
    try:
        return _decode_decord(data, indices)
    except ImportError:
        return _decode_pyav(data, indices)
    except DecodeError as first:
        try:
            return _decode_pyav(data, indices)
        except DecodeError:
            raise first from None


def count_frames(data: bytes) -> int:
    """Number of decodable frames in an encoded clip (decodes it fully; for checks, not hot paths)."""
    n = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            for _ in container.decode(video=0):
                n += 1
    except (av.FFmpegError, IndexError) as e:
        raise DecodeError(f"PyAV cannot decode clip: {e}") from e
    return n


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video's first video stream."""

    frames: int
    width: int
    height: int
    fps: float


def probe_video(source: bytes | BinaryIO) -> VideoInfo:
    """Frame count, size and frame rate of an encoded video without decoding it.

    The count comes from the container's index (mp4: one entry per frame, read in about a
    millisecond); containers without one (webm, mkv) have their packets counted, which reads the
    file but decodes nothing. ``source`` is the file's bytes or a seekable binary file (e.g. a tar
    member), of which only the header is read when the index is there.

    Raises:
        DecodeError: not a readable video, no video stream, or no frames.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        if not len(source):
            raise DecodeError("empty video member")
        source = io.BytesIO(source)
    try:
        with av.open(source, mode="r") as container:
            if not container.streams.video:
                raise DecodeError("no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            frames = stream.frames
            if frames <= 0:
                frames = sum(1 for p in container.demux(stream) if p.size and p.pts is not None)
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            if not fps and stream.duration and stream.time_base:
                fps = frames / float(stream.duration * stream.time_base)
    except (av.FFmpegError, OSError, IndexError, ValueError, UnicodeDecodeError) as e:
        raise DecodeError(f"not a readable video: {str(e)[:200]}") from e
    if frames <= 0 or width <= 0 or height <= 0:
        raise DecodeError(f"video stream has {frames} frames of {width}x{height}")
    return VideoInfo(frames=frames, width=width, height=height, fps=fps or 30.0)


# Frame sizes decord 0.6 cannot output: it rejects some widths (2-4, 6, 8, 12, 16, 24, 48 and 72 px
# measured, scaled or not) with "from_size == to_size ... The size must exactly match". Remembered
# per process so the failed attempt is paid once; then a scaled size is decoded full-size and
# resized, and a video of such a native size goes to PyAV.
_DECORD_BAD_SIZES: set[tuple[int, int]] = set()
_DECORD_SIZE_ERROR = "from_size == to_size"


class _ScaleUnsupported(Exception):
    pass


def _decode_decord_scaled(data: bytes, indices: Sequence[int], height: int, width: int) -> np.ndarray:
    import decord  # lazy: see module docstring

    try:
        vr = decord.VideoReader(io.BytesIO(data), num_threads=1, width=width, height=height)
    except Exception as e:
        raise DecodeError(f"decord cannot open video: {str(e).splitlines()[0][:200]}") from e
    if max(indices) >= len(vr):
        raise DecodeError(f"video has {len(vr)} frames, asked for frame {max(indices)}")
    try:
        out = vr.get_batch(list(indices)).asnumpy()
    except Exception as e:
        if _DECORD_SIZE_ERROR in str(e):
            raise _ScaleUnsupported from e
        raise DecodeError(f"decord failed to decode frames: {str(e).splitlines()[0][:200]}") from e
    if out.shape[1:3] != (height, width):
        raise _ScaleUnsupported
    return out


def _decode_decord_resized(data: bytes, indices: Sequence[int], size: int, info: VideoInfo) -> np.ndarray:
    if size < min(info.height, info.width):  # decord's scaling is for shrinking; upscaling is rare
        h, w = scaled_size(info.height, info.width, size)
        if (h, w) not in _DECORD_BAD_SIZES:
            try:
                return np.ascontiguousarray(center_crop(_decode_decord_scaled(data, indices, h, w), size))
            except _ScaleUnsupported:
                _DECORD_BAD_SIZES.add((h, w))
    if (info.height, info.width) in _DECORD_BAD_SIZES:
        raise DecodeError(f"decord cannot output {info.width}x{info.height} frames")
    try:
        frames = _decode_decord(data, indices)
    except DecodeError as e:
        if _DECORD_SIZE_ERROR in str(e):
            _DECORD_BAD_SIZES.add((info.height, info.width))
        raise
    return np.stack([resize_center_crop(f, size) for f in frames])


def _decode_pyav_seek(data: bytes, indices: Sequence[int], size: int) -> np.ndarray:
    """Decode ``indices`` of a long video: index frames by packet timestamps (no decoding), seek to
    the keyframe before the first wanted frame, decode forward, resize each wanted frame."""
    wanted = set(indices)
    got: dict[int, np.ndarray] = {}
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"
            # frame i is the packet with the i-th smallest pts (display order, B-frames included)
            pts = sorted(p.pts for p in container.demux(stream) if p.size and p.pts is not None)
            if not pts or max(indices) >= len(pts):
                raise DecodeError(f"video has {len(pts)} frames, asked for frame {max(indices)}")
            index_of = {p: i for i, p in enumerate(pts)}
            last = max(indices)
            container.seek(pts[min(indices)], stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                i = index_of.get(frame.pts) if frame.pts is not None else None
                if i is not None and i in wanted:
                    got[i] = resize_center_crop(_rgb(frame), size)
                if i is not None and i >= last:
                    break
    except (av.FFmpegError, IndexError, ValueError, OSError) as e:
        raise DecodeError(f"PyAV cannot decode video: {str(e)[:200]}") from e
    if len(got) != len(wanted):
        raise DecodeError(f"video ended after {len(got)} of {len(wanted)} wanted frames (asked up to {last})")
    return np.stack([got[i] for i in indices])


def decode_resized(
    data: bytes, indices: Sequence[int], size: int, backend: Backend = "auto", info: VideoInfo | None = None
) -> np.ndarray:
    """Decode only the frames at ``indices`` of a video of any size, as ``size x size`` squares.

    Frames are resized so the short side is ``size`` and center-cropped, as in
    :func:`resize_center_crop`. decord decodes straight to the reduced size; PyAV (fallback, or
    ``backend="pyav"``) seeks to the keyframe before the window and resizes the decoded frames.
    ``info`` (from :func:`probe_video`) saves probing the video again.

    Returns:
        uint8 array ``[len(indices), size, size, 3]``.

    Raises:
        DecodeError: the video is corrupt, truncated, or shorter than the largest index.
    """
    check_indices(indices)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"unknown decode backend {backend!r}; use auto, decord or pyav")
    info = info if info is not None else probe_video(data)
    if backend != "pyav":
        try:
            return _decode_decord_resized(data, indices, size, info)
        except ImportError:
            if backend == "decord":
                raise
        except DecodeError as first:
            if backend == "decord":
                raise
            try:
                return _decode_pyav_seek(data, indices, size)
            except DecodeError:
                raise first from None
    return _decode_pyav_seek(data, indices, size)


def resize_center_crop(frame_HWC: np.ndarray, size: int) -> np.ndarray:
    """Resize so the short side is ``size`` (area-averaging PIL resample), then center-crop to square."""
    from PIL import Image

    h, w = frame_HWC.shape[:2]
    if (h, w) == (size, size):
        return frame_HWC
    nh, nw = scaled_size(h, w, size)
    img = Image.fromarray(frame_HWC).resize((nw, nh), Image.Resampling.BOX if size < min(h, w) else Image.BICUBIC)
    return center_crop(np.asarray(img), size)


def scaled_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(height, width)`` scaled so the short side is ``size`` (aspect kept, rounded)."""
    scale = size / min(height, width)
    return max(size, round(height * scale)), max(size, round(width * scale))


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """The central ``size x size`` square of ``[..., H, W, C]`` frames (a view, no copy)."""
    h, w = frames.shape[-3:-1]
    top, left = (h - size) // 2, (w - size) // 2
    return frames[..., top : top + size, left : left + size, :]


def read_video_resampled(path: str, fps: float | None) -> tuple[float, Iterator[tuple[float, np.ndarray]]]:
    """Open a video file and iterate its frames resampled to ``fps`` (None keeps the source rate).

    Returns ``(fps_out, iterator of (time_seconds, uint8 [H, W, 3]))``. Resampling picks, for each
    output time ``k / fps``, the latest source frame shown at that time (drop or repeat frames).

    Raises:
        DecodeError: the file cannot be opened or has no video stream.
    """
    try:
        container = av.open(path, mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise DecodeError(f"not a readable video: {e}") from e
    if not container.streams.video:
        container.close()
        raise DecodeError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "SLICE"
    src_fps = float(stream.average_rate or stream.guessed_rate or 0) or 30.0
    out_fps = float(fps) if fps else src_fps

    def frames() -> Iterator[tuple[float, np.ndarray]]:
        next_t = 0.0
        prev: tuple[float, np.ndarray] | None = None
        start: float | None = None
        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else (prev[0] + 1 / src_fps if prev else 0.0)
                if start is None:
                    start = t
                t -= start
                # emit every output time that falls before this frame, using the previous frame
                while prev is not None and next_t < t - 1e-6:
                    yield next_t, prev[1]
                    next_t += 1.0 / out_fps
                prev = (t, _rgb(frame))
            while prev is not None and next_t <= prev[0] + 1e-6:
                yield next_t, prev[1]
                next_t += 1.0 / out_fps
        except av.FFmpegError as e:
            raise DecodeError(f"decoding stopped: {e}") from e
        finally:
            container.close()

    return out_fps, frames()
