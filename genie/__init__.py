"""genie: train Genie-style generative interactive environments from unlabeled video."""

__version__ = "0.1.0"
