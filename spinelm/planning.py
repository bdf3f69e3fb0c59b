"""``spinelm plan``: derive spacing, patch, batch, topology and the spinelm parts from a fingerprint.

The nnU-Net parts (target spacing, transpose, patch size, pooling per axis, kernel sizes, batch
size under a memory target) come from nnunetv2's :class:`ExperimentPlanner`, subclassed narrowly
so that (1) it reads the fingerprint and dataset description handed to it instead of nnU-Net's
environment folders, (2) its memory estimate counts spinelm's extra output channels, and (3) a
compute budget can cap the patch size. Everything else is a small pure rule in this module with
its rationale in the docstring:

- :func:`choose_preset`, :func:`memory_target_gb`, :func:`patch_voxel_budget` (compute budget),
- :func:`apply_spacing_floor` (presets that trade resolution for speed),
- :func:`heatmap_sigma_mm`, :func:`choose_heads` (output heads),
- :func:`cranio_caudal_axis_after_transpose`, :func:`mirror_axes`.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from spinelm import __version__
from spinelm import labels as L
from spinelm.io.files import read_json, write_json_atomic
from spinelm.nnunet import dataset_json, nnunet_environment
from spinelm.plans import PLANS_VERSION, Plans

log = logging.getLogger(__name__)

#: Vertebrae a configuration should see along the column to tell levels apart by counting and by
#: shape (a single vertebra looks much like its neighbours).
MIN_VERTEBRAE_IN_VIEW = 3.0
#: Fallback distance between consecutive vertebra centres (mm, adult thoracolumbar) when the
#: fingerprint has no pair statistics (single-vertebra cases).
DEFAULT_CONSECUTIVE_DISTANCE_MM = 30.0
#: Heatmap sigma as a fraction of the distance between neighbours; 0.1 keeps neighbouring peaks
#: separated by more than 8 sigma while giving a target a few voxels wide.
SIGMA_FRACTION_OF_DISTANCE = 0.1
#: A heatmap narrower than this many voxels of the finest axis is aliased by the voxel grid.
SIGMA_MIN_VOXELS = 1.5
#: The coarse (identification) configuration: voxels per neighbour distance it starts from. On real
#: lumbar MR (37.5 mm neighbours) a 6 mm network whose 40x40x14 patch held the whole scan reached
#: an identification rate of 0.97-1.00 on a validation fold after ~1,300 float32 steps (3 minutes on
#: 2 cores), while the 3 mm fine network, whose patch saw only part of the column, swung between
#: 0.71 and 1.00 for the rest of a 20-minute run.
COARSE_VOXELS_PER_VERTEBRA = 6.0
#: ... and the fewest it may coarsen to while trying to hold the whole column in one patch.
COARSE_MIN_VOXELS_PER_VERTEBRA = 3.0
#: A patch holding at least this share of the median scan along the column sees "the whole field of
#: view"; a fine patch that does needs no coarse stage.
WHOLE_VIEW_SHARE = 0.95
#: The coarse patch is sized to hold the scans up to this percentile of their extent (50: the median
#: scan, as nnU-Net sizes patches). On real lumbar MR (fold 0, float32, ~1,400 steps) a coarse patch
#: holding the median (225 mm) scan labelled every vertebra of those scans right at the ground-truth
#: centres but the longer (381 mm) scans of the second source one or two levels off: 28/41 labels
#: right. Sized for the 90th percentile (400 mm; 2.4x the voxels, 2.4x the step time, so a smaller
#: fine patch) it labelled 22/41 right after the same number of steps, and the long scans were no
#: better.
COARSE_EXTENT_PERCENTILE = 50
#: GPU memory the CUDA context, cuDNN workspaces and the allocator's fragmentation take beyond the
#: activations nnU-Net's estimate counts.
GPU_OVERHEAD_GB = 1.5

DEFAULT_PLANS_DIR = Path(__file__).resolve().parent.parent / "plans"


# ----------------------------------------------------------------------------------------------
# presets


@dataclass(frozen=True)
class Preset:
    """Budget-dependent planner settings (a JSON file in ``plans/``)."""

    name: str
    description: str
    device: str
    memory_target_gb: float
    base_features: int
    max_features: int
    min_batch_size: int
    network_class: str
    min_spacing_mm: float
    min_iterations: int
    epochs: int
    iterations_per_epoch: int
    initial_lr: float
    time_budget_min: float | None
    num_folds: int
    optimizer: str = "sgd"
    reconstruction_weight: float = 0.0
    blocks_per_stage_encoder: tuple[int, ...] = (2,) * 14
    blocks_per_stage_decoder: tuple[int, ...] = (2,) * 13

    @classmethod
    def from_json(cls, data: dict, source: str = "preset") -> "Preset":
        fields = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"{source}: unknown preset field(s) {sorted(unknown)}; valid: {sorted(fields)}")
        import dataclasses
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in data
                         and f.default is dataclasses.MISSING)
        if missing:
            raise ValueError(f"{source}: missing preset field(s) {missing}")
        data = dict(data)
        for key in ("blocks_per_stage_encoder", "blocks_per_stage_decoder"):
            if key in data:
                data[key] = tuple(data[key])
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"{source}: {exc}") from None


def plans_dirs() -> list[Path]:
    """Where presets are looked up: the source tree's ``plans/``, then the installed copy."""
    return [DEFAULT_PLANS_DIR, Path(sys.prefix) / "share" / "spinelm" / "plans"]


