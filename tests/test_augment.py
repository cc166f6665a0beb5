import pytest
import torch

from cmtl.augment import augment_batch, random_resized_crop


def _columns(n: int = 6, size: int = 16) -> torch.Tensor:
    """Images whose every pixel holds its column index: a crop shows up as a linear ramp."""
    return torch.arange(size, dtype=torch.float32).expand(n, 3, size, size).clone()


def test_full_area_square_crop_is_the_identity_and_flip_mirrors_half_the_batch_at_random():
    x = torch.randn(8, 3, 12, 12)
    same = random_resized_crop(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    flipped = random_resized_crop(
        x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True
    )
    mirrored = [torch.allclose(f, i.flip(-1), atol=1e-5) for f, i in zip(flipped, x)]
    kept = [torch.allclose(f, i, atol=1e-5) for f, i in zip(flipped, x)]
    assert all(m != k for m, k in zip(mirrored, kept)) and 0 < sum(mirrored) < len(x)


def test_each_sample_gets_its_own_crop_inside_the_image_covering_at_least_the_smallest_scale():
    x = _columns()
    out = augment_batch(x, "crop", torch.Generator().manual_seed(3))
    assert out.shape == x.shape
    rows = out[:, 0, 8]  # one row per sample: pixel columns as the crop resampled them
    step = rows.diff(dim=1)
    # a crop is a linear ramp over a window of the image: constant step, inside [0, size - 1]
    assert torch.allclose(step, step[:, :1].expand_as(step), atol=1e-4)
    assert rows.min() >= 0 and rows.max() <= 15
    # a crop is at least sqrt(0.8 * 3/4) of the width and at most all of it
    assert ((step[:, 0] >= (0.8 * 3 / 4) ** 0.5 - 1e-4) & (step[:, 0] <= 1 + 1e-4)).all()
    assert len({round(float(r[0]), 4) for r in rows}) > 1  # different windows per sample
    again = augment_batch(x, "crop", torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # the generator decides everything


def test_crop_flip_mirrors_some_rows_and_none_leaves_the_batch_alone():
    x = _columns(n=16)
    rows = augment_batch(x, "crop_flip", torch.Generator().manual_seed(0))[:, 0, 8]
    decreasing = (rows.diff(dim=1) < 0).all(dim=1)
    assert 0 < int(decreasing.sum()) < 16
    assert augment_batch(x, "none") is x
    with pytest.raises(ValueError, match="'flip'.*valid: none, crop, crop_flip"):
        augment_batch(x, "flip")
