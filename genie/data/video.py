"""Pure video functions: encode frames to an H.264 mp4, decode chosen frames back, read sources.

Shapes: T frames, H height, W width, C = 3 channels; frames are uint8 ``[T, H, W, C]``.

Decoding is one function, :func:`decode_clip`, with decord as the default backend (fast
random access) and PyAV as the fallback. decord is imported lazily: importing it before
torch has frozen DataLoader workers (decord #251).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Literal

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
    Single-threaded, so equal input gives equal bytes.
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
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except (av.FFmpegError, IndexError, ValueError) as e:
        raise DecodeError(f"PyAV cannot decode clip: {e}") from e
    if len(got) != len(wanted):
        raise DecodeError(f"clip ended after {len(got)} of the wanted frames (asked up to {last})")
    return np.stack([got[i] for i in indices])


def decode_clip(data: bytes, indices: Sequence[int], backend: Backend = "auto") -> np.ndarray:
    """Decode only the frames at ``indices`` of an encoded clip.

    Args:
        data: the encoded video file's bytes (mp4 as written by :func:`encode_clip`).
        indices: frame indices to return, in the order wanted.
        backend: ``"decord"``, ``"pyav"``, or ``"auto"`` (decord, then PyAV if decord fails or
            is not installed).

    Returns:
        uint8 array ``[len(indices), H, W, 3]``.

    Raises:
        DecodeError: the clip is corrupt, truncated, or shorter than the largest index.
    """
    if len(indices) == 0:
        raise ValueError("indices must not be empty")
    if min(indices) < 0:
        raise ValueError(f"negative frame index in {list(indices)}")
    if not data:
        raise DecodeError("empty video member")
    if backend == "pyav":
        return _decode_pyav(data, indices)
    if backend == "decord":
        return _decode_decord(data, indices)
    if backend != "auto":
        raise ValueError(f"unknown decode backend {backend!r}; use auto, decord or pyav")
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


def resize_center_crop(frame_HWC: np.ndarray, size: int) -> np.ndarray:
    """Resize so the short side is ``size`` (area-averaging PIL resample), then center-crop to square."""
    from PIL import Image

    h, w = frame_HWC.shape[:2]
    if (h, w) == (size, size):
        return frame_HWC
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = Image.fromarray(frame_HWC).resize((nw, nh), Image.Resampling.BOX if scale < 1 else Image.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(img)[top : top + size, left : left + size]


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
                prev = (t, frame.to_ndarray(format="rgb24"))
            while prev is not None and next_t <= prev[0] + 1e-6:
                yield next_t, prev[1]
                next_t += 1.0 / out_fps
        except av.FFmpegError as e:
            raise DecodeError(f"decoding stopped: {e}") from e
        finally:
            container.close()

    return out_fps, frames()
