import numpy as np
import pytest

from genie.data.windows import fixed_start, sample_window, window_span


@pytest.mark.parametrize("clip,frames,stride", [(16, 16, 1), (20, 8, 1), (40, 8, 3), (9, 1, 1)])
def test_every_start_is_sampled_and_windows_stay_inside(clip, frames, stride):
    rng = np.random.default_rng(0)
    span = window_span(frames, stride)
    starts = set()
    for _ in range(2000):
        idx = sample_window(clip, frames, stride, rng=rng)
        assert len(idx) == frames
        assert idx[0] >= 0 and idx[-1] <= clip - 1
        assert np.all(np.diff(idx) == stride)
        starts.add(int(idx[0]))
    assert starts == set(range(clip - span + 1))


def test_too_short_clip_is_a_clear_error():
    with pytest.raises(ValueError, match="needs 16"):
        sample_window(10, 16, 1)


def test_fixed_start_is_deterministic_and_valid():
    starts = [fixed_start(f"k{i}", 30, 8, 2, seed=1) for i in range(200)]
    assert starts == [fixed_start(f"k{i}", 30, 8, 2, seed=1) for i in range(200)]
    assert min(starts) >= 0 and max(starts) <= 30 - window_span(8, 2)
    assert len(set(starts)) > 5  # spread over the clip, not always 0
