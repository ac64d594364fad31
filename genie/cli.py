"""The ``genie`` command: one entry point, subcommands that grow with the project.

Subcommand modules are imported only when used, so ``genie --help`` stays fast and a missing
optional dependency (e.g. CoinRun's procgen) only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from genie.runtime import flush_denormals, keep_freed_memory, quiet_third_party, sparse_progress_bars_when_piped

# (group, name) -> (module path, help). Each module provides add_arguments(parser) and run(args).
COMMANDS: dict[tuple[str, str], tuple[str, str]] = {
    ("prep", "videos"): ("data_prep.videos", "a folder of video files -> clip shards"),
    ("prep", "coinrun"): ("data_prep.coinrun", "Procgen CoinRun episodes (random policy) -> shards with actions"),
    ("prep", "procgen"): ("data_prep.procgen", "any of the 16 Procgen games (random policy) -> shards with actions"),
    ("prep", "sprites"): ("data_prep.sprites", "synthetic controllable sprite videos with known actions"),
    ("prep", "inspect"): ("data_prep.inspect", "describe a shard folder and write a contact sheet PNG"),
    ("prep", "robot"): ("data_prep.robot", "simulated robot-arm episodes (Meta-World experts) -> shards with actions"),
    ("prep", "lerobot"): ("data_prep.lerobot", "LeRobot-layout dataset (videos + parquet) -> shards with actions"),
    ("prep", "tokenize"): ("data_prep.tokenize", "video shards -> token + latent action shards (dynamics input)"),
    ("export", "model"): ("genie.export", "a stage checkpoint -> Hugging Face-layout model folder"),
    ("export", "world"): ("genie.export_world", "tokenizer + LAM + dynamics folders -> one world bundle"),
    ("bench", "data"): ("genie.bench.data", "decoded frames/s through the loader"),
    ("bench", "sample"): ("genie.bench.sample", "ms per generated frame: World.step end to end, or the sampler"),
    ("bench", "train"): ("genie.bench.train", "training step speed of a stage's model (s/step, tokens/s, MFU)"),
    ("eval", "tokenizer"): ("genie.eval.tokenizer", "PSNR/SSIM and codebook usage on held-out clips"),
    ("eval", "lam"): ("genie.eval.lam", "latent action usage and NMI with true actions on held-out clips"),
    ("eval", "world"): ("genie.eval.world", "teacher-forced accuracy, rollout PSNR/SSIM and controllability"),
    ("eval", "sampler"): ("genie.eval.sampler", "rollout quality against MaskGIT steps/unmasking/temperature"),
}

GROUP_HELP = {
    "prep": "make and inspect shards",
    "eval": "metrics JSON + PNGs for a trained model",
    "bench": "speed numbers, as a table and JSON",
    "export": "trained models -> folders to share and load",
}
# top-level commands without subcommands: name -> (module, help)
SINGLE: dict[str, tuple[str, str]] = {
    "rollout": ("genie.rollout", "drive a world with actions from a prompt and write an mp4 or gif"),
    "play": ("genie.play.server", "play a world in the browser: keys pick latent actions (serves 127.0.0.1)"),
    "speedrun": ("genie.speedrun", "a CoinRun world within a time budget: data, 3 stages by wall clock, eval report"),
    "transfer": ("genie.transfer", "does pretraining pay? fine-tune a world and train from scratch, compare on robot"),
    "demo": ("genie.demo", "the whole idea on a CPU in minutes: sprites -> 3 stages -> world -> ΔtPSNR + GIFs"),
}


# exceptions that are the user's to fix: printed as one line, exit 2 (matched by exact type name: a ValueError
# subclass such as json's JSONDecodeError keeps its traceback unless it is listed)
USER_ERRORS = {
    "PrepError",
    "DataError",
    "ConfigError",
    "FileNotFoundError",
    "ValueError",
    "DemoError",
    "TransferError",
    "FileExistsError",
    "SpeedrunError",
    "DamagedFileError",  # a truncated or overwritten model.safetensors / checkpoint (genie.models.hub)
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genie", description=__doc__.splitlines()[0])
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    groups.add_parser("fit", help="train a stage: genie fit --config configs/<setup>/<stage>.yaml", add_help=False)
    sub_by_group: dict[str, argparse._SubParsersAction] = {}
    for group, help_text in GROUP_HELP.items():
        gp = groups.add_parser(group, help=help_text, description=help_text)
        sub_by_group[group] = gp.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    # only import the module of the command actually run (its arguments may need heavy imports)
    wanted = tuple(argv[:2]) if len(argv) >= 2 else None
    for name, (module, help_text) in SINGLE.items():
        p = groups.add_parser(name, help=help_text, description=help_text)
        if argv[:1] == [name]:
            importlib.import_module(module).add_arguments(p)
            p.set_defaults(_module=module)
    for (group, name), (module, help_text) in COMMANDS.items():
        p = sub_by_group[group].add_parser(name, help=help_text, description=help_text)
        if wanted == (group, name):
            importlib.import_module(module).add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()  # before the first big allocation (genie/runtime.py)
    quiet_third_party()  # no product tips or deprecation notices the user cannot act on
    sparse_progress_bars_when_piped()  # a log file gets a bar's state every 30 s, not every redraw
    if argv[:1] == ["export"] and len(argv) > 1 and argv[1] not in {"model", "world", "-h", "--help"}:
        argv.insert(1, "model")  # `genie export CKPT --out DIR` is short for `genie export model ...`
    if argv[:1] == ["fit"]:  # LightningCLI parses its own arguments
        from genie.train import fit

        return fit(argv[1:])  # the stages flush subnormals themselves (StageModule.on_fit_start)
    args = build_parser(argv).parse_args(argv)
    flush_denormals()
    module = importlib.import_module(args._module)
    try:
        module.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # user-facing errors are one line; anything else keeps its traceback
        if type(e).__name__ in USER_ERRORS:
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
