"""The notebooks run top to bottom (executed in a real Jupyter kernel) on a tiny world."""

from __future__ import annotations

from pathlib import Path

import pytest

from genie.cli import main

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out sprites at the tiny world's 16 px, with true actions."""
    out = tmp_path_factory.mktemp("nb") / "sprites"
    args = ["prep", "sprites", "--out", str(out), "--size", "16", "--distractors", "0", "--clip-frames", "8"]
    assert main([*args, "--episodes", "2", "--val-episodes", "4", "--workers", "0"]) == 0
    return out / "val"


def execute(name: str, cwd: Path) -> list[dict]:
    """Run a notebook in a fresh kernel (any cell error fails the test); return its cells with outputs."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb.cells


def test_quickstart_notebook_runs_on_a_tiny_world(tiny_world: Path, tiny_shards: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("GENIE_WORLD", str(tiny_world))
    monkeypatch.setenv("GENIE_DATA", str(tiny_shards))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    cells = execute("quickstart.ipynb", tmp_path)
    outputs = [o for c in cells if c.cell_type == "code" for o in c.get("outputs", [])]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    text = "".join(o.get("text", "") for o in outputs)
    assert len(images) >= 4, "reconstructions, action effects, rollout and the PSNR plot each show a figure"
    assert "5 latent actions, 16x16 frames" in text and "inferred latent actions:" in text
    assert "true actions:" in text and "arrow keys in genie play:" in text


def test_robot_finetune_notebook_runs_on_a_tiny_world(tiny_world: Path, robot_shards_16: Path, tmp_path, monkeypatch):
    monkeypatch.setenv("GENIE_WORLD", str(tiny_world))
    monkeypatch.setenv("GENIE_ROBOT_DATA", str(robot_shards_16))
    monkeypatch.setenv("GENIE_OUT", str(tmp_path / "ft"))
    monkeypatch.setenv("GENIE_FINETUNE_STEPS", "3")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    cells = execute("robot_finetune.ipynb", tmp_path)
    outputs = [o for c in cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4
    assert "adapter: 4 -> one of 5 latent actions" in text and "fine-tuned: rollout PSNR" in text
    assert "latent actions the adapter picked:" in text
    assert (tmp_path / "ft" / "export" / "adapter" / "model.safetensors").is_file()
    assert "steps to" in text and (tmp_path / "transfer" / "transfer.json").is_file()  # genie transfer's table