def available_presets() -> list[str]:
    names = set()
    for d in plans_dirs():
        if d.is_dir():
            names |= {p.stem for p in d.glob("*.json") if not p.stem.startswith("reference")}
    return sorted(names)


def load_preset(name_or_path: str) -> Preset:
    """A preset by name (``"cpu"``, ``"gpu"``) or by path to a JSON file."""
    path = Path(name_or_path)
    if not path.suffix == ".json":
        path = next((d / f"{name_or_path}.json" for d in plans_dirs() if (d / f"{name_or_path}.json").is_file()),
                    path)
    if not path.is_file():
        import difflib
        options = available_presets()
        close = difflib.get_close_matches(str(name_or_path), options, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown preset {name_or_path!r}{hint} Available: {', '.join(options) or 'none found'}")
    return Preset.from_json(read_json(path), str(path))


# ----------------------------------------------------------------------------------------------
# rules


def choose_preset(device: str, gpu_memory_gb: float | None = None) -> str:
    """Preset for a device.

    ``cpu``: a CPU cannot train nnU-Net's default network (a 128^3 step takes about a minute on two
    cores), so it gets the small-network, coarse-spacing preset. ``cuda``: nnU-Net's defaults; the
    memory target adapts to the card in :func:`memory_target_gb`.
    """
    device = device.lower()
    if device.startswith("cpu"):
        return "cpu"
    if device.startswith("cuda") or device.startswith("gpu"):
        return "gpu"
    raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")


def memory_target_gb(preset_target_gb: float, gpu_memory_gb: float | None) -> float:
    """Activation-memory target of the planner.

    nnU-Net targets 8 GB whatever the card: larger patches bring little for most datasets, and 8 GB
    fits consumer cards. A smaller card lowers the target to what fits after the overhead
    (:data:`GPU_OVERHEAD_GB`); a larger card keeps the preset's target (raise it in a preset to use
    it, as nnU-Net's ResEnc L/XL planners do).
    """
    if gpu_memory_gb is None:
        return float(preset_target_gb)
    if gpu_memory_gb <= GPU_OVERHEAD_GB + 0.5:
        raise ValueError(f"--gpu-memory {gpu_memory_gb:g} GB is too small to train a 3-D U-Net; need more than "
                         f"{GPU_OVERHEAD_GB + 0.5:g} GB")
    return float(min(preset_target_gb, gpu_memory_gb - GPU_OVERHEAD_GB))


#: Share of a time budget left for training steps (the rest: validation, checkpoints, data loading).
BUDGET_USABLE_SHARE = 0.8


def patch_voxel_budget(time_budget_min: float | None, batch_size: int, seconds_per_mvoxel: float | None,
                       min_iterations: int) -> int | None:
    """Largest patch (voxels) that still allows ``min_iterations`` training steps in the time budget.

    ``seconds_per_mvoxel`` is a step's cost per million batch voxels, measured for the plan's network
    on the device itself (:func:`spinelm.budget.measure_step`); without a measurement (or a budget)
    there is no cap. Few steps on large patches learn less than many on small ones, so the patch
    shrinks to fit the budget. Never below 32^3, where a 4-stage U-Net still fits.
    """
    if time_budget_min is None or seconds_per_mvoxel is None:
        return None
    seconds = time_budget_min * 60.0 * BUDGET_USABLE_SHARE
    voxels = seconds / (min_iterations * seconds_per_mvoxel * batch_size) * 1e6
    return int(max(voxels, 32 ** 3))


def apply_spacing_floor(spacing: Sequence[float], floor_mm: float) -> list[float]:
    """Coarsen axes finer than ``floor_mm`` (CPU presets: fewer voxels, more context per voxel).

    Axes already coarser (thick slices) are left alone, so anisotropy is never made worse.
    """
    return [float(max(s, floor_mm)) for s in spacing]


def consecutive_distance_mm(fingerprint: dict) -> float:
    """Median distance between consecutive vertebra centres, or the adult default."""
    d = fingerprint.get("spine", {}).get("median_consecutive_distance_mm")
    return float(d) if d else DEFAULT_CONSECUTIVE_DISTANCE_MM


def heatmap_sigma_mm(distance_mm: float, spacing: Sequence[float]) -> float:
    """Gaussian sigma of the centroid heatmaps.

    :data:`SIGMA_FRACTION_OF_DISTANCE` of the neighbour distance (about 3 mm for lumbar, 2 mm for
    cervical spines), but never narrower than :data:`SIGMA_MIN_VOXELS` voxels of the finest axis
    so that the peak is resolved and sub-voxel refinement has something to fit.
    """
    return float(max(SIGMA_FRACTION_OF_DISTANCE * distance_mm, SIGMA_MIN_VOXELS * min(spacing)))


#: Weight of the auxiliary structures head's loss (Dice + CE) next to the vertebra segmentation's:
#: a helper, not a target, so it should not dominate the shared encoder. Chosen, not tuned.
STRUCTURES_LOSS_WEIGHT = 0.5
#: The reconstruction head (a preset's ``reconstruction_weight`` > 0): this share of the network
#: input's cubic blocks (edge :data:`RECONSTRUCTION_BLOCK` voxels) is hidden at every training step
#: and the head fills them in (mean squared error on the hidden voxels). Low, because the other
#: heads learn from the same hidden input: at this ratio it is a cutout-like augmentation for them.
RECONSTRUCTION_MASK_RATIO = 0.15
RECONSTRUCTION_BLOCK = 8


def choose_heads(fingerprint: dict, reconstruction_weight: float = 0.0) -> dict:
    """Output heads and their channel counts.

    With masks: a segmentation head (background + one channel per vertebra label seen in the
    masks), an auxiliary ``structures`` head (background + discs, endplates, canal, cord: those the
    masks carry, TPTBox values) that regularises the shared network and is trained only where a
    case annotates them, and ONE centroid heatmap channel for all vertebrae; the label of a heatmap peak is read
    from the segmentation around it. With ``reconstruction_weight`` > 0 an auxiliary ``reconstruction`` head
    (one channel per image channel) fills in hidden blocks of the input on every training patch. One channel instead of one per label keeps the heatmap target
    26x smaller (a 512x512x300 CT: 0.3 GB instead of 8 GB in float32). Without any mask
    (centroids only): one heatmap channel per label seen, which then carries the identity.
    """
    spine = fingerprint.get("spine", {})
    seg_labels = L.sort_cranio_caudal(spine.get("segmentation_labels", []))
    all_labels = L.sort_cranio_caudal({lab for labs in spine.get("labels_per_case", {}).values() for lab in labs})
    if seg_labels:
        heads = {"segmentation": {"labels": sorted(seg_labels), "channels": len(seg_labels) + 1},
                 "heatmap": {"channels": 1, "per_label": False}}
        structures = [st for st in L.STRUCTURES if st in spine.get("structures", {})]
        if structures:
            heads["structures"] = {"names": structures, "channels": len(structures) + 1,
                                   "loss_weight": STRUCTURES_LOSS_WEIGHT}
    else:
        heads = {"heatmap": {"channels": len(all_labels), "per_label": True, "labels": sorted(all_labels)}}
    if reconstruction_weight and reconstruction_weight > 0:
        heads["reconstruction"] = {"channels": max(1, len(fingerprint.get("channel_names", {"0": ""}))),
                                   "loss_weight": float(reconstruction_weight),
                                   "mask_ratio": RECONSTRUCTION_MASK_RATIO, "block": RECONSTRUCTION_BLOCK}
    return heads


def scan_extent_range(fingerprint: dict) -> dict:
    """Smallest and largest physical extent of the training scans (mm, axes sorted by size per
    scan), for the prediction's header check (:func:`spinelm.sanity.header_reasons`)."""
    ext = [np.sort(np.asarray(sh, float) * np.asarray(sp, float))
           for sh, sp in zip(fingerprint.get("shapes_after_crop", []), fingerprint.get("spacings", []))]
    if not ext:
        return {}
    return {"min": np.min(ext, 0).round(1).tolist(), "max": np.max(ext, 0).round(1).tolist()}


def output_channels(heads: dict) -> int:
    """Total output channels of all heads (counted in the memory estimate)."""
    return int(sum(h["channels"] for h in heads.values()))


def run_end_counts(fingerprint: dict) -> dict:
    """How often each vertebra is the first / last annotated one of a case (field-of-view statistics).

    The ordering step uses them as a prior on where a run of vertebrae starts and ends: datasets
    from a lumbar protocol end at L5 or the sacrum, whole-spine scans start at C1.
    """
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for labs in fingerprint.get("spine", {}).get("labels_per_case", {}).values():
        if labs:
            ordered = L.sort_cranio_caudal(labs)
            first[L.name_of(ordered[0])] = first.get(L.name_of(ordered[0]), 0) + 1
            last[L.name_of(ordered[-1])] = last.get(L.name_of(ordered[-1]), 0) + 1
    return {"first_label_counts": first, "last_label_counts": last}


#: Where each transitional vertebra would be: between these two regular vertebrae.
VARIANT_PLACES = {"T13": ("T12", "L1"), "L6": ("L5", "S1")}


def variant_counts(fingerprint: dict) -> dict:
    """``{"T13": {"seen", "visible"}, "L6": {...}}``: how many training cases hold the transitional
    vertebra among those that show its place (that hold it, or both its neighbours: T12 and L1 for
    T13, L5 and S1 for L6; a run that ends at L5 may hide one below). The ordering turns them into
    its variant priors (:func:`spinelm.ordering.variant_prior_from_counts`)."""
    out = {}
    for variant, (above, below) in VARIANT_PLACES.items():
        seen = visible = 0
        for labs in fingerprint.get("spine", {}).get("labels_per_case", {}).values():
            names = {L.name_of(int(x)) for x in labs}
            if variant in names or (above in names and below in names):
                visible += 1
                seen += variant in names
        out[variant] = {"seen": seen, "visible": visible}
    return out


def variant_rationale(counts: dict) -> str:
    """One line of the plan's "why": each transitional vertebra's count and the ordering's prior from it."""
    from spinelm.ordering import variant_prior_from_counts

    parts = []
    for variant in VARIANT_PLACES:
        c = counts.get(variant, {"seen": 0, "visible": 0})
        parts.append(f"{variant} in {c['seen']} of {c['visible']} cases that show its place -> prior "
                     f"{variant_prior_from_counts(c['seen'], c['visible']):.3f}")
    return "transitional vertebrae (ordering priors, never below the default): " + "; ".join(parts)


def direction_rationale(pairs: dict) -> str:
    """One line of the plan's "why": for how many pairs of consecutive vertebrae the ordering weighs
    the tilt of the step between them (:mod:`spinelm.ordering`, direction evidence)."""
    from spinelm import labels as L
    from spinelm.ordering import MIN_DIRECTION_CASES, SpineModel

    used = sorted(SpineModel.from_stats({"consecutive_pairs": pairs}).pair_offsets,
                  key=lambda ab: L.cranio_caudal_rank(ab[0]))
    if not used:
        return (f"step directions: no pair of consecutive vertebrae seen in {MIN_DIRECTION_CASES} or more cases, "
                f"so the ordering does not weigh the tilt of steps")
    first, last = (f"{L.name_of(a)}-{L.name_of(b)}" for a, b in (used[0], used[-1]))
    return (f"step directions: the ordering weighs the tilt of the steps between {len(used)} of {len(pairs)} pairs of "
            f"consecutive vertebrae ({first} to {last}; each seen in {MIN_DIRECTION_CASES} or more cases)")


def cranio_caudal_axis_after_transpose(transpose_forward: Sequence[int], canonical_axis: int = 0) -> int:
    """Where the cranio-caudal axis (axis 0 of canonical arrays) ends up after nnU-Net's transpose."""
    return int(list(transpose_forward).index(canonical_axis))


def mirror_axes(cc_axis: int) -> list[int]:
    """Mirroring is allowed along every axis but the cranio-caudal one (that would reverse the
    label order); flipping left-right or front-back keeps levels valid for the heatmap task."""
    return [a for a in range(3) if a != cc_axis]


# ----------------------------------------------------------------------------------------------
# nnU-Net planner, narrowly adapted


def _make_planner(dataset_name: str, preset: Preset, mem_gb: float, n_outputs: int,
                  max_patch_voxels: int | None):
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    class SpinePlanner(ExperimentPlanner):
        """nnU-Net's planner with spinelm's output channels and an optional compute cap on the patch."""

        def static_estimate_VRAM_usage(self, patch_size, input_channels, output_channels, arch_class_name,
                                       arch_kwargs, arch_kwargs_req_import):
            est = ExperimentPlanner.static_estimate_VRAM_usage(patch_size, input_channels, n_outputs,
                                                               arch_class_name, arch_kwargs, arch_kwargs_req_import)
            if max_patch_voxels is not None and np.prod(patch_size, dtype=np.float64) > max_patch_voxels:
                return float("inf")  # over the compute budget: make the planner shrink the patch
            return est

    if preset.network_class.endswith("ResidualEncoderUNet"):
        from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet as net_class
    else:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet as net_class
    planner = SpinePlanner(dataset_name, gpu_memory_target_in_gb=mem_gb)
    planner.UNet_class = net_class
    planner.UNet_base_num_features = preset.base_features
    planner.UNet_max_features_3d = preset.max_features
    planner.UNet_min_batch_size = preset.min_batch_size
    planner.UNet_blocks_per_stage_encoder = preset.blocks_per_stage_encoder
    planner.UNet_blocks_per_stage_decoder = preset.blocks_per_stage_decoder
    return planner


def _config_summary(cfg: dict) -> dict:
    arch = cfg["architecture"]["arch_kwargs"]
    return {"spacing": cfg["spacing"], "patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"],
            "n_stages": arch["n_stages"], "features_per_stage": arch["features_per_stage"],
            "strides": arch["strides"]}


