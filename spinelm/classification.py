"""Per-vertebra classes computed from each vertebra's own voxels only (the locality guarantee).

A vertebra is classified from a crop around it in which every voxel outside its instance mask,
dilated by :data:`MARGIN_MM`, is replaced by the constant :data:`OUTSIDE_VALUE` (the mean of the
normalised intensities). The crop passes through the shared U-Net encoder (the same weights that
segment and find the vertebrae) and a small head (:class:`ClassHead`: average and maximum pooling of
the two deepest encoder stages, then two linear layers). The crop's position is the centre of the
mask, so the class probabilities are a function of the mask and of the image inside the dilated
mask alone: changing any voxel outside it (a neighbour's oedema, the pelvis, another tool's output)
leaves them unchanged to the last bit (``tests/test_classification.py`` checks it).

At training time the mask is the ground-truth mask of the preprocessing cache; at prediction the
predicted instance mask, or one the user gives (``spinelm predict --masks DIR``).

The plan decides (``plans["classification"]``, :func:`plan_classification`): class names, crop size
(the largest mean vertebra extent of the fingerprint, with the margin, at the fine spacing), margin,
loss weight and how many vertebrae each training step classifies. No SimpleITK here.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

#: Dilation of a vertebra's mask before everything outside it is blanked (mm). Enough to keep the
#: cortex and the endplates of a mask that is a voxel or two short (a predicted mask), far less
#: than a disc (5-10 mm), so a neighbour's marrow stays out.
MARGIN_MM = 3.0
#: Value of every voxel outside the dilated mask (normalised intensities have mean 0).
OUTSIDE_VALUE = 0.0
#: The crop holds this multiple of the largest mean vertebra extent (mm) of the fingerprint, per axis,
#: plus twice the margin: room for a larger than average vertebra and for the mask's centre lying
#: off the middle of its bounding box.
CROP_EXTENT_FACTOR = 1.3
#: Vertebrae classified per training step, drawn class-balanced (each class equally often), so that a
#: class of 5 % of the vertebrae is seen as often as the normal ones. Measured on phantoms (fine patch
#: 32 x 56 x 40, batch 2, crops 40 x 32 x 40, float32, 2 cores): a step costs 16 % more with 2 crops,
#: 36 % more with 4; 2 crops over a 3,000-step run show each abnormal vertebra hundreds of times.
#: The budget's measured step includes them (:func:`spinelm.budget.measure_step`).
CLASS_BATCH_SIZE = 2
#: Weight of the classification loss (soft cross-entropy) next to segmentation + heatmap.
CLASS_LOSS_WEIGHT = 1.0
#: Learning rate of the class head, as a fraction of the network's. The shared encoder learns at the
#: plan's rate; the head, a small MLP on pooled features of 2 crops per step, does not learn at it.
#: Measured (classification phantoms, 32 training cases, plan's AdamW at 3e-3, float32, 2 cores): in
#: a 20-minute run the class loss stayed at ln 3 (uniform output) for 42 of 64 fine epochs and broke
#: through only once the poly schedule had brought the rate down to 1.3e-3; trained alone on its
#: crops the head stayed at ln 3 for 1,300 steps at 3e-3, but fell below 1.0 within 600 steps with
#: the head at 3e-4 (encoder still at 3e-3); at 1e-3 it was slower and noisier.
HEAD_LR_FACTOR = 0.1
#: Test-time mirroring of the class crops: each vertebra's probabilities are averaged over its crop
#: mirrored along every combination of the plan's mirror axes (never the cranio-caudal one), the
#: mirrorings the head saw in training. Plan field ``classification.test_time_mirror``. It costs
#: 2^(mirror axes) passes of small crops per vertebra, next to nothing beside the sliding window.
TEST_TIME_MIRROR = True
#: Hidden units of the head.
HIDDEN_UNITS = 64
#: Encoder stages the head pools (the deepest ones).
POOLED_STAGES = 2


# ------------------------------------------------------------------------------------------ planning


def plan_classification(fingerprint: dict, spacing, strides, transpose_forward) -> dict | None:
    """The ``classification`` plan field, or None when the dataset has fewer than two classes or no
    vertebra masks (the head needs masks to learn from a vertebra's own voxels).

    Args:
        fingerprint: with ``classes`` (:func:`spinelm.fingerprint.class_statistics`) and
            ``spine.vertebra_extent_mm`` (canonical axes: si, ap, lr).
        spacing: the fine configuration's spacing, network axes (mm).
        strides: the fine configuration's pooling per stage (network axes).
        transpose_forward: canonical -> network axis order.
    """
    classes = fingerprint.get("classes") or {}
    names = list(classes.get("names", []))
    extents = fingerprint.get("spine", {}).get("vertebra_extent_mm") or {}
    if len(names) < 2 or not extents or not classes.get("vertebrae", 1):
        return None
    ext = np.array([max(float(e[k]) for e in extents.values()) for k in ("si", "ap", "lr")])
    crop_mm = CROP_EXTENT_FACTOR * ext + 2 * MARGIN_MM
    factor = np.prod(np.asarray(strides, dtype=np.int64), axis=0)
    crop = []
    for i, axis in enumerate(transpose_forward):
        n = int(np.ceil(crop_mm[axis] / float(spacing[i])))
        crop.append(int(max(np.ceil(n / factor[i]), 1) * factor[i]))
    return {"classes": names, "crop_size": crop, "margin_mm": MARGIN_MM, "outside_value": OUTSIDE_VALUE,
            "loss_weight": CLASS_LOSS_WEIGHT, "batch_size": CLASS_BATCH_SIZE, "hidden_units": HIDDEN_UNITS,
            "pooled_stages": POOLED_STAGES, "lr_factor": HEAD_LR_FACTOR,
            "test_time_mirror": TEST_TIME_MIRROR,
            "rationale": f"crop {crop} voxels = {CROP_EXTENT_FACTOR:g} x the largest mean vertebra extent "
                         f"{[round(float(x)) for x in ext]} mm (si, ap, lr) + 2 x {MARGIN_MM:g} mm margin, at the "
                         f"fine spacing, a multiple of the encoder's pooling"}


def soft_targets(rows, class_names: list[str]) -> dict[int, np.ndarray]:
    """Per vertebra, the class distribution of its ``classesTr.csv`` rows (``(label, class, weight)``).

    Rows of several raters become their vote shares; probabilities are used as given and, when a
    vertebra's rows sum to less than 1, the rest is spread evenly over the classes it did not name.
    Classes not in ``class_names`` are ignored; a vertebra left with nothing is unknown (absent).
    """
    acc: dict[int, np.ndarray] = {}
    for label, cls, weight in rows:
        if cls not in class_names:
            continue
        acc.setdefault(int(label), np.zeros(len(class_names)))[class_names.index(cls)] += float(weight)
    out = {}
    for label, v in acc.items():
        total = v.sum()
        if total <= 0:
            continue
        if total < 1.0 - 1e-6 and (v == 0).any():
            v = v + (v == 0) * (1.0 - total) / int((v == 0).sum())
        out[label] = v / v.sum()
    return out


# ------------------------------------------------------------------------------------------ the head


class ClassHead(torch.nn.Module):
    """Average and maximum pooling of the deepest encoder stages, a hidden layer, class logits."""

    def __init__(self, stage_channels: list[int], n_classes: int, hidden: int = HIDDEN_UNITS,
                 pooled_stages: int = POOLED_STAGES):
        super().__init__()
        self.pooled_stages = int(pooled_stages)
        n_in = 2 * sum(int(c) for c in stage_channels[-self.pooled_stages:])
        self.mlp = torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.LeakyReLU(0.01),
                                       torch.nn.Dropout(0.2), torch.nn.Linear(hidden, n_classes))

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        feats = []
        for f in skips[-self.pooled_stages:]:
            f = f.float()
            feats += [f.mean(dim=(2, 3, 4)), f.amax(dim=(2, 3, 4))]
        return self.mlp(torch.cat(feats, 1))


def attach_head(network: torch.nn.Module, spec: dict) -> torch.nn.Module:
    """Give a U-Net its classification head (``network.class_head``, saved with its weights)."""
    network.class_head = ClassHead(list(network.encoder.output_channels), len(spec["classes"]),
                                   int(spec.get("hidden_units", HIDDEN_UNITS)),
                                   int(spec.get("pooled_stages", POOLED_STAGES)))
    network.class_head.lr_factor = float(spec.get("lr_factor", HEAD_LR_FACTOR))  # read by the optimiser
    return network


def class_logits(network: torch.nn.Module, crops: torch.Tensor) -> torch.Tensor:
    """(B, n_classes) logits for masked crops (B, C, X, Y, Z) through the shared encoder and the head."""
    net = network.module if hasattr(network, "module") else network
    return net.class_head(net.encoder(crops))


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class distributions (B, n_classes): one-hot for one rater, vote shares or
    probabilities for uncertain ones."""
    return -(target * F.log_softmax(logits.float(), 1)).sum(1).mean()


# ------------------------------------------------------------------------------------------ crops


def dilation_structure(margin_mm: float, spacing) -> np.ndarray:
    """A boolean ellipsoid of radius ``margin_mm`` on a grid of ``spacing`` (mm per axis)."""
    r = np.floor(float(margin_mm) / np.asarray(spacing, dtype=np.float64)).astype(int)
    grids = np.meshgrid(*[np.arange(-k, k + 1) * s for k, s in zip(r, spacing)], indexing="ij")
    return sum(g ** 2 for g in grids) <= float(margin_mm) ** 2 + 1e-9


def vertebra_crop(data: np.ndarray, own: np.ndarray, crop_size, structure: np.ndarray | None,
                  outside: float = OUTSIDE_VALUE, offset=(0, 0, 0), return_mask: bool = False):
    """The masked crop of one vertebra: (C, *crop_size) float32.

    ``data`` (C, X, Y, Z) preprocessed image; ``own`` (X, Y, Z) bool, the vertebra's voxels. The crop is
    centred on the mean position of ``own``; voxels outside ``own`` dilated by ``structure`` (and
    outside the image) are ``outside``. Nothing but ``own`` and the image inside its dilation is read.
    ``structure=None`` blanks nothing but what lies outside the image (the unmasked variant).
    ``offset`` (voxels) moves the crop window (training jitter); ``return_mask`` also returns the kept voxels.
    """
    idx = np.argwhere(own)
    if not len(idx):
        raise ValueError("empty vertebra mask")
    size = np.asarray(crop_size, dtype=int)
    lo = np.round(idx.mean(0) - size / 2).astype(int) + np.asarray(offset, dtype=int)
    hi = lo + size
    shape = np.asarray(own.shape)
    src_lo, src_hi = np.maximum(lo, 0), np.minimum(hi, shape)
    dst_lo = src_lo - lo
    dst_hi = dst_lo + (src_hi - src_lo)
    box = tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
    dbox = tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))
    keep = np.zeros(tuple(size), bool)
    if structure is None:  # no masking: the plain crop (only for measuring what the mask keeps out)
        keep[dbox] = True
    else:
        keep[dbox] = own[box]
        keep = ndimage.binary_dilation(keep, structure=structure)
    out = np.full((data.shape[0], *size), outside, np.float32)
    region = np.asarray(data[(slice(None), *box)], dtype=np.float32)
    inside = keep[dbox]
    out[(slice(None), *dbox)] = np.where(inside[None], region, np.float32(outside))
    if return_mask:
        full = np.zeros(tuple(size), bool)
        full[dbox] = inside
        return out, full
    return out


