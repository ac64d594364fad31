"""genie: train Genie-style generative interactive environments from unlabeled video."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `genie.World` without importing torch and the models on `import genie`
    if name == "World":
        from genie.world import World

        return World
    raise AttributeError(f"module 'genie' has no attribute {name!r}")
