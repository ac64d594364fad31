"""World API, bundle and CLI behaviour on small untrained models (learning is tested in tests/stages)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from genie.cli import main
from genie.models.sampler import SamplerConfig
from genie.world import World, write_bundle
from tests.worlds import A, P, S, V
from tests.worlds import tiny_world_parts as parts


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("w") / "world", *parts(), SamplerConfig(steps=2))


def frames(t: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, S, S, 3), dtype=np.uint8)


def test_bundle_layout_and_loading(bundle: Path):
    meta = json.loads((bundle / "world.json").read_text())
    assert meta["format"] == "genie-world" and meta["num_actions"] == A and meta["sampler"]["steps"] == 2
    for part in ("tokenizer", "lam", "dynamics"):
        assert (bundle / part / "model.safetensors").is_file()
    world = World.from_pretrained(bundle, seed=0)
    assert world.num_actions == A and world.sampler_config.steps == 2 and world.image_size == S


def test_reset_step_shapes_and_seeded_sampling(bundle: Path):
    world = World.from_pretrained(bundle)
    outs = []
    for _ in range(2):
        world.seed(7)
        first = world.reset(frames(1)[0])
        assert first.shape == (S, S, 3) and first.dtype == np.uint8
        outs.append(np.stack([world.step(a) for a in (0, 3, 4, 1, 2, 2)]))  # 6 steps: past the 4-frame window
    assert outs[0].shape == (6, S, S, 3) and outs[0].dtype == np.uint8
    assert np.array_equal(outs[0], outs[1])  # same seed, prompt and actions -> same frames
    world.seed(8)
    world.reset(frames(1)[0])
    other = np.stack([world.step(a) for a in (0, 3, 4, 1, 2, 2)])
    assert not np.array_equal(outs[0], other)  # the seed matters (temperature 1 sampling)


def test_fresh_seed_leaves_the_global_rng_alone(bundle: Path):
    """seed(None) (and a fork without a seed) draw from OS entropy, not by reseeding torch's global RNG."""
    world = World.from_pretrained(bundle, seed=0)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    world.seed(None)
    other = world.fork()
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(world.generator.get_state(), other.generator.get_state())  # two fresh seeds differ
    assert torch.rand(()).item() == torch.rand((), generator=torch.Generator().manual_seed(0)).item()


def test_clip_prompt_and_infer_actions(bundle: Path):
    world = World.from_pretrained(bundle, seed=0)
    clip = frames(6)
    ids = world.infer_actions(clip)
    assert ids.shape == (5,) and ids.dtype == np.int64 and ((ids >= 0) & (ids < A)).all()
    assert world.infer_actions(clip[None].repeat(2, 0)).shape == (2, 5)
    assert world.reset(clip).shape == (S, S, 3)  # longer than the window: the last frames are the context
    assert world.step(1).shape == (S, S, 3)


