"""Training patches from the preprocessing cache: crop, augment, targets.

A patch is centred on a random vertebra centroid (jittered) with probability
:data:`FOREGROUND_PROBABILITY`, anywhere otherwise. The crop is larger than the patch so that the
spatial augmentation never samples outside; landmarks travel as balls (see
:mod:`spinelm.augmentation`) and heatmaps are rendered after augmentation. No SimpleITK here.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from spinelm.augmentation import (initial_patch_size, landmark_balls, landmarks_from_balls, render_heatmap,
                                  training_transforms)

#: Share of patches centred on a vertebra. nnU-Net forces foreground into 33 % of its patches and
#: samples the rest at random; spine patches hold vertebrae most of the time anyway, and centring
#: two thirds on a (jittered) centroid makes the rare end-of-run labels (C1, the sacrum) seen
#: often enough within a CPU budget. Chosen, not tuned: no comparison with 0.33 was run.
FOREGROUND_PROBABILITY = 0.67


def _crop(array: np.ndarray, centre, size, pad_value) -> np.ndarray:
    """(C, X, Y, Z) crop of ``size`` centred at ``centre``, padded with ``pad_value`` outside."""
    shape = np.asarray(array.shape[1:])
    size = np.asarray(size)
    lo = np.round(np.asarray(centre) - size / 2).astype(int)
    hi = lo + size
    src_lo, src_hi = np.maximum(lo, 0), np.minimum(hi, shape)
    out = np.full((array.shape[0], *size), pad_value, dtype=array.dtype)
    if np.all(src_hi > src_lo):
        dst_lo = src_lo - lo
        dst_hi = dst_lo + (src_hi - src_lo)
        out[:, dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = \
            array[:, src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]]
    return out, lo


class PatchSampler:
    """Draws augmented training patches and their targets from cached cases.

    Args:
        cache: folder of one configuration's preprocessed cases.
        case_ids: cases to draw from.
        plans: spinelm plans (:class:`spinelm.plans.Plans` or the dict).
        augment: apply the training augmentation (False for plain crops).
    """

    def __init__(self, cache: str | Path, case_ids: list[str], plans, augment: bool = True,
                 configuration: str = "fine"):
        from spinelm.plans import as_plans

        plans = as_plans(plans)
        self.cache = Path(cache)
        self.case_ids = list(case_ids)
        if not self.case_ids:
            raise ValueError("no training cases to sample from")
        cfg = plans.configuration(configuration)
        self.patch_size = list(cfg.patch_size)
        self.crop_size = initial_patch_size(self.patch_size) if augment else self.patch_size
        self.spacing = np.asarray(cfg.spacing, dtype=np.float64)
        heads = plans.heads
        hm = heads["heatmap"]
        self.sigma_vox = float(cfg.heatmap_sigma_mm or hm.sigma_mm) / self.spacing
        self.per_label = hm.per_label
        self.heatmap_labels = list(hm.labels)
        self.ignore_label = heads["segmentation"].channels if "segmentation" in heads else None
        self.structures_ignore = heads["structures"].channels if "structures" in heads else None
        self.transforms = training_transforms(self.patch_size, plans.mirror_axes,
                                              plans.raw["configurations"][configuration].get("use_mask_for_norm")) \
            if augment else None
        self._props = {c: json.loads((self.cache / f"{c}.json").read_text()) for c in self.case_ids}

    def _load(self, case: str):
        return (np.load(self.cache / f"{case}_data.npy", mmap_mode="r"),
                np.load(self.cache / f"{case}_seg.npy", mmap_mode="r"), self._props[case])

    def sample(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        case = self.case_ids[int(rng.integers(len(self.case_ids)))]
        data, seg, props = self._load(case)
        shape = np.asarray(data.shape[1:])
        lms = props["landmarks"]
        positions = np.asarray([lm["index"] for lm in lms], dtype=np.float64).reshape(-1, 3)
        labels = [int(lm["label"]) for lm in lms]
        near = positions if len(lms) else np.asarray([b["center"] for b in props.get("boxes", [])]).reshape(-1, 3)
        if len(near) and rng.random() < FOREGROUND_PROBABILITY:  # on a vertebra (its centroid, else its box)
            centre = near[int(rng.integers(len(near)))] + rng.uniform(-0.25, 0.25, 3) * np.asarray(self.patch_size)
        else:
            centre = rng.uniform(0, 1, 3) * shape
        img, lo = _crop(np.asarray(data), centre, self.crop_size, 0.0)
        sg, _ = _crop(np.asarray(seg), centre, self.crop_size, -1)
        balls = landmark_balls(self.crop_size, positions - lo)
        if self.transforms is not None:
            n = sg.shape[0]  # the vertebra channel, and the structures channel when the plan has one
            out = self.transforms(image=torch.from_numpy(img), segmentation=torch.from_numpy(
                np.concatenate([sg.astype(np.int16), balls[None]])))
            img_t, sg_t, balls_t = out["image"], out["segmentation"][:n], out["segmentation"][n]
        else:
            img_t, sg_t, balls_t = torch.from_numpy(img), torch.from_numpy(sg.astype(np.int16)).clamp(min=0), \
                torch.from_numpy(balls)
        found = landmarks_from_balls(balls_t, len(labels))
        if self.per_label:
            hm = torch.stack([render_heatmap(self.patch_size, found[[i for i, lab in enumerate(labels) if lab == want]],
                                             self.sigma_vox) for want in self.heatmap_labels])
        else:
            hm = render_heatmap(self.patch_size, found, self.sigma_vox)[None]
        item = {"image": img_t.float(), "heatmap": hm, "case": case,
                # False for boxes or scribbles without centroids: the heatmap learns from the background only
                "heatmap_known": torch.tensor(bool(props.get("landmarks_known", True)))}
        if self.ignore_label is not None:
            sg_t = sg_t.long()
            if self.structures_ignore is not None:
                aux = sg_t[1:2] if sg_t.shape[0] > 1 and props["has_mask"] else \
                    torch.full_like(sg_t[:1], self.structures_ignore)
                item["structures"] = aux
            sg_t = sg_t[:1]
            if not props["has_mask"]:
                sg_t = torch.full_like(sg_t, self.ignore_label)
            item["seg"] = sg_t
        return item

    def batch(self, rng: np.random.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        items = [self.sample(rng) for _ in range(batch_size)]
        out = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "case"}
        out["case"] = [it["case"] for it in items]
        return out


class PatchStream(torch.utils.data.IterableDataset):
    """Endless batches for a ``DataLoader`` (``batch_size=None``); each worker gets its own seed."""

    def __init__(self, sampler: PatchSampler, batch_size: int, seed: int):
        self.sampler, self.batch_size, self.seed = sampler, batch_size, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        torch.manual_seed(self.seed * 1000 + (info.id if info else 0))
        while True:
            yield self.sampler.batch(rng, self.batch_size)
