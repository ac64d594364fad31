"""Learning test of robot fine-tuning: the tiny sprites world, fine-tuned on a little Meta-World video, predicts
held-out robot clips better than before, and its action adapter maps the robot's real actions to the LAM's
latent actions clearly better than chance.

Marked slow: ~2 min of fine-tuning and evaluation on top of the shared world fixture (2026-12-06, 2-core EPYC
running ~2.4x slower than the one behind the older figures); `pytest -m slow tests/stages/test_finetune_learning.py`.

Bars from a sweep (reach-v3 at 24 px, --action-repeat 6, 48 held-out clips, horizon 4, greedy, 200 steps with the
LAM fine-tuned too), world of seed 0 fine-tuned with seeds 0 / 1 / 2:

- teacher-forced token accuracy 0.08 -> 0.94 / 0.94 / 0.94;
- rollout PSNR with inferred actions 13.97 -> 15.31 / 15.33 / 15.33 dB (+1.3; a Xeon run of the older world
  gave +1.33 too, so the earlier +2 dB bar, set from one run, failed there);
- adapter accuracy 0.30 / 0.43 / 0.43 against always-majority 0.28 / 0.33 / 0.28 and chance 0.17.

The sprites world itself differs with the thread count its chain trained on (float reductions), and on a world
trained on 1 thread the adapter ended at 0.056, below chance: the fine-tuned LAM's dead-code restarts ran to the
last step and re-purposed codes the adapter had been fitted to. With restarts stopping half way (``restarts_until``,
2026-12-07, Xeon, fine-tune seed 0): 0.30 against always-majority 0.39 on the 1-thread world, 0.52 against 0.44 on
the 2-thread one (teacher-forced accuracy 0.94 / 0.94, rollout PSNR 8.91 -> 16.06 / 9.86 -> 17.01 dB). So the
adapter beats chance on every world (bar 1.5x chance = 0.25) but not always the majority answer, which is no longer
asserted: 24 px frames show the arm's move too faintly for the LAM's codes to follow the robot's actions closely.

ΔtPSNR stays ~0 on these clips: the frozen sprites tokenizer cannot draw a 24 px arm well enough for its motion to
show (copying the last frame, 24.7 dB, is still far ahead); larger worlds and train_tokenizer are for that.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from genie.eval.world import evaluate_world
from genie.models.sampler import SamplerConfig
from genie.world import World

from .conftest import train_from_config

GREEDY = SamplerConfig(steps=4, temperature=0.0)


def evaluate(world: Path, shards: Path) -> dict:
    report = evaluate_world(World.from_pretrained(world, sampler=GREEDY), str(shards / "val"), horizon=4, max_clips=48)
    print({k: round(v, 3) for k, v in report.items() if isinstance(v, float)})
    return report


@pytest.mark.slow
def test_finetuning_improves_robot_rollouts_and_the_adapter_maps_robot_actions(
    sprites_world: Path, robot_shards_24: Path, tmp_path: Path
):
    before = evaluate(sprites_world, robot_shards_24)
    stage, _ = train_from_config("robot/finetune.yaml", str(robot_shards_24 / "train"), 200, world=str(sprites_world))
    after = evaluate(stage.export(tmp_path / "world"), robot_shards_24)
    assert after["teacher_forced_token_accuracy"] > before["teacher_forced_token_accuracy"] + 0.5
    assert after["psnr_mean"] > before["psnr_mean"] + 0.5
    assert "adapter_accuracy" not in before and after["adapter_transitions"] >= 100
    assert after["adapter_accuracy"] > 1.5 * after["adapter_chance"]