def test_bad_inputs_raise_value_errors_that_name_the_problem(bundle: Path, tmp_path: Path):
    world = World.from_pretrained(bundle, seed=0)
    with pytest.raises(RuntimeError, match="reset"):
        world.step(0)
    world.reset(frames(1)[0])
    with pytest.raises(ValueError, match=r"actions must be in 0\.\.4.*\[5\]"):
        world.step(A)
    with pytest.raises(ValueError, match=r"\[-1\]"):
        world.step(-1)
    with pytest.raises(ValueError, match="H = W = 16"):
        world.reset(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        world.reset(np.zeros((S, S, 3), np.float32))
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    shutil.rmtree(broken / "lam")
    with pytest.raises(ValueError, match="missing lam/config.json"):
        World.from_pretrained(broken)
    with pytest.raises(ValueError, match="does not exist"):
        World.from_pretrained(tmp_path / "nowhere")


def test_parts_that_do_not_fit_are_refused(tmp_path: Path):
    tok, lam, dyn = parts(num_codes=64, actions=3)
    with pytest.raises(ValueError, match=r"num_codes=32 but the tokenizer has 64.*num_actions=5 but the LAM has 3"):
        write_bundle(tmp_path / "w", tok, lam, dyn)


def test_rollout_cli_writes_gif_and_mp4(bundle: Path, tmp_path: Path):
    from PIL import Image

    prompt = tmp_path / "prompt.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(prompt)
    for suffix in ("gif", "mp4"):
        out = tmp_path / f"roll.{suffix}"
        args = ["rollout", "--world", str(bundle), "--prompt", str(prompt), "--actions", "0,3,3,1", "--out", str(out)]
        assert main([*args, "--device", "cpu", "--scale", "2"]) == 0
        assert out.stat().st_size > 0
    with Image.open(tmp_path / "roll.gif") as gif:
        assert gif.n_frames == 5 and gif.size == (2 * S, 2 * S)  # prompt + 4 steps


def test_rollout_from_a_video_prompt(bundle: Path, tmp_path: Path):
    from genie.data.video import encode_clip

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(encode_clip(frames(7), fps=10, lossless=True))
    out = tmp_path / "roll.gif"
    args = ["rollout", "--world", str(bundle), "--prompt", str(clip), "--actions", "1,2", "--out", str(out)]
    assert main([*args, "--device", "cpu", "--temperature", "0"]) == 0
    from PIL import Image

    with Image.open(out) as gif:
        assert gif.n_frames == 3


def test_rollout_cli_errors_are_one_line(bundle: Path, tmp_path: Path, capsys):
    prompt = tmp_path / "p.png"
    from PIL import Image

    Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(prompt)
    base = ["rollout", "--world", str(bundle), "--prompt", str(prompt), "--out", str(tmp_path / "o.gif")]
    assert main([*base, "--actions", "0,9"]) == 2
    assert "actions must be in 0..4" in capsys.readouterr().err
    assert main([*base, "--actions", "left"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    for name, content in (("broken.png", b"not a png"), ("notes.txt", b"not a video")):
        (tmp_path / name).write_bytes(content)
        args = ["rollout", "--world", str(bundle), "--prompt", str(tmp_path / name), "--actions", "0"]
        assert main([*args, "--out", str(tmp_path / "o.gif")]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and "prompt" in err[0] and name in err[0], err


def test_export_world_cli(tmp_path: Path):
    tok, lam, dyn = parts()
    folders = {}
    for name, m in (("tokenizer", tok), ("lam", lam), ("dynamics", dyn)):
        folders[name] = m.save_pretrained(tmp_path / name) or tmp_path / name
    args = [
        "export",
        "world",
        *[f"--{k}={v}" for k, v in folders.items()],
        "--out",
        str(tmp_path / "w"),
        "--steps",
        "3",
        "--no-keep-pixels",
    ]
    assert main(args) == 0
    sampler = World.from_pretrained(tmp_path / "w").sampler_config
    assert sampler.steps == 3 and not sampler.keep_pixels
    shutil.rmtree(folders["lam"])
    assert main(args) == 2  # a missing part: one-line error


def test_robot_actions_drive_the_world_through_its_adapter(tmp_path: Path):
    import torch

    from genie.models.adapter import ActionAdapter, AdapterConfig

    torch.manual_seed(0)
    adapter = ActionAdapter(AdapterConfig(action_dim=3, num_actions=A, hidden=16))
    bundle = write_bundle(tmp_path / "w", *parts(), SamplerConfig(steps=2), adapter=adapter)
    assert json.loads((bundle / "world.json").read_text())["parts"]["adapter"] == "ActionAdapter"
    world = World.from_pretrained(bundle, seed=0)
    commands = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    ids = world.latent_actions_of(commands)
    assert ids.shape == (6,) and ((ids >= 0) & (ids < A)).all()
    world.seed(1)
    world.reset(frames(1)[0])
    by_command = [world.step(robot_action=u) for u in commands]
    world.seed(1)
    world.reset(frames(1)[0])
    by_id = [world.step(int(a)) for a in ids]
    assert all(np.array_equal(x, y) for x, y in zip(by_command, by_id, strict=True))
    with pytest.raises(ValueError, match="vectors of 3 numbers"):
        world.step(robot_action=[1.0, 2.0])
    with pytest.raises(ValueError, match="not both"):
        world.step(1, robot_action=commands[0])
    plain = World.from_pretrained(write_bundle(bundle, *parts(), SamplerConfig(steps=2)), seed=0)  # rewritten
    assert not (bundle / "adapter").exists() and plain.adapter is None
    with pytest.raises(ValueError, match="no action adapter"):
        plain.latent_actions_of(commands)
    with pytest.raises(ValueError, match="adapter num_actions=3"):
        write_bundle(tmp_path / "bad", *parts(), adapter=ActionAdapter(AdapterConfig(action_dim=3, num_actions=3)))


def test_a_true_action_world_needs_the_clips_discrete_actions():
    from genie.data.loader import DataError
    from genie.world import discrete_actions

    ids = torch.tensor([[0, 14, 3]], dtype=torch.int32)
    assert discrete_actions({"actions": ids}, "shards").dtype == torch.long
    with pytest.raises(DataError, match="shards has no actions.npy"):
        discrete_actions({}, "shards")
    with pytest.raises(DataError, match="continuous actions"):
        discrete_actions({"actions": torch.zeros(1, 3, 4)}, "shards")


def patch(frame: np.ndarray, n: int) -> np.ndarray:
    """Patch n (row-major over the S / P grid) of an (S, S, 3) frame."""
    g = S // P
    r, c = divmod(n, g)
    return frame[r * P : (r + 1) * P, c * P : (c + 1) * P]


def scripted_steps(bundle: Path, keep: bool, changes: list[int]) -> list[np.ndarray]:
    """reset on a prompt, then one step per entry of ``changes``: the step's tokens are the previous ones with that
    token's id moved on by one (the dynamics model's sampler is replaced by this script). The frames as shown."""
    world = World.from_pretrained(bundle, sampler=SamplerConfig(steps=2, keep_pixels=keep), seed=0)
    prompt = frames(1)[0]
    shown = [world.reset(prompt)]
    ids = world.tokenizer.encode(torch.from_numpy(prompt)[None, None]).flatten(1)  # (1, N)
    script = []
    for n in changes:
        ids = ids.clone()
        ids[0, n] = (ids[0, n] + 1) % V
        script.append(ids)
    world._sampler.next_frame = lambda actions, generator=None: script.pop(0)
    shown += [world.step(0) for _ in changes]
    return shown


def test_keep_pixels_shows_the_decoder_only_where_a_token_changed(bundle: Path):
    prompt = frames(1)[0]
    kept = scripted_steps(bundle, True, [5, 0])
    decoded = scripted_steps(bundle, False, [5, 0])
    N = (S // P) ** 2
    # the first frame shown is the prompt itself, not its reconstruction
    assert np.array_equal(kept[0], prompt) and not np.array_equal(decoded[0], prompt)
    # step 1: token 5 changed -> the decoder's patch there; everywhere else the prompt's real pixels
    assert np.array_equal(patch(kept[1], 5), patch(decoded[1], 5))
    assert all(np.array_equal(patch(kept[1], n), patch(prompt, n)) for n in range(N) if n != 5)
    # step 2: token 0 changed; token 5 stayed, so its patch is step 1's (not re-decoded with the new context)
    assert np.array_equal(patch(kept[2], 0), patch(decoded[2], 0))
    assert np.array_equal(patch(kept[2], 5), patch(kept[1], 5))
    assert all(np.array_equal(patch(kept[2], n), patch(prompt, n)) for n in range(1, N) if n != 5)
    # without keep_pixels, nothing of the prompt survives the decoder
    assert not any(np.array_equal(patch(decoded[1], n), patch(prompt, n)) for n in range(N))


def test_keep_pixels_is_off_for_the_diffusion_kind():
    from genie.models.diffusion import DiffusionDynamicsConfig, DiffusionDynamicsModel

    tok, lam, _ = parts()
    dyn = DiffusionDynamicsModel(
        DiffusionDynamicsConfig(
            num_codes=V, code_dim=8, grid_size=S // P, num_actions=A, num_frames=4, width=32, depth=1, num_heads=2
        )
    )
    world = World(tok, lam, dyn, SamplerConfig(steps=2, keep_pixels=True), seed=0)
    assert not world.keeps_pixels  # continuous latents never repeat exactly: every patch is decoded
    prompt = frames(1)[0]
    assert not np.array_equal(world.reset(prompt), prompt)
    assert world.step(0).shape == (S, S, 3)