def _nnunet_configuration(fingerprint: dict, heads: dict, preset: Preset, mem_gb: float, max_vox: int | None,
                          why: list[str], coarse_max_vox: int | None = None):
    """nnU-Net's planner on spinelm's terms: spacing (floored by the preset), transpose, patch, topology,
    batch and normalisation; appends its reasons to ``why``."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    distance = consecutive_distance_mm(fingerprint)
    files = fingerprint.get("files") or {c: {"images": [], "label": ""} for c in fingerprint["cases"]}
    with nnunet_environment(dataset_json(fingerprint["channel_names"],
                                         heads.get("segmentation", {}).get("labels", []), files), fingerprint) as name:
        planner = _make_planner(name, preset, mem_gb, output_channels(heads), max_vox)
        nn_spacing = planner.determine_fullres_target_spacing()
        spacing = np.asarray(apply_spacing_floor(nn_spacing, preset.min_spacing_mm))
        why.append(f"target spacing {_fmt(spacing)} mm (z, y, x canonical; nnU-Net's rule gives {_fmt(nn_spacing)}"
                   + (f", floored at {preset.min_spacing_mm:g} mm by the {preset.name} preset)" if
                      np.any(spacing != nn_spacing) else ")"))
        planner.overwrite_target_spacing = [float(s) for s in spacing]
        tf, tb = planner.determine_transpose()
        spacing_t = spacing[tf]
        shapes = [compute_new_shape(s, sp, spacing) for sp, s in zip(fingerprint["spacings"],
                                                                     fingerprint["shapes_after_crop"])]
        median_shape_t = np.median(shapes, 0)[tf]
        n_vox = float(np.prod(median_shape_t, dtype=np.float64) * len(fingerprint["cases"]))
        fine = planner.get_plans_for_configuration(spacing_t, median_shape_t, "spinelm_fine", n_vox, {})
        fine["batch_dice"] = False
        cc = cranio_caudal_axis_after_transpose(tf)
        patch_cc_mm = fine["patch_size"][cc] * spacing_t[cc]
        fov_cc_mm = float(median_shape_t[cc] * spacing_t[cc])
        why.append(f"fine patch {[int(v) for v in fine['patch_size']]} voxels spans {patch_cc_mm:.0f} mm along the "
                   f"column, about {patch_cc_mm / distance:.1f} vertebrae (median distance {distance:.1f} mm)")
        if patch_cc_mm / distance < MIN_VERTEBRAE_IN_VIEW < fov_cc_mm / distance:
            why.append(f"warning: the patch sees fewer than {MIN_VERTEBRAE_IN_VIEW:g} vertebrae along the column; "
                       "it localises, and the coarse stage and the ordering tell the levels apart (a larger "
                       "--time-budget or GPU memory gives a larger patch)")
        norm, mask_norm = planner.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
        coarse = None
        if fine["patch_size"][cc] < WHOLE_VIEW_SHARE * median_shape_t[cc]:
            coarse = _coarse_configuration(_make_planner(name, preset, mem_gb, output_channels(heads), coarse_max_vox),
                                           fingerprint, spacing, tf, cc, distance, why)
            if coarse_max_vox is not None:
                why.append(f"coarse patch capped at {coarse_max_vox} voxels so that its required steps fit its share "
                           "of the time budget")
    return fine, coarse, tf, tb, norm, mask_norm


def _coarse_configuration(planner, fingerprint: dict, fine_spacing: np.ndarray, tf, cc: int, distance: float,
                          why: list[str]) -> dict:
    """The identification stage: a configuration coarse enough for one patch to hold the whole
    column of the scans up to the :data:`COARSE_EXTENT_PERCENTILE` percentile of their extents (the
    median scan; nnU-Net's low-resolution idea, sized in vertebrae).

    Starts at :data:`COARSE_VOXELS_PER_VERTEBRA` voxels per neighbour distance (never finer than the
    fine spacing) and coarsens by 15 % steps while the patch misses part of the median column, down
    to :data:`COARSE_MIN_VOXELS_PER_VERTEBRA`.
    """
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    iso = distance / COARSE_VOXELS_PER_VERTEBRA
    while True:
        spacing = np.maximum(fine_spacing, iso)
        shapes = [compute_new_shape(s, sp, spacing) for sp, s in zip(fingerprint["spacings"],
                                                                     fingerprint["shapes_after_crop"])]
        long_t = np.percentile(shapes, COARSE_EXTENT_PERCENTILE, axis=0)[tf]
        n_vox = float(np.prod(np.median(shapes, 0), dtype=np.float64) * len(fingerprint["cases"]))
        cfg = planner.get_plans_for_configuration(spacing[tf], long_t, "spinelm_coarse", n_vox, {})
        covers = cfg["patch_size"][cc] >= WHOLE_VIEW_SHARE * long_t[cc]
        if covers or iso * 1.15 > distance / COARSE_MIN_VOXELS_PER_VERTEBRA:
            break
        iso *= 1.15
    cfg["batch_dice"] = False
    cfg["batch_size"] = min(int(cfg["batch_size"]), planner.UNet_min_batch_size)
    patch_cc_mm = cfg["patch_size"][cc] * spacing[tf][cc]
    why.append(f"the fine patch sees part of the column: a coarse identification stage at {_fmt(spacing[tf])} mm, "
               f"patch {[int(v) for v in cfg['patch_size']]} ({patch_cc_mm:.0f} mm; {COARSE_EXTENT_PERCENTILE}% of "
               f"the scans are up to {long_t[cc] * spacing[tf][cc]:.0f} mm long"
               f"{'' if covers else ', so the longest are seen in parts'}), labels each fine peak from the whole "
               f"field of view")
    return cfg


def plan(fingerprint: dict, preset: Preset | str | None = None, device: str = "cpu",
         gpu_memory_gb: float | None = None, time_budget_min: float | None = None,
         seconds_per_mvoxel: float | None = None, fine_budget_min: float | None = None,
         coarse_seconds_per_mvoxel: float | None = None) -> dict:
    """Plans for a dataset from its fingerprint; a pure function of its arguments.

    Args:
        fingerprint: output of :func:`spinelm.fingerprint.compute_fingerprint`.
        preset: preset name, :class:`Preset`, or None to choose by device.
        device: ``"cpu"`` or ``"cuda"``.
        gpu_memory_gb: memory of the GPU, to lower the target on small cards.
        time_budget_min: training time budget.
        seconds_per_mvoxel: measured cost of a training step per million batch voxels on the device
            (:func:`spinelm.budget.measure_step`); with a time budget it caps the patch so that the
            preset's ``min_iterations`` steps fit. Without it the patch is not capped.
        fine_budget_min: the part of the budget the fine stage trains for (the rest goes to the coarse
            stage); default the whole budget.
        coarse_seconds_per_mvoxel: the coarse stage's measured step cost; with a time budget it caps the
            coarse patch so that :data:`spinelm.budget.COARSE_REQUIRED_STEPS` fit in
            :data:`spinelm.budget.COARSE_MAX_SHARE` of the budget (after coarsening to the fewest voxels
            per vertebra has not made it cheap enough: a whole-body field of view).
    """
    import nnunetv2

    preset = preset if isinstance(preset, Preset) else load_preset(preset or choose_preset(device, gpu_memory_gb))
    budget = time_budget_min if time_budget_min is not None else preset.time_budget_min
    heads = choose_heads(fingerprint, preset.reconstruction_weight)
    mem_gb = memory_target_gb(preset.memory_target_gb, gpu_memory_gb if not device.startswith("cpu") else None)
    max_vox = patch_voxel_budget(fine_budget_min if fine_budget_min is not None else budget, preset.min_batch_size,
                                 seconds_per_mvoxel, preset.min_iterations)
    distance = consecutive_distance_mm(fingerprint)
    why: list[str] = []
    coarse_max_vox = None
    if coarse_seconds_per_mvoxel is not None:
        from spinelm.budget import COARSE_MAX_SHARE, COARSE_REQUIRED_STEPS

        coarse_max_vox = patch_voxel_budget(budget * COARSE_MAX_SHARE, preset.min_batch_size, coarse_seconds_per_mvoxel,
                                            COARSE_REQUIRED_STEPS)
    fine, coarse, tf, tb, norm, mask_norm = _nnunet_configuration(fingerprint, heads, preset, mem_gb, max_vox, why,
                                                                  coarse_max_vox)
    cc = cranio_caudal_axis_after_transpose(tf)
    if max_vox is not None:
        # the cap counts patch voxels at the preset's batch size; nnU-Net would grow the batch of a
        # small patch, which the measured budget cannot pay for (more context per step beats more samples)
        fine["batch_size"] = min(int(fine["batch_size"]), preset.min_batch_size)
        why.append(f"time budget {budget:g} min on {device} at a measured {seconds_per_mvoxel:.2f} s per million "
                   f"batch voxels: patch capped at {max_vox} voxels so that {preset.min_iterations} training steps fit")
    configs = {"coarse": coarse, "fine": fine} if coarse is not None else {"fine": fine}
    for cfg in configs.values():
        cfg["normalization_schemes"], cfg["use_mask_for_norm"] = norm, mask_norm
        for k in ("spacing", "patch_size", "median_image_size_in_voxels"):
            cfg[k] = [float(v) if k == "spacing" else int(round(v)) for v in cfg[k]]
    for cfg in configs.values():
        cfg["heatmap_sigma_mm"] = round(heatmap_sigma_mm(distance, cfg["spacing"]), 3)
    sigma = configs["fine"]["heatmap_sigma_mm"]
    heads.setdefault("heatmap", {})["sigma_mm"] = sigma
    why.append(f"heatmap sigma {sigma:.2f} mm ({SIGMA_FRACTION_OF_DISTANCE:g} x neighbour distance, at least "
               f"{SIGMA_MIN_VOXELS:g} voxels)")
    why.append("heads: " + ", ".join(f"{k} ({v['channels']} channel{'s' if v['channels'] > 1 else ''})"
                                     for k, v in heads.items()))
    counts = variant_counts(fingerprint)
    why.append(variant_rationale(counts))
    why.append(direction_rationale(fingerprint.get("spine", {}).get("consecutive_pairs", {}) or {}))
    fine_cfg = configs["fine"]
    from spinelm.classification import plan_classification

    classification = plan_classification(fingerprint, fine_cfg["spacing"], fine_cfg["architecture"]["arch_kwargs"]["strides"], tf)
    if classification is not None:
        why.append(f"classification head: classes {', '.join(classification['classes'])}; "
                   + classification["rationale"])
    identification = None
    if "coarse" in configs:
        from spinelm.identification import plan_identification

        known = heads.get("segmentation", {}).get("labels") or heads["heatmap"].get("labels") or []
        if known:
            identification = plan_identification(configs["coarse"], distance, cc, known)
            why.append(identification["rationale"])
    why.append(f"network {preset.network_class.rsplit('.', 1)[-1]}, "
               f"{fine_cfg['architecture']['arch_kwargs']['n_stages']} stages, features "
               f"{list(fine_cfg['architecture']['arch_kwargs']['features_per_stage'])}, batch {fine_cfg['batch_size']} "
               f"(memory target {mem_gb:g} GB)")
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export
    plans = {
        "format": "spinelm-plans",
        "version": PLANS_VERSION,
        "spinelm_version": __version__,
        "nnunetv2_version": getattr(nnunetv2, "__version__", _dist_version("nnunetv2")),
        "dataset": fingerprint.get("dataset"),
        "preset": preset.name,
        "device": device,
        "budget": {"time_budget_min": budget, "gpu_memory_gb": gpu_memory_gb, "memory_target_gb": mem_gb,
                   "max_patch_voxels": max_vox, "required_steps": preset.min_iterations,
                   "seconds_per_mvoxel": seconds_per_mvoxel},
        "channel_names": fingerprint["channel_names"],
        "orientation": "LPS",
        "transpose_forward": [int(i) for i in tf],
        "transpose_backward": [int(i) for i in tb],
        "cranio_caudal_axis": cc,
        "mirror_axes": mirror_axes(cc),
        "foreground_intensity_properties_per_channel": fingerprint["foreground_intensity_properties_per_channel"],
        "heads": heads,
        "configurations": configs,
        "training": {"epochs": preset.epochs, "iterations_per_epoch": preset.iterations_per_epoch,
                     "optimizer": preset.optimizer, "initial_lr": preset.initial_lr, "num_folds": preset.num_folds, "time_budget_min": budget},
        "spine": {"median_consecutive_distance_mm": distance,
                  "consecutive_pairs": fingerprint.get("spine", {}).get("consecutive_pairs", {}),
                  "column_shape": fingerprint.get("spine", {}).get("column_shape"),
                  "variant_counts": counts,
                  **run_end_counts(fingerprint)},
        "scan_extent_mm": scan_extent_range(fingerprint),
        "rationale": why,
    }
    if classification is not None:
        plans["classification"] = classification
    if identification is not None:
        plans["identification"] = identification
    recursive_fix_for_json_export(plans)
    return json.loads(json.dumps(plans))  # exactly what plans.json holds (tuples become lists)


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _fmt(values) -> str:
    return "[" + ", ".join(f"{float(v):.3g}" for v in values) + "]"


def summarize(plans: dict) -> str:
    """Readable summary of what was chosen and why."""
    plans = plans.raw if isinstance(plans, Plans) else plans
    lines = [f"spinelm plan (preset {plans['preset']}, device {plans['device']})"]
    lines.append("  configurations (axes in network order, after transpose):")
    for name, cfg in plans["configurations"].items():
        s = _config_summary(cfg)
        lines.append(f"  {name:6s} spacing {_fmt(s['spacing'])} mm  patch {s['patch_size']}  batch {s['batch_size']}  "
                     f"stages {s['n_stages']}  features {list(s['features_per_stage'])}")
    lines.append(f"  axes: transpose {plans['transpose_forward']}, cranio-caudal axis {plans['cranio_caudal_axis']}, "
                 f"mirroring on {plans['mirror_axes']}")
    lines.append("  why:")
    lines += [f"    - {r}" for r in plans["rationale"]]
    return "\n".join(lines)


def save_plans(plans: "dict | Plans", path: str | os.PathLike) -> Path:
    return write_json_atomic(path, plans.raw if isinstance(plans, Plans) else plans)


def load_plans(path: str | os.PathLike) -> Plans:
    """The checked, typed plans of ``plans.json`` (:class:`spinelm.plans.Plans`)."""
    return Plans.load(path)
