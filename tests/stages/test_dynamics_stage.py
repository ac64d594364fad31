"""The dynamics stage as a user runs it: `genie prep tokenize`, `genie fit` from video or token shards, export,
config checks against the frozen parts, and the big configs scaled down."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from genie.cli import main
from genie.data.contract import LATENT_ACTIONS_MEMBER, TOKENS_MEMBER, VIDEO_MEMBER, npy_load, read_samples
from genie.data.video import decode_clip
from genie.models.lam import LAMConfig, LatentActionModel
from genie.models.tokenizer import TokenizerConfig, VideoTokenizer
from genie.stages.base import load_stage_checkpoint

from .conftest import cli_fit_args

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny" / "dynamics.yaml")


@pytest.fixture(scope="module")
def frozen(tmp_path_factory) -> tuple[Path, Path]:
    """Untrained 24 px tokenizer (64 codes) and LAM (6 actions) in exported folders: the tiny world's shapes."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("frozen")
    small = dict(image_size=24, patch_size=4, width=32, num_heads=2, mlp_ratio=2.0, encoder_depth=1, decoder_depth=1)
    VideoTokenizer(TokenizerConfig(num_frames=8, code_dim=8, num_codes=64, **small)).save_pretrained(root / "tok")
    LatentActionModel(LAMConfig(num_frames=4, code_dim=4, num_actions=6, **small)).save_pretrained(root / "lam")
    return root / "tok", root / "lam"


def fit_args(config: str, shards: Path, root: Path, tok: Path, lam: Path, *extra: str) -> list[str]:
    return cli_fit_args(
        config, shards, root, f"--model.init_args.tokenizer={tok}", f"--model.init_args.lam={lam}", *extra
    )


