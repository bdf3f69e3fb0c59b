"""Typed views of ``plans.json`` and of a model folder.

``plans.json`` stays versioned, readable JSON (what :func:`spinelm.planning.plan` returns);
:class:`Plans` reads it once, checks that every field the pipeline uses is there (an old or
hand-edited file gets one clear message naming the file and the field), and gives typed access:
heads as :class:`HeadSpec`, configurations as :class:`Configuration`, the spine statistics as the
ordering's :class:`~spinelm.ordering.SpineModel`. :class:`ModelFolder` is the one place that
knows where plans, checkpoints and the preprocessed cache live.

No SimpleITK here: this module runs on training machines.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

PLANS_FORMAT = "spinelm-plans"
PLANS_VERSION = 1
CONFIGURATION = "fine"
#: The identification stage, when the plan has one (see :func:`spinelm.planning._coarse_configuration`).
COARSE = "coarse"
CHECKPOINTS = ("final", "best", "latest")

#: Fields every plans file must carry (top level); configurations and heads are checked below.
_REQUIRED = ("channel_names", "transpose_forward", "transpose_backward", "cranio_caudal_axis", "mirror_axes",
             "foreground_intensity_properties_per_channel", "heads", "configurations", "training", "spine")
_REQUIRED_CONFIG = ("spacing", "patch_size", "batch_size", "architecture", "normalization_schemes")


@dataclass(frozen=True)
class HeadSpec:
    """One output head: its name, channel count and what the channels mean.

    Attributes:
        name: ``"segmentation"`` or ``"heatmap"`` (further heads plug in as plan fields).
        channels: output channels of the head.
        labels: VerSe labels of the channels (segmentation: after the background channel;
            per-label heatmaps: one each).
        per_label: a heatmap with one channel per label (centroid-only datasets).
        sigma_mm: Gaussian sigma of heatmap targets.
    """

    name: str
    channels: int
    labels: tuple[int, ...] = ()
    per_label: bool = False
    sigma_mm: float | None = None


@dataclass(frozen=True)
class Configuration:
    """One configuration of the plan (axes in network order, after nnU-Net's transpose)."""

    name: str
    spacing: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    batch_size: int
    architecture: dict = field(repr=False, compare=False)
    heatmap_sigma_mm: float | None = None

    @property
    def strides(self) -> list:
        return self.architecture["arch_kwargs"]["strides"]

    @property
    def n_stages(self) -> int:
        return len(self.strides)


@dataclass(frozen=True, eq=False)
class Plans:
    """A checked, read-only view of a plans dictionary; ``raw`` is exactly what ``plans.json`` holds."""

    raw: dict = field(repr=False)
    source: str = "plans"

    def __post_init__(self):
        fmt, version = self.raw.get("format"), self.raw.get("version")
        if fmt is not None and fmt != PLANS_FORMAT:
            raise ValueError(f"{self.source}: not a spinelm plans file (format {fmt!r})")
        if isinstance(version, int) and version > PLANS_VERSION:
            raise ValueError(f"{self.source}: plans version {version} is newer than this spinelm understands "
                             f"({PLANS_VERSION}); upgrade spinelm")
        missing = [k for k in _REQUIRED if k not in self.raw]
        if missing:
            raise ValueError(f"{self.source}: plans lack the field(s) {', '.join(missing)} (made by an older spinelm "
                             f"or edited by hand?); re-plan with 'spinelm plan DATASET -o MODEL_DIR'")
        for name, cfg in self.raw["configurations"].items():
            gone = [k for k in _REQUIRED_CONFIG if k not in cfg]
            if gone:
                raise ValueError(f"{self.source}: configuration {name!r} lacks {', '.join(gone)}; re-plan the dataset")
        if "heatmap" not in self.raw["heads"]:
            raise ValueError(f"{self.source}: plans have no heatmap head; re-plan the dataset")

    # -------------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plans":
        from spinelm.io.files import read_versioned_json

        return cls(read_versioned_json(path, PLANS_FORMAT, PLANS_VERSION), str(path))

    # --------------------------------------------------------------------------------- fields

    @property
    def channel_names(self) -> dict[str, str]:
        return self.raw["channel_names"]

    @property
    def n_channels(self) -> int:
        return len(self.raw["channel_names"])

    @property
    def heads(self) -> dict[str, HeadSpec]:
        """Output heads in network channel order."""
        out = {}
        for name, h in self.raw["heads"].items():
            out[name] = HeadSpec(name, int(h["channels"]), tuple(int(x) for x in h.get("labels", ())),
                                 bool(h.get("per_label", False)), h.get("sigma_mm"))
        return out

    @property
    def head_dict(self) -> dict:
        """The heads as stored (for the loss and the sliding window, which split outputs by it)."""
        return self.raw["heads"]

    @property
    def n_outputs(self) -> int:
        return sum(h.channels for h in self.heads.values())

    @property
    def known_labels(self) -> list[int]:
        """Labels the model can output (segmentation labels, else per-label heatmap labels)."""
        heads = self.heads
        if "segmentation" in heads and heads["segmentation"].labels:
            return list(heads["segmentation"].labels)
        return list(heads["heatmap"].labels)

    @property
    def transpose_forward(self) -> list[int]:
        return [int(x) for x in self.raw["transpose_forward"]]

    @property
    def transpose_backward(self) -> list[int]:
        return [int(x) for x in self.raw["transpose_backward"]]

    @property
    def cc_axis(self) -> int:
        """Cranio-caudal axis of preprocessed arrays (after the transpose)."""
        return int(self.raw["cranio_caudal_axis"])

    @property
    def mirror_axes(self) -> list[int]:
        return [int(x) for x in self.raw["mirror_axes"]]

    @property
    def distance_mm(self) -> float:
        """Median distance between consecutive vertebra centres (mm)."""
        return float(self.raw["spine"]["median_consecutive_distance_mm"])

    @property
    def classification(self) -> dict | None:
        """The per-vertebra classification head (:mod:`spinelm.classification`), when the plan has one."""
        return self.raw.get("classification")

    @property
    def identification(self) -> dict | None:
        """The coarse stage's level head (:mod:`spinelm.identification`), when the plan has one."""
        return self.raw.get("identification") if self.has_coarse else None

    @property
    def training(self) -> dict:
        return self.raw["training"]

    @property
    def configuration_names(self) -> list[str]:
        return list(self.raw["configurations"])

    def configuration(self, name: str = CONFIGURATION) -> Configuration:
        try:
            cfg = self.raw["configurations"][name]
        except KeyError:
            raise ValueError(f"{self.source}: no configuration {name!r}; available: "
                             f"{', '.join(self.configuration_names)}") from None
        return Configuration(name, tuple(float(s) for s in cfg["spacing"]), tuple(int(p) for p in cfg["patch_size"]),
                             int(cfg["batch_size"]), cfg["architecture"],
                             cfg.get("heatmap_sigma_mm", self.raw["heads"]["heatmap"].get("sigma_mm")))

    @property
    def stages(self) -> list[str]:
        """Configurations to train, in order: the coarse identification stage first when there is one."""
        return [c for c in (COARSE, CONFIGURATION) if c in self.raw["configurations"]]

    @property
    def has_coarse(self) -> bool:
        return COARSE in self.raw["configurations"]

    def stage_share(self, configuration: str) -> float:
        """Share of a fold's time budget that ``configuration`` trains for (the plan's split)."""
        shares = self.raw.get("budget", {}).get("stage_shares") or {}
        if configuration in shares:
            return float(shares[configuration])
        return 1.0 if len(self.stages) == 1 else (0.25 if configuration == COARSE else 0.75)

    def spine_model(self):
        """The ordering's anatomical statistics (:class:`spinelm.ordering.SpineModel`), built once."""
        from spinelm.ordering import SpineModel

        if "_spine_model" not in self.__dict__:  # a cache on a frozen view
            self.__dict__["_spine_model"] = SpineModel.from_stats(self.raw.get("spine"),
                                                                  default_distance_mm=self.distance_mm)
        return self.__dict__["_spine_model"]


def as_plans(plans: "Plans | dict") -> Plans:
    """``plans`` as a :class:`Plans` (dictionaries from :func:`spinelm.planning.plan` are wrapped)."""
    return plans if isinstance(plans, Plans) else Plans(plans)


class ModelFolder:
    """A self-contained model folder::

        MODEL_DIR/plans.json, fingerprint.json, dataset.json, splits.json
        MODEL_DIR/preprocessed/<configuration>/   the training cache
        MODEL_DIR/fold_N/checkpoint_{final,best,latest}.pt (+ .json), training_log.txt, training_curve.png
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._plans: Plans | None = None

    @property
    def plans_path(self) -> Path:
        return self.root / "plans.json"

    @property
    def plans(self) -> Plans:
        if self._plans is None:
            if not self.plans_path.is_file():
                raise FileNotFoundError(f"{self.root}: not a spinelm model folder (no plans.json); make one with "
                                        f"'spinelm plan DATASET -o {self.root}' or 'spinelm plan-and-train'")
            self._plans = Plans.load(self.plans_path)
        return self._plans

    @property
    def splits_path(self) -> Path:
        return self.root / "splits.json"

    def cache_dir(self, configuration: str = CONFIGURATION) -> Path:
        return self.root / "preprocessed" / configuration

    def unlabelled_cache_dir(self, configuration: str = CONFIGURATION) -> Path:
        """The preprocessed unlabelled scans (``imagesUnlabelled/``) of a configuration."""
        return self.root / "preprocessed" / f"{configuration}_unlabelled"

    def fold_dir(self, fold: int, configuration: str = CONFIGURATION) -> Path:
        return self.root / (f"fold_{fold}" if configuration == CONFIGURATION else f"fold_{fold}_{configuration}")

    def checkpoint(self, fold: int, name: str = "final", configuration: str = CONFIGURATION) -> Path:
        if name not in CHECKPOINTS:
            raise ValueError(f"unknown checkpoint {name!r}; expected one of {', '.join(CHECKPOINTS)}")
        return self.fold_dir(fold, configuration) / f"checkpoint_{name}.pt"

    def trained_folds(self, name: str = "final") -> list[int]:
        """Folds that have the checkpoint ``name``, sorted."""
        return sorted(int(p.parent.name.split("_")[1]) for p in self.root.glob(f"fold_*/checkpoint_{name}.pt")
                      if re.fullmatch(r"fold_\d+", p.parent.name))


__all__ = ["CHECKPOINTS", "COARSE", "CONFIGURATION", "Configuration", "HeadSpec", "ModelFolder", "PLANS_FORMAT",
           "PLANS_VERSION", "Plans", "as_plans"]