class Classifier:
    """Classifies the vertebrae of an instance mask with one or more networks (folds, averaged).

    Args:
        networks: U-Nets with ``class_head``.
        spec: the plan's ``classification`` field.
        spacing: the fine configuration's spacing (network axes, mm).
        mirror_axes: crop axes (network order) to mirror at test time: the probabilities are averaged
            over every combination of mirrorings, as training draws them (see :data:`TEST_TIME_MIRROR`).
    """

    def __init__(self, networks: list, spec: dict, spacing, device: str | torch.device = "cpu",
                 mirror_axes=None):
        self.networks = [n for n in networks if hasattr(n, "class_head")]
        self.spec = spec
        self.names = list(spec["classes"])
        self.crop_size = [int(x) for x in spec["crop_size"]]
        self.structure = dilation_structure(float(spec.get("margin_mm", MARGIN_MM)), spacing)
        self.outside = float(spec.get("outside_value", OUTSIDE_VALUE))
        self.device = torch.device(device)
        axes = [int(a) + 2 for a in (mirror_axes or [])]  # batch and channel axes first
        self.flips = [[a for k, a in enumerate(axes) if (i >> k) & 1] for i in range(2 ** len(axes))]

    @classmethod
    def from_plans(cls, networks: list, plans, device: str | torch.device = "cpu") -> "Classifier":
        """The classifier of a plan's ``classification`` field, mirroring as the plan says."""
        spec = plans.classification
        mirror_axes = plans.mirror_axes if spec.get("test_time_mirror", TEST_TIME_MIRROR) else None
        return cls(networks, spec, plans.configuration().spacing, device, mirror_axes)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def crops(self, data: np.ndarray, instance_mask: np.ndarray, labels) -> tuple[list[int], np.ndarray]:
        """Masked crops of every label of ``labels`` that has voxels in ``instance_mask``."""
        kept, crops = [], []
        for lab in labels:
            own = instance_mask == lab
            if own.any():
                kept.append(int(lab))
                crops.append(vertebra_crop(data, own, self.crop_size, self.structure, self.outside))
        return kept, (np.stack(crops) if crops else np.zeros((0, data.shape[0], *self.crop_size), np.float32))

    @torch.no_grad()
    def probabilities(self, crops: np.ndarray, batch: int = 8) -> np.ndarray:
        """(N, n_classes) class probabilities of masked crops, averaged over the networks and mirrorings."""
        out = np.zeros((len(crops), len(self.names)))
        if not len(crops):
            return out
        for net in self.networks:
            was = net.training
            net.eval()
            for i in range(0, len(crops), batch):
                x = torch.from_numpy(crops[i:i + batch]).to(self.device)
                for dims in self.flips:
                    xf = torch.flip(x, dims) if dims else x
                    out[i:i + batch] += torch.softmax(class_logits(net, xf).float(), 1).cpu().numpy()
            net.train(was)
        return out / (len(self.networks) * len(self.flips))

    def __call__(self, data: np.ndarray, instance_mask: np.ndarray, labels) -> dict[int, dict[str, float]]:
        """``{label: {class name: probability}}`` for the vertebrae of ``instance_mask`` (preprocessed grid)."""
        kept, crops = self.crops(np.asarray(data), np.asarray(instance_mask), labels)
        probs = self.probabilities(crops)
        return {lab: {n: float(p) for n, p in zip(self.names, row)} for lab, row in zip(kept, probs)}