@pytest.fixture(scope="module")
def token_shards(sprites_shards: Path, frozen: tuple, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens")
    # val whole (the mirror test compares every shard); train: its first shard (250 clips) is plenty for a few steps
    for split, data in (("train", sprites_shards / "train" / "train-000000.tar"), ("val", sprites_shards / "val")):
        args = ["prep", "tokenize", "--data", str(data), "--out", str(out / split)]
        assert main([*args, "--tokenizer", str(frozen[0]), "--lam", str(frozen[1]), "--device", "cpu"]) == 0
    return out


def test_tokenize_mirrors_the_shards_and_matches_the_models(sprites_shards: Path, token_shards: Path, frozen):
    src = sorted((sprites_shards / "val").glob("*.tar"))
    dst = sorted((token_shards / "val").glob("*.tar"))
    assert [p.name for p in src] == [p.name for p in dst]
    tok, lam = VideoTokenizer.from_pretrained(frozen[0]), LatentActionModel.from_pretrained(frozen[1])
    (key, members), (key2, tokened) = read_samples(src[0])[3], read_samples(dst[0])[3]
    assert key == key2 and VIDEO_MEMBER not in tokened
    frames = torch.from_numpy(decode_clip(members[VIDEO_MEMBER], list(range(16))))[None]
    tokens, latent = npy_load(tokened[TOKENS_MEMBER]), npy_load(tokened[LATENT_ACTIONS_MEMBER])
    assert tokens.dtype == np.uint16 and tokens.shape == (16, 6, 6) and latent.shape == (15,)
    assert np.array_equal(tokens, tok.encode(frames)[0].numpy())
    assert np.array_equal(latent, lam.infer_actions(frames)[0].numpy())
    assert np.array_equal(npy_load(tokened["actions.npy"]), npy_load(members["actions.npy"]))
    meta = json.loads(tokened["json"])
    assert meta["extra"]["tokenized"]["num_codes"] == 64


def test_tokenize_skips_bad_clips_and_resumes(sprites_shards: Path, frozen, tmp_path: Path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    good = read_samples(sorted((sprites_shards / "val").glob("*.tar"))[0])[:5]
    with tarfile.open(src / "s-000000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        from genie.data.contract import write_sample

        for i, (key, members) in enumerate(good):
            write_sample(tar, key, {**members, VIDEO_MEMBER: b"not a video"} if i == 2 else members)
    args = ["prep", "tokenize", "--data", str(src), "--out", str(tmp_path / "out"), "--device", "cpu"]
    args += ["--tokenizer", str(frozen[0]), "--lam", str(frozen[1])]
    assert main(args) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["clips"] == 4 and summary["skipped"] == 1 and good[2][0] in summary["skip_reasons"]
    assert len(read_samples(tmp_path / "out" / "s-000000.tar")) == 4
    assert main(args) == 0
    assert "1 shard(s) already done" in capsys.readouterr().out


@pytest.mark.parametrize("source", ["video", "tokens"])
def test_fit_from_video_or_token_shards(source: str, sprites_shards: Path, token_shards: Path, frozen, tmp_path: Path):
    shards = sprites_shards if source == "video" else token_shards
    root = tmp_path / "run"
    args = fit_args(TINY, shards, root, *frozen, "--trainer.max_steps=3")
    regime = {"clean_prefix_prob": 0.7, "mask_schedule": "cosine", "context_noise": 0.03}
    if source == "tokens":  # the training-regime options from the command line to config.json
        args += [f"--model.init_args.model.{k}={v}" for k, v in regime.items()]
    assert main([*args, "--trainer.val_check_interval=3"]) == 0
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(k.startswith("net.") for k in ckpt["state_dict"])  # the frozen parts are not checkpointed
    stage = load_stage_checkpoint(root / "checkpoints" / "last.ckpt")
    assert stage.net.config.num_codes == 64 and stage.net.config.num_actions == 6
    cfg = json.loads((root / "export" / "config.json").read_text())
    assert cfg["model_type"] == "genie_dynamics" and cfg["grid_size"] == 6
    if source == "tokens":
        assert {k: cfg[k] for k in regime} == regime


def test_validation_reports_next_frame_accuracy_from_a_clean_context(frozen):
    """val/next_frame_accuracy: last frame fully masked, true clean past (no context noise, no random mask)."""
    from genie.models.dynamics import DynamicsConfig
    from genie.stages.dynamics import DynamicsStage

    small = dict(num_codes=64, grid_size=6, num_actions=6, num_frames=4, width=32, depth=1, num_heads=2)
    regime = dict(clean_prefix_prob=1.0, mask_schedule="cosine", context_noise=0.5)
    stage = DynamicsStage(DynamicsConfig(**small, **regime), tokenizer=str(frozen[0]), lam=str(frozen[1])).eval()
    logged: dict[str, torch.Tensor] = {}
    stage.log = lambda name, value, **kw: logged.__setitem__(name, value)  # type: ignore[method-assign]
    tokens, actions = torch.randint(0, 64, (5, 4, 6, 6)), torch.randint(0, 6, (5, 3))
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            stage.validate_dynamics(tokens, actions)
        runs.append(dict(logged))
    keys = {"val/next_frame_accuracy", "val/next_frame_loss", "val/loss", "val/accuracy"}
    assert set(runs[0]) == keys
    assert runs[0]["val/next_frame_accuracy"] == runs[1]["val/next_frame_accuracy"]  # no random draw in it
    assert runs[0]["val/loss"] != runs[1]["val/loss"]  # the training objective: random masks
    mask = torch.zeros(5, 4, 36, dtype=torch.bool)
    mask[:, -1] = True
    with torch.no_grad():
        logits = stage.net(tokens, actions, mask=mask).logits[:, -1]
    want = (logits.argmax(-1) == tokens.flatten(2)[:, -1]).float().mean()
    assert torch.isclose(runs[0]["val/next_frame_accuracy"], want)


def test_config_that_does_not_fit_the_frozen_parts_is_one_line(sprites_shards: Path, frozen, tmp_path: Path, capsys):
    args = fit_args(TINY, sprites_shards, tmp_path, *frozen, "--trainer.max_steps=1")
    assert main([*args, "--model.init_args.model.num_codes=1024"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num_codes=1024 but the tokenizer has 64" in err and "num_codes=64" in err
    args = fit_args(TINY, sprites_shards, tmp_path, tmp_path / "nope", frozen[1])
    assert main([*args, "--trainer.max_steps=1"]) == 2
    assert "not an exported model folder" in capsys.readouterr().err


def test_token_shards_at_a_frame_stride_are_refused_in_one_line(token_shards: Path, frozen, tmp_path: Path, capsys):
    """Latent actions are per consecutive frame pair: a stride of 2 would pair frame t with t+2's action."""
    args = fit_args(TINY, token_shards, tmp_path, *frozen, "--trainer.max_steps=1", "--data.frame_stride=2")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "latent_actions.npy" in err and "frame_stride=1" in err


@pytest.mark.parametrize("setup", ["coinrun", "large"])
def test_gpu_configs_scaled_down_run_a_step(setup: str, sprites_shards: Path, frozen, tmp_path: Path):
    config = ROOT / "configs" / setup / "dynamics.yaml"
    want = yaml.safe_load(config.read_text())["model"]["init_args"]["model"]
    args = fit_args(str(config), sprites_shards, tmp_path / setup, *frozen)
    scaled = ["--model.init_args.model.num_codes=64", "--model.init_args.model.grid_size=6"]
    scaled += ["--model.init_args.model.num_actions=6", "--model.init_args.model.width=32"]
    scaled += ["--model.init_args.model.depth=1", "--model.init_args.model.num_heads=2", "--data.num_frames=4"]
    extra = ["--trainer.max_steps=1", "--trainer.devices=1", "--trainer.limit_val_batches=0"]
    assert main([*args, *scaled, *extra]) == 0
    cfg = json.loads((tmp_path / setup / "export" / "config.json").read_text())
    assert cfg["num_frames"] == want["num_frames"] and cfg["action_conditioning"] == want["action_conditioning"]


def test_true_action_world_trains_exports_and_is_evaluated_on_the_clips_actions(
    sprites_shards: Path, frozen, tmp_path: Path, capsys
):
    """model.action_source=true: the upper-bound world, conditioned on the clips' own actions (not the LAM's)."""
    from genie.eval.world import evaluate_world
    from genie.world import World

    num_true = 1 + max(
        int(npy_load(m["actions.npy"]).max()) for _, m in read_samples(next((sprites_shards / "train").glob("*.tar")))
    )
    assert num_true != 6  # differs from the LAM's 6 latent actions, so a mix-up cannot pass
    true = ["--model.init_args.model.action_source=true", "--data.require_actions=true"]
    args = fit_args(TINY, sprites_shards, tmp_path / "run", *frozen, "--trainer.max_steps=2", *true)
    assert main([*args, f"--model.init_args.model.num_actions={num_true}"]) == 0
    cfg = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert cfg["action_source"] == "true" and cfg["num_actions"] == num_true

    # too few actions for the clips' ids: one line naming the field and the fix
    small = fit_args(TINY, sprites_shards, tmp_path / "small", *frozen, "--trainer.max_steps=1", *true)
    assert main([*small, "--model.init_args.model.num_actions=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.num_actions=1" in err and "or more" in err

    bundle = tmp_path / "world"
    export = ["export", "world", "--tokenizer", str(frozen[0]), "--lam", str(frozen[1]), "--out", str(bundle)]
    assert main([*export, "--dynamics", str(tmp_path / "run" / "export"), "--steps", "2"]) == 0
    world = World.from_pretrained(bundle, seed=0)
    assert world.num_actions == num_true
    with pytest.raises(ValueError, match="true actions"):
        world.infer_actions(np.zeros((3, 24, 24, 3), np.uint8))
    r = evaluate_world(world, str(sprites_shards / "val"), horizon=2, max_clips=4)
    assert r["action_source"] == "true" and r["num_actions"] == num_true and r["clips"] == 4


CAUSAL = str(ROOT / "configs" / "tiny" / "dynamics_causal.yaml")
DIFFUSION = str(ROOT / "configs" / "tiny" / "dynamics_diffusion.yaml")


@pytest.mark.parametrize(
    "config,extra,kind",
    [
        (CAUSAL, ["--model.init_args.model.width=32"], "causal"),  # a dotted override keeps the config's kind
        (TINY, ["--model.init_args.model.kind=causal", "--model.init_args.model.width=32"], "causal"),  # switches it
        (DIFFUSION, ["--model.init_args.model.width=32", "--model.init_args.model.code_dim=8"], "diffusion"),
    ],
)
def test_model_kind_trains_exports_and_steps_as_a_world(config, extra, kind, token_shards, frozen, tmp_path):
    """``model.kind`` picks the dynamics model through the CLI (jsonargparse alone turned a dotted override of a
    causal config into a MaskGIT model), the checkpoint resumes as that kind, and the export steps in a World."""
    from genie.world import World, write_bundle

    root = tmp_path / "run"
    assert main([*fit_args(config, token_shards, root, *frozen, "--trainer.max_steps=2", *extra)]) == 0
    cfg = json.loads((root / "export" / "config.json").read_text())
    assert cfg["kind"] == kind and cfg["width"] == 32
    stage = load_stage_checkpoint(root / "checkpoints" / "last.ckpt")
    assert stage.net.config.kind == kind
    world = World.from_pretrained(write_bundle(tmp_path / "world", *frozen, root / "export"), seed=0)
    assert world.dynamics.config.kind == kind
    assert json.loads((tmp_path / "world" / "world.json").read_text())["dynamics_kind"] == kind
    world.reset(np.zeros((24, 24, 3), np.uint8))
    assert world.step(1).shape == (24, 24, 3)
    if kind != "maskgit":  # only MaskGIT's step is compiled: the others refuse --compile before any work
        from genie.models.sampler import SamplerConfig

        with pytest.raises(ValueError, match=f"compile is not available for the {kind} dynamics kind"):
            World.from_pretrained(tmp_path / "world", sampler=SamplerConfig(compile=True))


def test_diffusion_code_dim_that_does_not_fit_the_tokenizer_is_one_line(token_shards, frozen, tmp_path, capsys):
    """The diffusion kind reads the tokenizer's code vectors: its code_dim must be theirs, and the error says so."""
    args = fit_args(DIFFUSION, token_shards, tmp_path / "run", *frozen, "--model.init_args.model.width=32")
    assert main([*args, "--model.init_args.model.code_dim=5", "--trainer.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "code_dim=5 but the tokenizer's codes have 8" in err
    assert "model.code_dim=8" in err


def test_unknown_model_kind_is_one_line(token_shards, frozen, tmp_path, capsys):
    args = fit_args(TINY, token_shards, tmp_path / "run", *frozen, "--model.init_args.model.kind=gan")
    assert main([*args, "--model.init_args.model.width=32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: model.kind='gan': choose one of maskgit, causal, diffusion"


def test_joint_lam_trains_through_the_dynamics_loss_and_exports_beside_it(
    sprites_shards: Path, token_shards: Path, frozen, tmp_path: Path, capsys
):
    """lam_training=joint: the LAM is trained by the dynamics loss (alone, with lam_loss_weight=0: its encoder
    moves and its decoder does not), checkpointed with the dynamics model, exported as export/lam with its codes the
    same in training and eval mode, and the only LAM `genie export world` pairs with that dynamics model."""
    from genie.world import World

    root = tmp_path / "run"
    joint = ["--model.init_args.lam_training=joint", "--model.init_args.lam_loss_weight=0"]
    args = fit_args(TINY, sprites_shards, root, *frozen, *joint, "--trainer.max_steps=3")
    assert main([*args, "--trainer.val_check_interval=3"]) == 0
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(k.startswith("lam.") for k in ckpt["state_dict"])
    start, trained = (LatentActionModel.from_pretrained(p) for p in (frozen[1], root / "export" / "lam"))
    assert not torch.equal(start.to_code.weight, trained.to_code.weight)  # the encoder learned from the dynamics
    assert torch.equal(start.to_pixels.weight, trained.to_pixels.weight)  # the decoder had no loss
    assert start.latent_norm.phase_name == "batch" and trained.latent_norm.phase_name == "frozen"

    export = ["export", "world", "--tokenizer", str(frozen[0]), "--dynamics", str(root / "export"), "--steps", "2"]
    assert main([*export, "--out", str(tmp_path / "world")]) == 0  # --lam defaults to the dynamics' own
    world = World.from_pretrained(tmp_path / "world", seed=0)
    assert torch.equal(world.lam.to_code.weight, trained.to_code.weight)
    capsys.readouterr()
    assert main([*export, "--lam", str(frozen[1]), "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained jointly with its LAM" in err and "export/lam" in err

    # a frozen-LAM run exported into the same folder drops the joint LAM (its dynamics model never saw it)
    assert main([*fit_args(TINY, sprites_shards, root, *frozen, "--trainer.max_steps=1")]) == 0
    assert not (root / "export" / "lam").exists()

    # token shards have no frames for the LAM; the true actions use no LAM: one line each
    tokens = fit_args(TINY, token_shards, tmp_path / "tokens", *frozen, *joint, "--trainer.max_steps=1")
    assert main(tokens) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs video shards" in err
    true = ["--model.init_args.model.action_source=true", "--model.init_args.model.num_actions=6"]
    assert main(fit_args(TINY, sprites_shards, tmp_path / "true", *frozen, *joint, *true)) == 2
    assert "action_source=true uses no LAM" in capsys.readouterr().err
