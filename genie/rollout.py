"""``genie rollout --world DIR --prompt IMG_OR_CLIP --actions 0,3,3,1 --out FILE``: a rollout as mp4 or gif.

The prompt is an image (png/jpg/...: one context frame) or a video (the last frames of it, up to the
dynamics window, as context), resized and centre-cropped to the world's size. The output shows the
prompt's last frame (as the world sees it, through the tokenizer) and then one frame per action.
"""

from __future__ import annotations

import argparse
from collections import deque
from pathlib import Path

import numpy as np

from genie.export_world import add_sampler_arguments, sampler_from

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
OUTPUT_SUFFIXES = {".mp4", ".gif"}


def parse_actions(text: str) -> list[int]:
    """``"0,3,3,1"`` -> ``[0, 3, 3, 1]`` with a one-line error for anything else."""
    try:
        actions = [int(a) for a in text.replace(" ", "").split(",") if a != ""]
    except ValueError:
        raise ValueError(f"--actions must be comma-separated integers like 0,3,3,1, got {text!r}") from None
    if not actions:
        raise ValueError("--actions is empty: give at least one action, e.g. --actions 0,3,3,1")
    return actions


def load_prompt(path: Path, size: int, max_frames: int) -> np.ndarray:
    """An image or video file -> uint8 (T, size, size, 3), T <= max_frames."""
    from genie.data.video import read_video_resampled, resize_center_crop

    if not path.is_file():
        raise FileNotFoundError(f"prompt {path} does not exist")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                frame = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"prompt {path} is not a readable image: {e}") from None
        return resize_center_crop(frame, size)[None]
    from genie.data.video import DecodeError

    try:
        _, frames = read_video_resampled(str(path), None)
        last = deque((f for _, f in frames), maxlen=max_frames)  # every frame is decoded; only these are kept
    except DecodeError as e:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ValueError(f"prompt {path} is neither an image ({kinds}) nor a video: {e}") from None
    if not last:
        raise ValueError(f"prompt video {path} has no frames")
    return np.stack([resize_center_crop(f, size) for f in last])


def write_video(frames_THWC: np.ndarray, path: Path, fps: float, scale: int = 1) -> Path:
    """uint8 (T, H, W, 3) -> mp4 (H.264, lossless) or gif, nearest-neighbour upscaled by ``scale``."""
    if scale > 1:
        frames_THWC = frames_THWC.repeat(scale, axis=1).repeat(scale, axis=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames_THWC]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    else:
        from genie.data.video import encode_clip

        path.write_bytes(encode_clip(np.ascontiguousarray(frames_THWC), fps, lossless=True))
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", type=Path, required=True, help="world bundle folder (genie export world)")
    parser.add_argument("--prompt", type=Path, required=True, help="an image, or a video whose last frames are context")
    parser.add_argument("--actions", required=True, help="comma-separated latent actions, e.g. 0,3,3,1")
    parser.add_argument("--out", type=Path, required=True, help="output .mp4 or .gif")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--fps", type=float, default=10.0, help="frames per second of the output (default 10)")
    parser.add_argument("--scale", type=int, default=1, help="upscale the output by this factor (nearest)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda ...")
    add_sampler_arguments(parser)


def run(args: argparse.Namespace) -> Path:
    from genie.eval.common import pick_device
    from genie.world import World

    if args.out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out must end in .mp4 or .gif, got {args.out.name}")
    actions = parse_actions(args.actions)
    world = World.from_pretrained(args.world, device=pick_device(args.device), seed=args.seed)
    world.sampler_config = sampler_from(args, world.sampler_config)
    prompt = load_prompt(args.prompt, world.image_size, world.dynamics.config.num_frames)
    frames = [world.reset(prompt)]
    frames += [world.step(a) for a in actions]
    out = write_video(np.stack(frames), args.out, args.fps, args.scale)
    print(f"{len(actions)} steps from {args.prompt.name} ({len(prompt)} context frame(s)) -> {out}")
    return out
