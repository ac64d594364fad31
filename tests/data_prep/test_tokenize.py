"""`genie prep tokenize` with several input folders: each gets its own output folder (shard names repeat)."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.common import PrepError
from data_prep.tokenize import output_folders


def test_several_folders_keep_their_paths_below_their_common_parent(tmp_path: Path):
    games = [tmp_path / "pg" / g / split for g in ("bigfish", "maze") for split in ("train", "val")]
    for folder in games:
        folder.mkdir(parents=True)
    out = tmp_path / "tokens"
    mapped = dict(output_folders([str(g) for g in games], out))
    assert mapped[str(games[0])] == out / "bigfish" / "train" and mapped[str(games[3])] == out / "maze" / "val"
    assert len(set(mapped.values())) == 4
    assert output_folders(["data/{a,b}.tar"], out) == [("data/{a,b}.tar", out)]  # one input: OUT itself
    with pytest.raises(PrepError, match="each must be a folder"):
        output_folders([str(games[0]), str(tmp_path / "nope")], out)