# ------------------------------------------------------------------------------------------ training


#: Chances of the training mask perturbations (:func:`perturb_mask`): one voxel grown, one voxel
#: shrunk, a cap cut off. Measured: a head trained on exact ground-truth masks reached balanced
#: accuracy 0.963 / AUC 0.995 on 40 held-out phantoms with their ground-truth masks but 0.854 / 0.934
#: with the predicted instance masks (normal vertebrae called oedema, case by case), whose borders
#: differ from the ground truth's by a voxel here and there and which miss or add bits of processes.
MASK_GROW, MASK_SHRINK, MASK_CUT = 0.3, 0.3, 0.3


def perturb_mask(own: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A vertebra mask as a predicted one may come out: grown or shrunk by a voxel (each with
    :data:`MASK_GROW` / :data:`MASK_SHRINK`), and with :data:`MASK_CUT` a cap beyond a random plane
    (10-25 % of the voxels) removed, e.g. a missed spinous process. Works on the mask's bounding box;
    never returns an empty mask."""
    idx = np.argwhere(own)
    if not len(idx):
        return own
    lo, hi = np.maximum(idx.min(0) - 2, 0), np.minimum(idx.max(0) + 3, own.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = own[box].copy()
    r = rng.random()
    if r < MASK_GROW:
        sub = ndimage.binary_dilation(sub)
    elif r < MASK_GROW + MASK_SHRINK:
        shrunk = ndimage.binary_erosion(sub)
        if shrunk.sum() > 0.5 * sub.sum():
            sub = shrunk
    if rng.random() < MASK_CUT:
        pts = np.argwhere(sub)
        direction = rng.normal(size=3)
        proj = pts @ (direction / np.linalg.norm(direction))
        cut = pts[proj > np.quantile(proj, 1.0 - rng.uniform(0.10, 0.25))]
        sub[tuple(cut.T)] = False
    out = np.zeros_like(own)
    out[box] = sub
    return out if out.any() else own


#: Grid of the vertebra shape template (:func:`shape_template`) and the most masked vertebrae it averages.
TEMPLATE_SHAPE = (24, 24, 24)
TEMPLATE_MAX_VERTEBRAE = 400


def shape_template(masks) -> np.ndarray:
    """The mean shape of vertebra masks, each scaled from its bounding box onto :data:`TEMPLATE_SHAPE`:
    a float array whose voxels say how often a vertebra covers that place of its box (axes as the
    masks' array axes). No mask: an ellipsoid that touches the box's faces."""
    size = np.asarray(TEMPLATE_SHAPE)
    acc, n = np.zeros(TEMPLATE_SHAPE, np.float64), 0
    for own in masks:
        idx = np.argwhere(own)
        if not len(idx):
            continue
        lo, hi = idx.min(0), idx.max(0) + 1
        sub = np.asarray(own[tuple(slice(a, b) for a, b in zip(lo, hi))], np.float32)
        # voxel centres of the template sampled from the mask's box (nearest voxel)
        coords = [np.clip(np.floor((np.arange(k) + 0.5) * (b - a) / k), 0, b - a - 1).astype(int)
                  for k, a, b in zip(size, lo, hi)]
        acc += sub[np.ix_(*coords)]
        n += 1
    if n:
        return (acc / n).astype(np.float32)
    grids = np.meshgrid(*[(np.arange(k) + 0.5) / k * 2 - 1 for k in size], indexing="ij")
    return (sum(g ** 2 for g in grids) <= 1.0).astype(np.float32)


def template_in_box(shape, center, half_axes, template: np.ndarray) -> np.ndarray:
    """A vertebra-shaped mask for a box (index space, :meth:`spinelm.io.boxes.Box.in_index_space`):
    the voxels of the box where ``template`` (:func:`shape_template`), stretched onto the box, is at
    least 0.5. Each half-axis is matched to the array axis it runs closest to, with its sign, so the
    template keeps its orientation in a box given with its axes in any order."""
    from spinelm.io.boxes import box_local_coordinates

    h = np.asarray(half_axes, dtype=np.float64).reshape(3, 3)
    out = np.zeros(shape, dtype=bool)
    region, local = box_local_coordinates(shape, center, h)
    if not local.size:
        return out
    inside = np.all(np.abs(local) <= 1 + 1e-6, axis=-1)
    t = np.asarray(template)
    coords = np.zeros((3, int(inside.sum())))
    used = set()
    for i in np.argsort(-np.abs(h).max(axis=1)):  # the longest half-axes choose their array axis first
        axis = next(int(a) for a in np.argsort(-np.abs(h[i])) if int(a) not in used)
        used.add(axis)
        u = local[inside][:, i] * np.sign(h[i, axis] or 1.0)
        coords[axis] = np.clip((u + 1) / 2 * t.shape[axis] - 0.5, 0, t.shape[axis] - 1)
    sub = np.zeros(inside.shape, dtype=bool)
    sub[inside] = ndimage.map_coordinates(t, coords, order=1) >= 0.5
    out[region] = sub
    return out


#: Fewest voxels of a vertebra's strokes (in the training grid) for it to be graded (:func:`stroke_boxes`).
MIN_STROKE_VOXELS = 8


def stroke_boxes(seg: np.ndarray, channel_of: dict, pad) -> dict:
    """``{label: box}`` of the vertebrae a scribbled case's strokes mark (``seg``: the cached training
    target, vertebra channels on the strokes): the box, in preprocessed voxels, that the vertebra's
    stroke voxels span, grown by half of ``pad`` (voxels per axis: the crop mask's dilation, the
    brush's reach beyond a boundary-free stroke). Strokes through the centroid along each axis cross
    the vertebral body from edge to edge, so the box holds about the body: what oedema and wedge
    deformity change. Labels with fewer than :data:`MIN_STROKE_VOXELS` stroke voxels are left out."""
    seg = np.asarray(seg)
    grow = np.asarray(pad, dtype=np.float64) // 2
    out = {}
    for lab, ch in channel_of.items():
        idx = np.argwhere(seg == ch)
        if len(idx) < MIN_STROKE_VOXELS:
            continue
        lo, hi = idx.min(0).astype(np.float64), idx.max(0).astype(np.float64)
        out[int(lab)] = {"label": int(lab), "center": ((lo + hi) / 2).tolist(),
                         "half_axes": np.diag((hi - lo) / 2 + 0.5 + grow).tolist(), "from_strokes": True}
    return out


class ClassCropSampler:
    """Class-balanced masked crops of annotated vertebrae from the preprocessing cache (ground-truth masks).

    A vertebra known only by its box is masked by the mean shape of the masked training vertebrae
    stretched onto the box (:func:`template_in_box`), not by the whole box: a box holds bone, disc and
    canal, a block that looks like no predicted vertebra mask. Measured on classification phantoms (half
    the cases boxed or scribbled): grading was as poor either way (balanced accuracy 0.554 with whole
    boxes, 0.529 with the shape), limited by the few abnormal vertebrae left. A scribbled vertebra is
    graded through the box its strokes span (:func:`stroke_boxes`): with the scribbled vertebrae back
    in training, the same phantoms reached 0.867 (0.920 with every mask). A vertebra known only by its
    centroid (a centroid-only case) is graded through its level's mean box (:meth:`_level_boxes`, from
    the masked training vertebrae) placed at the centroid and masked by the vertebra shape.

    Args:
        cache: one configuration's cache (the fine one: the crop size is in its voxels).
        case_ids: training cases; those with a mask and classes contribute.
        plans: spinelm plans with a ``classification`` field.
        augment: mirroring (the plan's mirror axes), intensity scale and shift, a jitter of the centre,
            and mask perturbations (:func:`perturb_mask`) so that predicted masks are no surprise.
    """

    def __init__(self, cache: str | Path, case_ids: list[str], plans, augment: bool = True):
        from spinelm.plans import as_plans

        plans = as_plans(plans)
        self.spec = plans.raw["classification"]
        self.names = list(self.spec["classes"])
        self.cache = Path(cache)
        self.augment = augment
        self.mirror_axes = plans.mirror_axes
        cfg = plans.configuration()
        self.crop_size = [int(x) for x in self.spec["crop_size"]]
        self.structure = dilation_structure(float(self.spec.get("margin_mm", MARGIN_MM)), cfg.spacing)
        self.outside = float(self.spec.get("outside_value", OUTSIDE_VALUE))
        channel_of = {lab: i for i, lab in enumerate(plans.heads["segmentation"].labels, start=1)} \
            if "segmentation" in plans.heads else {}
        # (case, the vertebra's segmentation channel or its box in preprocessed voxels, soft target)
        self.items: list[tuple[str, int | dict, np.ndarray]] = []
        self.not_in_mask = 0  # vertebrae with a class but no voxels in the (resampled) mask, box or strokes
        pending = []  # centroid-only cases: graded once the masked vertebrae give each level's box
        for case in case_ids:
            props = json.loads((self.cache / f"{case}.json").read_text())
            rows = [(int(r[0]), str(r[1]), float(r[2]) if len(r) > 2 else 1.0) for r in props.get("classes", [])]
            targets = soft_targets(rows, self.names)
            if not targets:
                continue
            kind = props.get("annotation", "mask")
            if not props.get("has_mask"):
                if kind == "centroids" and props.get("landmarks_known", True):
                    pending.append((case, props, targets))
                continue
            if kind == "scribbles":  # graded through the box its strokes span (stroke_boxes)
                boxes = stroke_boxes(np.load(self.cache / f"{case}_seg.npy", mmap_mode="r")[0], channel_of,
                                     self.structure.shape)
                for lab, target in targets.items():
                    if lab in boxes:
                        self.items.append((case, boxes[lab], target))
                    else:
                        self.not_in_mask += 1
                continue
            if kind == "boxes":
                boxes = {int(b["label"]): b for b in props.get("boxes", [])}
                for lab, target in targets.items():
                    if lab in boxes:
                        self.items.append((case, boxes[lab], target))
                    else:
                        self.not_in_mask += 1
                continue
            shown = set(np.unique(np.load(self.cache / f"{case}_seg.npy", mmap_mode="r")).tolist())
            for lab, target in targets.items():
                if channel_of.get(lab) in shown:
                    self.items.append((case, channel_of[lab], target))
                else:
                    self.not_in_mask += 1
        if pending:  # a vertebra known by its centroid alone: its level's mean box placed on it
            level_boxes = self._level_boxes(channel_of)
            for case, props, targets in pending:
                where = {int(lm["label"]): np.asarray(lm["index"], float) for lm in props.get("landmarks", [])}
                for lab, target in targets.items():
                    box = level_boxes.get(lab, level_boxes.get(None))
                    if lab in where and box is not None:
                        self.items.append((case, {"label": lab, "center": (where[lab] + box[0]).tolist(),
                                                  "half_axes": np.diag(box[1]).tolist(), "from_centroid": True},
                                           target))
                    else:
                        self.not_in_mask += 1
        self.templates = self._shape_templates(channel_of) \
            if any(isinstance(it[1], dict) and not it[1].get("from_strokes") for it in self.items) else {}
        self.by_class = [[i for i, it in enumerate(self.items) if int(np.argmax(it[2])) == k]
                         for k in range(len(self.names))]
        self.by_class = [b for b in self.by_class if b]

    def _level_boxes(self, channel_of: dict) -> dict:
        """``{label: (offset, half extents)}`` in preprocessed voxels from the masked training vertebrae:
        the mean offset from a vertebra's centroid to the centre of its mask's bounding box, and the
        mean half extent of that box; one per label with at least 3 masked examples, and one of every
        label (key ``None``). Empty without masked vertebrae."""
        found: dict = {}
        centroids: dict = {}
        for case, lab, sl, _ in self._masked_vertebrae(channel_of):
            if case not in centroids:
                props = json.loads((self.cache / f"{case}.json").read_text())
                centroids[case] = {int(lm["label"]): np.asarray(lm["index"], float)
                                   for lm in props.get("landmarks", [])}
            where = centroids[case]
            if lab in where:
                lo = np.asarray([x.start for x in sl], float)
                hi = np.asarray([x.stop for x in sl], float)
                found.setdefault(lab, []).append(((lo + hi - 1) / 2 - where[lab], (hi - lo) / 2))
        if not found:
            return {}
        def mean(pairs):
            return np.mean([o for o, _ in pairs], 0), np.mean([h for _, h in pairs], 0)
        out = {None: mean([x for xs in found.values() for x in xs])}
        out.update({lab: mean(xs) for lab, xs in found.items() if len(xs) >= 3})
        return out

    def _masked_vertebrae(self, channel_of: dict):
        """``(case, label, bounding-box slices, the vertebra's mask in that box)`` for every vertebra of
        the masked training cases, in case order (preprocessed voxels)."""
        label_of = {ch: lab for lab, ch in channel_of.items()}
        for case in sorted({it[0] for it in self.items if not isinstance(it[1], dict)}):
            seg = np.asarray(np.load(self.cache / f"{case}_seg.npy", mmap_mode="r")[0])
            for ch, sl in enumerate(ndimage.find_objects(np.clip(seg, 0, None).astype(np.int32)), start=1):
                if sl is not None and ch in label_of:
                    yield case, label_of[ch], sl, seg[sl] == ch

    def _shape_templates(self, channel_of: dict) -> dict:
        """Vertebra shape templates (:func:`shape_template`) from the masked training vertebrae: one per
        label with at least 3 masked examples, and one of every label (key ``None``)."""
        masks: dict = {}
        for i, (_, lab, _, own) in enumerate(self._masked_vertebrae(channel_of)):
            if i >= TEMPLATE_MAX_VERTEBRAE:
                break
            masks.setdefault(lab, []).append(own)
        out = {None: shape_template([m for ms in masks.values() for m in ms])}
        out.update({lab: shape_template(ms) for lab, ms in masks.items() if len(ms) >= 3})
        return out

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        group = self.by_class[int(rng.integers(len(self.by_class)))]
        case, channel, target = self.items[group[int(rng.integers(len(group)))]]
        data = np.load(self.cache / f"{case}_data.npy", mmap_mode="r")
        seg = np.load(self.cache / f"{case}_seg.npy", mmap_mode="r")
        if isinstance(channel, dict):  # a boxed vertebra: the box in preprocessed voxels (spinelm.preprocessing)
            if channel.get("from_strokes"):
                from spinelm.io.boxes import parallelepiped_mask

                own = parallelepiped_mask(seg.shape[1:], channel["center"], channel["half_axes"])
            else:
                template = self.templates.get(int(channel["label"]), self.templates[None])
                own = template_in_box(seg.shape[1:], channel["center"], channel["half_axes"], template)
        else:
            own = np.asarray(seg[0]) == channel
        if self.augment:
            own = perturb_mask(own, rng)
        offset = rng.integers(-2, 3, 3) if self.augment else (0, 0, 0)  # the window moves by up to 2 voxels
        crop, inside = vertebra_crop(data, own, self.crop_size, self.structure, self.outside, offset, return_mask=True)
        if self.augment:
            crop = np.where(inside[None], crop * rng.uniform(0.85, 1.15) + rng.uniform(-0.15, 0.15),
                            crop).astype(np.float32)
            for ax in self.mirror_axes:
                if rng.random() < 0.5:
                    crop = np.flip(crop, ax + 1)
        return np.ascontiguousarray(crop), target.astype(np.float32)

    def batch(self, rng: np.random.Generator, size: int | None = None) -> dict[str, torch.Tensor]:
        items = [self.sample(rng) for _ in range(size or int(self.spec.get("batch_size", CLASS_BATCH_SIZE)))]
        return {"class_image": torch.from_numpy(np.stack([c for c, _ in items])),
                "class_target": torch.from_numpy(np.stack([t for _, t in items]))}


# ------------------------------------------------------------------------------------------ metrics


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN without both kinds."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def class_metrics(truth: list[str], probs: list[dict[str, float]], names: list[str]) -> dict:
    """Accuracy, balanced accuracy, per-class sensitivity/specificity, AUC and the confusion matrix.

    ``truth``: the true class name per vertebra; ``probs``: predicted probabilities per vertebra (by
    class name). The AUC is one-vs-rest per class; ``auc_abnormal`` ranks ``1 - p(first class)`` (with
    the first class, e.g. ``normal``, against all others) and ``auc`` is the mean over classes
    that occur.
    """
    n = len(truth)
    out: dict = {"n": n, "classes": list(names)}
    if n == 0:
        return out
    pred = [max(p, key=p.get) for p in probs]
    cm = np.zeros((len(names), len(names)), int)
    for t, p in zip(truth, pred):
        if t in names and p in names:
            cm[names.index(t), names.index(p)] += 1
    out["accuracy"] = float(np.trace(cm) / max(cm.sum(), 1))
    per_class, sens = {}, []
    for k, name in enumerate(names):
        pos = cm[k].sum()
        neg = cm.sum() - pos
        tp, fp = cm[k, k], cm[:, k].sum() - cm[k, k]
        auc = roc_auc([p.get(name, 0.0) for p in probs], [t == name for t in truth])
        per_class[name] = {"n": int(pos), "sensitivity": float(tp / pos) if pos else float("nan"),
                           "specificity": float((neg - fp) / neg) if neg else float("nan"), "auc": auc}
        if pos:
            sens.append(tp / pos)
    out["balanced_accuracy"] = float(np.mean(sens)) if sens else float("nan")
    aucs = [v["auc"] for v in per_class.values() if np.isfinite(v["auc"])]
    out["auc"] = float(np.mean(aucs)) if aucs else float("nan")
    out["auc_abnormal"] = roc_auc([1.0 - p.get(names[0], 0.0) for p in probs], [t != names[0] for t in truth])
    out["per_class"] = per_class
    out["confusion_matrix"] = {"rows_true_columns_predicted": list(names), "counts": cm.tolist()}
    return out


__all__ = ["CLASS_BATCH_SIZE", "CLASS_LOSS_WEIGHT", "ClassCropSampler", "ClassHead", "Classifier", "MARGIN_MM",
           "OUTSIDE_VALUE", "attach_head", "class_logits", "class_metrics", "dilation_structure",
           "plan_classification", "roc_auc", "soft_cross_entropy", "soft_targets", "vertebra_crop"]
