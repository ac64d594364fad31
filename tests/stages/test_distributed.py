"""Every stage as 2 processes on CPU (gloo): DDP through `genie fit`, and the large dynamics config's FSDP settings
through a CPU shim of Lightning's FSDP strategy.

Each run is a real `genie fit` subprocess with `--trainer.devices=2`: Lightning's launcher re-runs the command for
rank 1, so this also checks that `genie fit` hands it the right command line. A recording callback (below, imported
by both ranks through PYTHONPATH) writes what each rank saw: the clip keys of its batches, the global gradient norm
of each step and a digest of its final weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import FSDPStrategy
from safetensors.torch import load_file

from genie.models.blocks import STTransformer
from genie.models.lam import LAMConfig, LatentActionModel
from genie.models.quantizer import VectorQuantizer
from genie.models.tokenizer import TokenizerConfig, VideoTokenizer
from genie.stages.base import load_stage_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "tiny"
LARGE_DYNAMICS = ROOT / "configs" / "large" / "dynamics.yaml"  # the config that trains under FSDP
STEPS = 3
SMALL = ["--model.init_args.model.width=32", "--model.init_args.model.num_heads=2"]
VQ_SMALL = [*SMALL, "--model.init_args.model.encoder_depth=1", "--model.init_args.model.decoder_depth=1"]
# the large dynamics config at the frozen parts' shapes, 2 blocks (2 FSDP units), 4-frame windows; clipping that
# bites (a per-shard norm under FSDP would show) and its weight decay on (FSDP's flattened parameters losing their
# matrix shape would show)
DYNAMICS_ARGS = [
    *SMALL,
    "--model.init_args.model.depth=2",
    "--model.init_args.model.num_codes=64",
    "--model.init_args.model.grid_size=6",
    "--model.init_args.model.num_actions=6",
    "--model.init_args.model.num_frames=4",
    "--model.init_args.optim.warmup_steps=1",
    "--data.num_frames=4",
    "--trainer.gradient_clip_val=0.05",
]


class Recorder(Callback):
    """Test instrument: writes ``<out>/rank<r>.json`` on every rank (unlike genie's own files: rank zero only)."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.keys: list[str] = []
        self.grad_norms: list[float] = []
        self.masks: list[str] = []  # digests of the MaskGIT masks the dynamics stage drew
        self.checkpointing = False

    def on_train_start(self, trainer, pl_module) -> None:
        net = getattr(pl_module, "net", None)
        if hasattr(net, "random_mask"):
            draw = net.random_mask

            def recording(*args, **kwargs):
                mask = draw(*args, **kwargs)
                self.masks.append(hashlib.sha256(mask.cpu().numpy().tobytes()).hexdigest())
                return mask

            net.random_mask = recording

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys += batch["keys"]
        stacks = [m for m in pl_module.modules() if isinstance(m, STTransformer)]
        self.checkpointing = bool(stacks) and all(m.gradient_checkpointing for m in stacks)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.grad_norms.append(float(pl_module.last_grad_norm))

    def on_train_end(self, trainer, pl_module) -> None:
        digest = None
        if not isinstance(trainer.strategy, FSDPStrategy):  # under FSDP each rank holds shards, nothing to compare
            # the weights: parameters. Batch-norm running statistics (the LAM's latent norm) are per rank by design;
            # DDP copies rank 0's into every rank at the start of each forward, and rank 0 writes the checkpoint
            sha = hashlib.sha256()
            for name, tensor in sorted(pl_module.named_parameters()):
                sha.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
            digest = sha.hexdigest()
        record = {"keys": self.keys, "grad_norms": self.grad_norms, "weights": digest, "masks": self.masks}
        record["checkpointing"] = self.checkpointing
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _cpu_full_state_dict_context(module, world_size: int, rank0_only: bool = True):
    """Lightning's full-state-dict context without ``offload_to_cpu``: on CPU ranks offloading frees the very
    storage the gathered tensors live in (a segfault when the checkpoint is written)."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    return FSDP.state_dict_type(
        module=module,
        state_dict_type=StateDictType.FULL_STATE_DICT,
        state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


SHIM = f"{__name__}.CPUFSDPStrategy"


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP strategy made to run on CPU ranks over gloo, for tests only.

    Lightning refuses FSDP without CUDA (a check on the exact class, which a subclass passes) and hands torch's FSDP
    ``device_id=None`` on CPU, which it rejects; torch's FSDP itself runs on CPU given ``device_id=cpu``. Everything
    genie does under FSDP (auto-wrap per ST block, activation checkpointing, the global-norm clipping, the gathered
    export, checkpoints) then runs as on GPUs.
    """

    def setup_environment(self) -> None:
        import lightning.pytorch.strategies.fsdp as lightning_fsdp

        lightning_fsdp._get_full_state_dict_context = _cpu_full_state_dict_context
        super().setup_environment()

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self.root_device.type == "cpu":
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
        return super()._setup_model(model)  # already wrapped: Lightning only adds activation checkpointing


def fit_2_ranks(config: Path, shards: Path, root: Path, *extra: str, strategy: str = "ddp") -> dict[int, dict]:
    """`genie fit` as 2 CPU processes; returns each rank's record.

    ``strategy="ddp"``, or ``"fsdp"``: the config's own FSDP settings with the CPU shim as the strategy class.
    """
    args = [sys.executable, "-m", "genie.cli", "fit", "--config", str(config)]
    args += [f"--data.train_shards={shards / 'train'}", f"--data.val_shards={shards / 'val'}"]
    args += ["--data.num_workers=0", "--data.batch_size=2", "--trainer.limit_val_batches=0"]
    args += [f"--trainer.default_root_dir={root}", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    args += [f"--trainer.max_steps={STEPS}", f"--checkpoint_every={STEPS}", "--trainer.enable_model_summary=false"]
    args += ["--trainer.accelerator=cpu", "--trainer.devices=2", f"--trainer.callbacks+={__name__}.Recorder"]
    args += [f"--trainer.callbacks.out={root / 'record'}"]
    args += [f"--trainer.strategy={strategy}" if strategy == "ddp" else f"--trainer.strategy.class_path={SHIM}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    done = subprocess.run([*args, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r: json.loads((root / "record" / f"rank{r}.json").read_text()) for r in (0, 1)}


@pytest.fixture(scope="module")
def frozen(tmp_path_factory) -> tuple[Path, Path]:
    """Untrained 24 px tokenizer (64 codes) and LAM (6 actions) in exported folders: the tiny world's shapes."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("frozen")
    small = dict(image_size=24, patch_size=4, width=32, num_heads=2, mlp_ratio=2.0, encoder_depth=1, decoder_depth=1)
    VideoTokenizer(TokenizerConfig(num_frames=8, code_dim=8, num_codes=64, **small)).save_pretrained(root / "tok")
    LatentActionModel(LAMConfig(num_frames=4, code_dim=4, num_actions=6, **small)).save_pretrained(root / "lam")
    return root / "tok", root / "lam"


@pytest.fixture(scope="module")
def tokenizer_ddp(sprites_shards: Path, tmp_path_factory) -> tuple[Path, dict]:
    """With --gradient_checkpointing: recomputed blocks under DDP."""
    root = tmp_path_factory.mktemp("tok_ddp") / "run"
    args = [*VQ_SMALL, "--gradient_checkpointing=true"]
    return root, fit_2_ranks(CONFIGS / "sprites_tokenizer.yaml", sprites_shards, root, *args)


@pytest.fixture(scope="module")
def lam_ddp(sprites_shards: Path, tmp_path_factory) -> tuple[Path, dict]:
    """With a validation run at the end (metrics and the NMI table summed over ranks)."""
    root = tmp_path_factory.mktemp("lam_ddp") / "run"
    args = [*VQ_SMALL, "--trainer.limit_val_batches=1", f"--trainer.val_check_interval={STEPS}"]
    return root, fit_2_ranks(CONFIGS / "lam.yaml", sprites_shards, root, *args)


@pytest.fixture(scope="module")
def dynamics_ddp(sprites_shards: Path, frozen, tmp_path_factory) -> tuple[Path, dict]:
    """The large dynamics config (scaled down) under DDP, on video shards: each rank tokenizes its own batches."""
    root = tmp_path_factory.mktemp("dyn_ddp") / "run"
    frozen_args = [f"--model.init_args.tokenizer={frozen[0]}", f"--model.init_args.lam={frozen[1]}"]
    return root, fit_2_ranks(LARGE_DYNAMICS, sprites_shards, root, *DYNAMICS_ARGS, *frozen_args)


# the default suite runs one stage's 2-rank run, the dynamics' (~17 s on 2 cores; it covers the per-rank MaskGIT
# masks, and the StageModule/loader path is the same for all three); `-m slow` runs the tokenizer's (~30 s; it
# covers gradient checkpointing) and the LAM's (~16 s)
SLOW = pytest.mark.slow


@pytest.mark.parametrize("stage", [pytest.param("tokenizer", marks=SLOW), pytest.param("lam", marks=SLOW), "dynamics"])
def test_ddp_ranks_see_different_clips_and_end_identical(stage: str, request):
    root, ranks = request.getfixturevalue(f"{stage}_ddp")
    keys0, keys1 = set(ranks[0]["keys"]), set(ranks[1]["keys"])
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == 2 * STEPS  # batch 2 per rank per step
    assert not keys0 & keys1  # the loader split the shards by rank
    assert ranks[0]["weights"] == ranks[1]["weights"]  # bit-identical replicas
    assert ranks[0]["grad_norms"] == ranks[1]["grad_norms"]  # same averaged gradients, same clipping and checks
    assert ranks[0]["checkpointing"] == (stage == "tokenizer")  # --gradient_checkpointing reached every stack
    if stage == "dynamics":  # each rank draws its own MaskGIT masks (one seed everywhere would repeat them)
        assert len(ranks[0]["masks"]) == len(ranks[1]["masks"]) == STEPS
        assert all(a != b for a, b in zip(ranks[0]["masks"], ranks[1]["masks"], strict=True))
    last = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == STEPS and last["nonfinite"]["skipped"] == 0
    assert (root / "export" / "model.safetensors").is_file()


@pytest.mark.slow  # ~18 s each here (2026-12-06); FSDP is still run by `pytest -m slow`
def test_large_dynamics_fsdp_settings_on_cpu_match_ddp(sprites_shards: Path, frozen, dynamics_ddp, tmp_path: Path):
    """The large dynamics config's FSDP settings (one unit and activation checkpointing per ST block), clipping that
    bites, against DDP on the same data: the same global gradient norm every step, and a checkpoint and an export
    of whole, unwrapped weights."""
    ddp_root, ddp = dynamics_ddp
    root = tmp_path / "fsdp"
    frozen_args = [f"--model.init_args.tokenizer={frozen[0]}", f"--model.init_args.lam={frozen[1]}"]
    fsdp = fit_2_ranks(LARGE_DYNAMICS, sprites_shards, root, *DYNAMICS_ARGS, *frozen_args, strategy="fsdp")
    assert fsdp[0]["keys"] == ddp[0]["keys"] and fsdp[1]["keys"] == ddp[1]["keys"]
    # the clipping norm is the global one (a per-shard norm would differ between ranks and from DDP's)
    assert fsdp[0]["grad_norms"] == fsdp[1]["grad_norms"]
    assert fsdp[0]["grad_norms"] == pytest.approx(ddp[0]["grad_norms"], rel=1e-4)
    assert min(fsdp[0]["grad_norms"]) > 0.05  # so the clipping at 0.05 acted on every step
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ddp_ckpt = torch.load(ddp_root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"].keys() == ddp_ckpt["state_dict"].keys()  # no FSDP or checkpoint-wrapper prefixes
    for k, v in ckpt["state_dict"].items():
        assert v.shape == ddp_ckpt["state_dict"][k].shape, k
    # weight decay grouped the same way (FSDP flattens parameters; the stage decided decay per layer kind in setup)
    groups = [len(g["params"]) for g in ckpt["optimizer_states"][0]["param_groups"]]
    assert groups == [len(g["params"]) for g in ddp_ckpt["optimizer_states"][0]["param_groups"]]
    # the export is the gathered model, the same as the checkpoint
    stage = load_stage_checkpoint(root / "checkpoints" / "last.ckpt")
    exported = load_file(root / "export" / "model.safetensors")
    for k, v in stage.net.state_dict().items():
        assert torch.equal(exported[k], v), k


class RestartProbe(Callback):
    """Test instrument: records each rank's deferred dead-code restarts after a step, and at the next step's start
    reads the gathered codebook to see that those rows reached the shards (written to ``<out>/probe<r>.json``)."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.waiting: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.checked: list[bool] = []
        self.deferred = False

    def _quantizers(self, pl_module):
        return [m for m in pl_module.modules() if isinstance(m, VectorQuantizer)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # callbacks run before the module's own hook: the restarts are still pending here
        self.deferred = all(q.defer_restarts for q in self._quantizers(pl_module))
        for q in self._quantizers(pl_module):
            if q.pending_restarts is not None:
                idx, new = q.pending_restarts
                self.waiting.append((idx.clone(), new.clone()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.waiting:
            return
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
            codebook = self._quantizers(pl_module)[0].codebook_VZ.detach()
            for idx, new in self.waiting:
                self.checked.append(bool(torch.equal(codebook[idx], new.to(codebook.dtype))))
        self.waiting = []

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"checked": self.checked, "deferred": self.deferred}
        (self.out / f"probe{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow  # ~18 s each here (2026-12-06); FSDP is still run by `pytest -m slow`
def test_tokenizer_under_fsdp_restarts_dead_codes_into_every_shard(sprites_shards: Path, tmp_path: Path):
    """FSDP and dead-code restarts: inside forward the codebook is a view of a temporary gathered parameter, so the
    restarts wait until after the optimizer step and are written into the shards (summon_full_params); the probe
    finds them in the gathered codebook at the next step, on both ranks, and training goes on."""
    root = tmp_path / "fsdp"
    probe = [f"--trainer.callbacks+={__name__}.RestartProbe", f"--trainer.callbacks.out={root / 'probe'}"]
    args = [*VQ_SMALL, "--model.init_args.model.dead_code_threshold=1", *probe]
    ranks = fit_2_ranks(CONFIGS / "sprites_tokenizer.yaml", sprites_shards, root, *args, strategy="fsdp")
    probes = [json.loads((root / "probe" / f"probe{r}.json").read_text()) for r in (0, 1)]
    assert probes[0]["deferred"] and probes[1]["deferred"]
    assert probes[0]["checked"] and all(probes[0]["checked"]) and probes[0]["checked"] == probes[1]["checked"]
    assert ranks[0]["grad_norms"] == ranks[1]["grad_norms"] and all(math.isfinite(g) for g in ranks[0]["grad_norms"])
    exported = load_file(root / "export" / "model.safetensors")
    assert int(exported["quantizer.num_restarts"]) > 0  # counted in the gathered export
