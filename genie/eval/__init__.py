"""Evaluation: metrics shared by training and ``genie eval``, and the eval commands."""
