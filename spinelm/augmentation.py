"""Landmark-safe augmentation with batchgeneratorsv2: one random draw for image, mask and landmarks.

batchgeneratorsv2 does not transform keypoints, so each landmark travels as a small ball of its
own id in an extra segmentation channel (nearest-neighbour interpolation keeps ids intact). After
the spatial transform, a landmark's position is the centre of mass of its ball, and the heatmap
target is rendered at that position, exactly, rather than interpolated.

The transform list is nnU-Net's (spatial: rotation and scaling; intensity: noise, blur,
brightness, contrast, low resolution, gamma; mirroring) with mirroring restricted to the plan's
``mirror_axes`` (never the cranio-caudal axis, which would reverse the label order). No SimpleITK
here: this module runs on training machines.
"""
from __future__ import annotations

import numpy as np
import torch

#: Radius (voxels) of the ball a landmark travels as; >= 2 survives down-scaling by 0.7 and
#: rotation without vanishing under nearest-neighbour sampling.
LANDMARK_BALL_RADIUS = 2.5
#: Rotation range of nnU-Net's 3-D augmentation (radians, each axis).
ROTATION_3D = (-30.0 / 360 * 2 * np.pi, 30.0 / 360 * 2 * np.pi)
#: nnU-Net's scaling range.
SCALING = (0.7, 1.4)


def initial_patch_size(patch_size, rotation=ROTATION_3D, scaling=SCALING) -> list[int]:
    """Crop size to extract before the spatial transform so that a rotated, scaled patch has no
    empty corners (nnunetv2's ``get_patch_size``)."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

    return [int(v) for v in get_patch_size(patch_size, rotation, rotation, rotation, scaling)]


def training_transforms(patch_size, mirror_axes, use_mask_for_norm=None):
    """nnU-Net's training augmentation, composed from batchgeneratorsv2 transforms.

    Expects ``image`` (C, X, Y, Z) and ``segmentation`` (2, X, Y, Z): channel 0 the segmentation
    target (-1 outside the body), channel 1 the landmark balls.
    """
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

    t = [
        SpatialTransform(list(patch_size), patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                         p_rotation=0.2, rotation=ROTATION_3D, p_scaling=0.2, scaling=SCALING,
                         p_synchronize_scaling_across_axes=1, border_mode_seg="constant", padding_value_seg=-1,
                         mode_seg="nearest"),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5, benchmark=True),
                        apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None, allowed_channels=None,
                                                       p_per_channel=0.5), apply_probability=0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.3),
    ]
    if mirror_axes:
        t.append(MirrorTransform(allowed_axes=tuple(mirror_axes)))
    if use_mask_for_norm is not None and any(use_mask_for_norm):
        t.append(MaskImageTransform(apply_to_channels=[i for i, u in enumerate(use_mask_for_norm) if u],
                                    channel_idx_in_seg=0, set_outside_to=0))
    t.append(RemoveLabelTansform(-1, 0))
    return ComposeTransforms(t)


def landmark_balls(shape, positions: np.ndarray, radius: float = LANDMARK_BALL_RADIUS) -> np.ndarray:
    """int16 volume with a ball of id ``k + 1`` around each position ``k`` (voxel indices)."""
    out = np.zeros(shape, np.int16)
    r = int(np.ceil(radius))
    offs = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    for k, p in enumerate(np.asarray(positions, dtype=np.float64).reshape(-1, 3)):
        if not np.all(np.isfinite(p)):
            continue
        centre = np.round(p).astype(int)
        pts = centre + offs
        keep = np.linalg.norm(pts - p, axis=1) <= radius
        pts = pts[keep]
        inside = np.all((pts >= 0) & (pts < np.asarray(shape)), axis=1)
        pts = pts[inside]
        out[pts[:, 0], pts[:, 1], pts[:, 2]] = k + 1
    return out


def landmarks_from_balls(balls: torch.Tensor | np.ndarray, n: int, min_voxels: int = 4) -> np.ndarray:
    """Centre of mass of each ball id ``1..n``: (n, 3) voxel positions, NaN where a ball is missing
    or has fewer than ``min_voxels`` voxels (mostly outside the patch)."""
    b = torch.as_tensor(balls).long().reshape(-1)
    shape = tuple(balls.shape)
    out = np.full((n, 3), np.nan)
    if n == 0:
        return out
    counts = torch.bincount(b.clamp(min=0), minlength=n + 1)[1:n + 1]
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
    for axis, g in enumerate(grids):
        sums = torch.bincount(b.clamp(min=0), weights=g.reshape(-1), minlength=n + 1)[1:n + 1]
        out[:, axis] = (sums / counts.clamp(min=1)).numpy()
    out[(counts < min_voxels).numpy()] = np.nan
    return out


def render_heatmap(shape, positions: np.ndarray, sigma_vox, device=None) -> torch.Tensor:
    """One heatmap channel: the maximum of unit-peak Gaussians at ``positions`` (voxels).

    Args:
        shape: spatial shape (X, Y, Z).
        positions: (n, 3) voxel positions; NaN rows are skipped.
        sigma_vox: Gaussian sigma per axis in voxels.
    """
    sig = torch.as_tensor(np.asarray(sigma_vox, dtype=np.float32), device=device)
    axes = [torch.arange(s, dtype=torch.float32, device=device) for s in shape]
    out = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
    for p in np.asarray(positions, dtype=np.float32).reshape(-1, 3):
        if not np.all(np.isfinite(p)):
            continue
        g = [torch.exp(-0.5 * ((axes[a] - float(p[a])) / sig[a]) ** 2) for a in range(3)]
        out = torch.maximum(out, g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :])
    return out
