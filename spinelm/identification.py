"""The level head: each vertebra's level (C1..S1) from a crop of the coarse stage centred on it.

Why: a U-Net's voxel output learns *which vertebra* slowly when fields of view start anywhere on
the column. On whole-spine phantoms (runs of 5-12 vertebrae from C1 to the sacrum; 19 training
cases, 1,500 coarse float32 steps) the coarse segmentation learned vertebra-vs-background but
no level at all: at the annotated centres its largest label probability averaged 0.035 (flat over
26 labels). A classifier that pools the coarse encoder's deepest features over a crop spanning
about eight neighbour distances along the column, trained on one crop per vertebra, learned the
same data's levels in the same few minutes (top-1 0.51, region 0.90, probability of the true level
0.40 on 95 held-out vertebrae): pooling over the crop gives the network a direct path from the
neighbouring anatomy (region transitions, C2, the sacrum) to the level, which the dense output has
to build through its receptive field.

The head is a module of the coarse network (``network.level_head``), fed by its encoder, trained
in the coarse stage alongside the dense losses (``plans["identification"]``: crop size, crops per
step, loss weight). At prediction every candidate gets the head's level probabilities from a crop
of the scan preprocessed for the coarse stage at the candidate's world position; they are
combined with the segmentation's label probabilities (:func:`fuse`) before the anatomical
ordering, which chains them along the column. No SimpleITK here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spinelm.classification import ClassHead

#: Crop extent along the column and across it, in median neighbour distances. Along the column the
#: crop holds the vertebra and about four neighbours each side; across, the vertebra with its
#: processes and the tissue beside it (lungs, ribs).
CROP_DISTANCES_CC = 8.0
CROP_DISTANCES_ACROSS = 5.0
#: Vertebra crops classified per training step.
CROPS_PER_STEP = 6
#: Crops are drawn with probability ``count(level) ** -BALANCE_POWER`` per annotated vertebra: 0 draws
#: every vertebra alike, 1 every level alike. Runs placed anywhere on the column over-represent
#: the mid-thoracic levels (19 whole-spine training phantoms: T4 14 times, L4, L5 and S1 once
#: each), and a head drawn uniformly learns the rare levels last, where the ordering needs them to
#: anchor the count (the thoracolumbar junction, the sacrum). The square root halves the imbalance
#: without repeating the one L5 of a dataset as often as the fourteen T4s.
BALANCE_POWER = 0.5
#: Random shift of a training crop's centre (standard deviation, in neighbour distances): at
#: prediction the crop is centred on a heatmap peak, not on the annotated centre.
CENTRE_JITTER = 0.2
#: Weight of the level head's cross-entropy in the coarse stage's loss.
LOSS_WEIGHT = 1.0
#: Weight of the level head against the segmentation's label probabilities (a geometric mixture).
LEVEL_WEIGHT = 0.75
#: The upright head: of every step's level crops, this many are also shown turned head over foot
#: (reversed along the column), and a second small head on the same pooled features learns to tell
#: the two apart. Nothing else in training shows the network a scan upside down, so without it the
#: model labels a scan whose header reverses the head-foot axis as confidently as an upright one
#: (measured on real lumbar MR, fold 0: without the head, the label and level evidence favoured the
#: reversed scan on 3-5 of 7 clean scans; with it, the head gave 0.00-0.02 to the 7 reversed scans
#: and 1.00 to the upright ones, and the lumbar labels were as good: 1.000 identified, 1.57 mm).
#: It learns from anatomy that is not symmetric head to foot; on whole-spine phantoms, whose
#: vertebrae nearly are, it stayed at 0.6-0.75 for every orientation.
UPRIGHT_CROPS = 3
#: Weight of the upright head's cross-entropy in the coarse stage's loss.
UPRIGHT_LOSS_WEIGHT = 0.5


def plan_identification(coarse_cfg: dict, distance_mm: float, cc_axis: int, labels: list[int]) -> dict:
    """The level head's plan entry for a coarse configuration (spacing, patch and strides of the plan)."""
    spacing = np.asarray(coarse_cfg["spacing"], dtype=float)
    patch = np.asarray(coarse_cfg["patch_size"], dtype=int)
    strides = np.asarray(coarse_cfg["architecture"]["arch_kwargs"]["strides"], dtype=int)
    step = np.prod(strides, axis=0)  # total down-sampling per axis
    extent = np.full(3, CROP_DISTANCES_ACROSS * distance_mm)
    extent[cc_axis] = CROP_DISTANCES_CC * distance_mm
    size = np.ceil(extent / spacing / step) * step
    size = np.minimum(np.maximum(size, step), np.maximum(patch // step * step, step)).astype(int)
    return {"labels": [int(x) for x in labels], "crop_size": [int(x) for x in size],
            "crops_per_step": CROPS_PER_STEP, "loss_weight": LOSS_WEIGHT, "centre_jitter": CENTRE_JITTER,
            "balance_power": BALANCE_POWER, "upright_crops": UPRIGHT_CROPS, "upright_loss_weight": UPRIGHT_LOSS_WEIGHT,
            "rationale": (f"a level head on the coarse encoder classifies a {'x'.join(map(str, size))}-voxel crop "
                          f"around each vertebra (about {CROP_DISTANCES_CC:g} neighbour distances along the column) "
                          f"into its level; its probabilities join the segmentation's before the ordering; an upright head on the "
                          f"same features tells crops shown head over foot from upright ones (the header check)")}


def attach_level_head(network: torch.nn.Module, spec: dict) -> torch.nn.Module:
    """Give the coarse U-Net its level head (``network.level_head``, saved with its weights)."""
    network.level_head = ClassHead(list(network.encoder.output_channels), len(spec["labels"]))
    if int(spec.get("upright_crops", 0)) > 0:
        network.upright_head = ClassHead(list(network.encoder.output_channels), 2)  # 0: turned over, 1: upright
    return network


def level_and_upright_logits(network: torch.nn.Module, crops: torch.Tensor):
    """``(level logits (B, n_labels), upright logits (B, 2) or None)`` for crops through the shared
    encoder once; None when the network has no upright head."""
    net = network.module if hasattr(network, "module") else network
    feats = net.encoder(crops)
    up = net.upright_head(feats) if hasattr(net, "upright_head") else None
    return net.level_head(feats), up


def crop_at(data: np.ndarray, centre, size) -> np.ndarray:
    """A (C, *size) crop of ``data`` (C, X, Y, Z) centred on voxel ``centre``, zero outside the array
    (zero is the normalised mean intensity)."""
    size = np.asarray(size, dtype=int)
    out = np.zeros((data.shape[0], *size), np.float32)
    lo = np.round(np.asarray(centre, dtype=float)).astype(int) - size // 2
    src = [slice(max(a, 0), min(a + s, n)) for a, s, n in zip(lo, size, data.shape[1:])]
    if any(s.stop <= s.start for s in src):
        return out
    dst = [slice(s.start - a, s.stop - a) for s, a in zip(src, lo)]
    out[(slice(None), *dst)] = data[(slice(None), *src)]
    return out


#: Level target of crops that train the upright head only (cross-entropy's ignore index).
IGNORE = -100


class LevelCropSampler:
    """Crops around the annotated vertebrae of cached cases (preprocessed for the coarse stage), with
    their level as target; shifted centres, mirroring across the column, intensity jitter."""

    def __init__(self, cache: str | Path, case_ids: list[str], plans):
        from spinelm.io.files import read_json

        spec = plans.identification
        self.crop_size = [int(x) for x in spec["crop_size"]]
        self.index = {int(lab): i for i, lab in enumerate(spec["labels"])}
        self.jitter = float(spec.get("centre_jitter", CENTRE_JITTER)) * plans.distance_mm / \
            np.asarray(plans.configuration("coarse").spacing, dtype=float)
        self.mirror_axes = [int(a) for a in plans.mirror_axes]
        self.n = int(spec.get("crops_per_step", CROPS_PER_STEP))
        self.n_turned = min(int(spec.get("upright_crops", 0)), self.n)
        self.cc_axis = int(plans.cc_axis)
        self.arrays: dict[str, np.ndarray] = {}
        self.items: list[tuple[str, int, np.ndarray]] = []
        cache = Path(cache)
        for case in case_ids:
            props = read_json(cache / f"{case}.json")
            lms = [lm for lm in props.get("landmarks", []) if int(lm["label"]) in self.index]
            if not lms:
                continue
            self.arrays[case] = np.load(cache / f"{case}_data.npy", mmap_mode="r")
            self.items += [(case, self.index[int(lm["label"])], np.asarray(lm["index"], dtype=float)) for lm in lms]

        counts: dict[int, int] = {}
        for _, target, _ in self.items:
            counts[target] = counts.get(target, 0) + 1
        w = np.asarray([counts[t] ** -float(spec.get("balance_power", BALANCE_POWER)) for _, t, _ in self.items])
        self.weights = w / w.sum() if len(w) else w

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        xs, ys = [], []
        for k in rng.choice(len(self.items), self.n, p=self.weights):
            case, target, centre = self.items[int(k)]
            x = crop_at(self.arrays[case], centre + rng.normal(0, 1, 3) * self.jitter, self.crop_size)
            for ax in self.mirror_axes:
                if rng.random() < 0.5:
                    x = np.flip(x, ax + 1)
            x = x * np.float32(rng.uniform(0.85, 1.15)) + np.float32(rng.normal(0, 0.1))
            xs.append(np.ascontiguousarray(x))
            ys.append(target)
        batch = {"level_target": torch.as_tensor(ys + [IGNORE] * self.n_turned, dtype=torch.long)}
        if self.n_turned:  # the first crops again, head over foot: no level target, upright target 0
            xs += [np.ascontiguousarray(np.flip(x, self.cc_axis + 1)) for x in xs[:self.n_turned]]
            batch["upright_target"] = torch.as_tensor([1] * self.n + [0] * self.n_turned, dtype=torch.long)
        batch["level_image"] = torch.as_tensor(np.stack(xs))
        return batch


class LevelReader:
    """Level probabilities at world points, from crops of a scan preprocessed for the coarse stage
    (one or more networks with a level head, averaged)."""

    def __init__(self, networks: list, spec: dict, data: np.ndarray, frame, device="cpu", batch: int = 16):
        self.networks = [n for n in networks if hasattr(n, "level_head")]
        self.labels = [int(x) for x in spec["labels"]]
        self.size = [int(x) for x in spec["crop_size"]]
        self.data = np.asarray(data, dtype=np.float32)
        self.frame = frame
        self.device = torch.device(device)
        self.batch = batch

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __call__(self, world_mm: np.ndarray) -> list[dict[int, float]]:
        """Level probabilities at each world point."""
        return self.read(world_mm)[0]

    def upright(self, world_mm: np.ndarray) -> np.ndarray | None:
        """Probability that the scan is upright (not head over foot) from the crop at each world
        point, averaged over the networks with an upright head; None when none has one."""
        return self.read(world_mm)[1]

    @torch.no_grad()
    def read(self, world_mm: np.ndarray) -> tuple[list[dict[int, float]], np.ndarray | None]:
        """Both heads from one crop and one encoder pass per world point and network: ``(level
        probabilities, upright probabilities or None)``."""
        world_mm = np.asarray(world_mm, dtype=float).reshape(-1, 3)
        has_upright = any(hasattr(n, "upright_head") for n in self.networks)
        if not len(world_mm):
            return [], (np.zeros(0) if has_upright else None)
        crops = np.stack([crop_at(self.data, v, self.size) for v in self.frame.from_world(world_mm)])
        level = np.zeros((len(crops), len(self.labels)))
        up, n_up = np.zeros(len(crops)), 0
        for net in self.networks:
            was = net.training
            net.eval()
            for i in range(0, len(crops), self.batch):
                x = torch.as_tensor(crops[i:i + self.batch]).to(self.device)
                lv, u = level_and_upright_logits(net, x)
                level[i:i + len(x)] += torch.softmax(lv.float(), 1).cpu().numpy()
                if u is not None:
                    up[i:i + len(x)] += torch.softmax(u.float(), 1)[:, 1].cpu().numpy()
            n_up += hasattr(net, "upright_head")
            net.train(was)
        level /= len(self.networks)
        probs = [{lab: float(p) for lab, p in zip(self.labels, row)} for row in level]
        return probs, (up / n_up if n_up else None)


def fuse(segmentation: dict[int, float], level: dict[int, float], weight: float | None = None,
         floor: float = 1e-4) -> dict[int, float]:
    """``p ~ level ** weight * segmentation ** (1 - weight)`` (default weight :data:`LEVEL_WEIGHT`),
    renormalised (probabilities floored)."""
    weight = LEVEL_WEIGHT if weight is None else weight
    out = {lab: max(level.get(lab, 0.0), floor) ** weight * max(segmentation.get(lab, 0.0), floor) ** (1 - weight)
           for lab in set(segmentation) | set(level)}
    total = sum(out.values())
    return {lab: v / total for lab, v in out.items()}
