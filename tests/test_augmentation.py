"""One random draw moves image, mask and landmarks together."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from spinelm.augmentation import (initial_patch_size, landmark_balls, landmarks_from_balls, render_heatmap,
                                  training_transforms)


def _ellipsoid_column(shape=(96, 64, 64), n=4):
    """Ellipsoid 'vertebrae' stacked along axis 0 whose centres of mass are the landmarks."""
    seg = np.zeros(shape, np.int16)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    centres = []
    for k in range(n):
        c = np.array([16 + 20 * k + 0.3, 30.6 + 2 * k, 31.2 - k])
        e = ((zz - c[0]) / 7) ** 2 + ((yy - c[1]) / 12) ** 2 + ((xx - c[2]) / 14) ** 2 <= 1
        seg[e] = k + 1
        centres.append(np.argwhere(e).mean(0))
    image = (seg > 0).astype(np.float32) * 2 - 1 + np.random.default_rng(0).normal(0, 0.1, shape).astype(np.float32)
    return image[None], seg, np.asarray(centres)


@pytest.mark.parametrize("seed", range(12))
def test_landmarks_stay_within_one_voxel_of_their_vertebra_centre(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    image, seg, centres = _ellipsoid_column()
    balls = landmark_balls(seg.shape, centres)
    tr = training_transforms([64, 48, 48], mirror_axes=[1, 2])
    out = tr(image=torch.from_numpy(image), segmentation=torch.from_numpy(np.stack([seg, balls])))
    seg_t, balls_t = out["segmentation"][0], out["segmentation"][1]
    assert out["image"].shape == (1, 64, 48, 48)
    found = landmarks_from_balls(balls_t, len(centres))
    checked = 0
    for k, pos in enumerate(found):
        vox = torch.nonzero(seg_t == k + 1).double()
        if np.isnan(pos).any() or len(vox) == 0:
            continue  # outside the patch
        if vox.min() <= 0 or np.any(vox.max(0).values.numpy() >= np.array([63, 47, 47])):
            continue  # vertebra cut by the patch border: its visible centre is not its centre
        centre = vox.mean(0).numpy()
        assert np.linalg.norm(pos - centre) <= 1.0, (seed, k, pos, centre)
        checked += 1
    assert checked >= 1


def test_mirroring_never_flips_the_cranio_caudal_axis():
    image, seg, centres = _ellipsoid_column()
    balls = landmark_balls(seg.shape, centres)
    tr = training_transforms([96, 64, 64], mirror_axes=[1, 2])
    for seed in range(20):
        torch.manual_seed(seed)
        out = tr(image=torch.from_numpy(image), segmentation=torch.from_numpy(np.stack([seg, balls])))
        found = landmarks_from_balls(out["segmentation"][1], len(centres))
        ok = ~np.isnan(found[:, 0])
        assert np.all(np.diff(found[ok, 0]) > 0), "label order along axis 0 must be kept"


def test_balls_round_trip_and_heatmap_peaks_where_asked():
    pos = np.array([[10.3, 20.7, 5.2], [30.0, 4.4, 17.9], [np.nan, np.nan, np.nan]])
    balls = landmark_balls((40, 32, 24), pos)
    back = landmarks_from_balls(balls, 3)
    np.testing.assert_allclose(back[:2], pos[:2], atol=0.35)
    assert np.isnan(back[2]).all()
    hm = render_heatmap((40, 32, 24), pos, [2.0, 2.0, 1.0])
    assert hm.max() <= 1.0
    assert tuple(np.unravel_index(int(hm.argmax()), hm.shape)) in {(10, 21, 5), (30, 4, 18)}
    assert hm[10, 21, 5] > 0.9 and hm[0, 0, 23] < 1e-6


def test_initial_patch_is_larger_for_rotation_and_scaling():
    assert all(a > b for a, b in zip(initial_patch_size([64, 48, 48]), [64, 48, 48]))
