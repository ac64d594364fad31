"""`genie fit --compile true`: the stage's ST blocks run compiled and train like the eager ones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from genie.cli import main
from genie.models.blocks import STBlock
from genie.stages.tokenizer import TokenizerStage

from .conftest import cli_fit_args

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny" / "tokenizer.yaml"


def tiny_stage() -> TokenizerStage:
    init = yaml.safe_load(TINY.read_text())["model"]["init_args"]
    torch.manual_seed(0)
    return TokenizerStage(**init)


def loss_and_grads(stage: TokenizerStage, frames: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    stage.net.train()
    loss = stage.training_loss({"frames": frames})
    loss.backward()
    grads = [p.grad.clone() for p in stage.net.parameters() if p.grad is not None]
    stage.net.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_compiled_blocks_match_eager():
    """Dynamo traces every block (the CPU fast paths step aside) and the loss and gradients do not change."""
    torch._dynamo.reset()
    eager, compiled = tiny_stage(), tiny_stage()
    compiled.net.load_state_dict(eager.net.state_dict())
    # "aot_eager" runs dynamo and AOTAutograd's graph capture without generating code: the same graphs as
    # inductor in a fraction of the time (the real compiler runs in the slow test below and on GPUs)
    count = compiled.compile_blocks(backend="aot_eager")
    blocks = [m for m in compiled.net.modules() if isinstance(m, STBlock)]
    assert count == len(blocks) > 0 and all(b._compiled_call_impl is not None for b in blocks)
    frames = torch.randint(0, 256, (2, 4, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    # the dead-code clock would restart codes differently in the two models' identical quantizers otherwise
    eager.net.quantizer.dead_code_threshold = compiled.net.quantizer.dead_code_threshold = 0
    loss_e, grads_e = loss_and_grads(eager, frames)
    loss_c, grads_c = loss_and_grads(compiled, frames)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.slow
def test_fit_with_compile_trains(coinrun_shards: Path, tmp_path: Path):
    """The real thing on the CPU: inductor compiles the blocks inside `genie fit`, and the run ends finite."""
    torch._dynamo.reset()
    root = tmp_path / "run"
    args = cli_fit_args(str(TINY), coinrun_shards, root, "--trainer.max_steps=3", "--compile=true", batch_size=2)
    assert main(args) == 0
    training = json.loads((root / "export" / "training.json").read_text())
    assert training["global_step"] == 3 and math.isfinite(training["last_train_loss"])
    torch._dynamo.reset()
