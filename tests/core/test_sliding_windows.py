"""SWG's crop windows and stitch (guiders/sliding_windows.py): coverage, alignment, exact round trip, video."""

import pytest
import torch

from guidance_kit.guiders.sliding_windows import crop, crop_windows, stitch, window_starts


def test_windows_cover_the_latent_aligned_to_the_patch():
    windows = crop_windows(32, 24, 0.75, 2, align=8)
    assert windows == [(slice(0, 24), slice(0, 16)), (slice(0, 24), slice(8, 24)),
                       (slice(8, 32), slice(0, 16)), (slice(8, 32), slice(8, 24))]
    assert window_starts(64, 48, 3, 2) == [0, 8, 16]
    assert crop_windows(16, 16, 1.0, 3) == [(slice(0, 16), slice(0, 16))]


@pytest.mark.parametrize("shape", [(2, 4, 16, 12), (1, 16, 3, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_crops_of_one_latent_stitch_back_exactly(shape, dtype):
    x = torch.randn(shape).to(dtype)
    windows = crop_windows(shape[-2], shape[-1], 0.75, 2, align=2)
    pieces = crop(x, windows)
    assert pieces.shape[0] == len(windows) * shape[0]
    torch.testing.assert_close(stitch(pieces, windows, x), x)


def test_stitch_is_the_mean_over_covering_windows():
    x = torch.zeros(1, 1, 4, 4)
    windows = [(slice(0, 3), slice(0, 4)), (slice(1, 4), slice(0, 4))]
    pieces = torch.cat([torch.full((1, 1, 3, 4), 1.0), torch.full((1, 1, 3, 4), 3.0)])
    out = stitch(pieces, windows, x)
    assert out[0, 0, 0, 0] == 1 and out[0, 0, 1, 0] == 2 and out[0, 0, 3, 0] == 3


def test_bad_fraction_is_refused():
    with pytest.raises(ValueError, match="crop fraction"):
        crop_windows(8, 8, 0.0, 2)
