"""Dataset folders: discovery of cases in the nnU-Net v2 raw layout plus spinelm's additions.

```
DATASET/
  dataset.json                 optional (channel_names, labels, file_ending); inferred if absent
  imagesTr/CASE_0000.nii.gz    one file per channel (_0000, _0001, ...)
  labelsTr/CASE.nii.gz         optional per case: vertebra masks (VerSe labels)
  centroidsTr/CASE.json        optional per case: spinelm JSON, VerSe CASE_ctd.json or CASE.mrk.json
  classesTr.csv                optional: case,label,class
  imagesUnlabelled/CASE_0000.nii.gz   optional: scans without annotation
```

Discovery only looks at file names; it never reads voxels. Problems it can see from names alone
(orphan masks, missing channels, two files for one case) are collected as :class:`Problem` for
``spinelm validate`` instead of being raised, so that every problem is reported at once.
"""
from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spinelm import labels as L
from spinelm.io.files import read_json
from spinelm.io.image import IMAGE_ENDINGS, Geometry, image_ending, load_volume, read_geometry
from spinelm.io.scan import channel_problem, group_channels, read_scan
from spinelm.io.landmarks import Landmark, centroids_from_mask, read_landmarks

CENTROID_SUFFIXES = (".mrk.json", "_ctd.json", ".json")
BOX_SUFFIXES = (".mrk.json", ".json")
#: Mask value that marks unknown voxels of training masks derived from boxes when dataset.json has no
#: ``"ignore"`` label.
DEFAULT_IGNORE_VALUE = L.MAX_LABEL + 1


@dataclass(frozen=True)
class Problem:
    """One finding of discovery or validation, printed as one line.

    Attributes:
        severity: ``"error"`` (blocks training) or ``"warning"`` (suspicious but legal).
        path: file or folder concerned.
        message: what was expected and what was found.
        fix: how to fix it.
        case: case identifier, when the problem belongs to one.
    """

    severity: str
    path: str
    message: str
    fix: str = ""
    case: str | None = None

    def line(self, root: Path | None = None) -> str:
        path = self.path
        if root is not None:
            try:
                path = str(Path(self.path).resolve().relative_to(Path(root).resolve()))
            except ValueError:
                pass
        tag = "ERROR  " if self.severity == "error" else "WARNING"
        fix = f" -> {self.fix}" if self.fix else ""
        return f"{tag} {path}: {self.message}{fix}"


@dataclass(frozen=True)
class Case:
    """One scan and its annotations (paths only)."""

    case_id: str
    images: tuple[Path, ...]
    mask: Path | None = None
    centroids: Path | None = None
    classes: tuple[tuple[int, str, float], ...] = ()  # (label, class name, weight): classesTr.csv rows
    ignore_value: int | None = None  # mask value of unannotated voxels (dataset.json labels "ignore")
    scribbles: Path | None = None  # scribblesTr/: strokes (label or 0), ignore_value elsewhere
    boxes: Path | None = None  # boxesTr/: one box per vertebra (spinelm.io.boxes)

    @property
    def annotated(self) -> bool:
        return any(x is not None for x in (self.mask, self.centroids, self.scribbles, self.boxes))

    @property
    def annotation(self) -> str:
        """What the case's voxel annotation is: ``mask`` (full or partial), ``scribbles``, ``boxes`` or
        ``centroids`` (none)."""
        if self.mask is not None:
            return "mask"
        if self.scribbles is not None:
            return "scribbles"
        if self.boxes is not None:
            return "boxes"
        return "centroids"


@dataclass(frozen=True)
class Dataset:
    """A discovered dataset folder."""

    root: Path
    channel_names: dict[str, str]
    file_ending: str
    cases: tuple[Case, ...]
    unlabelled: tuple[Case, ...] = ()
    dataset_json: dict = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()
    splits: tuple = ()  # the folds of DATASET/splits.json, when the dataset fixes them

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def case(self, case_id: str) -> Case:
        for c in self.cases + self.unlabelled:
            if c.case_id == case_id:
                return c
        raise KeyError(f"no case {case_id!r} in {self.root}")


def _scan_images(folder: Path, problems: list[Problem]) -> tuple[dict[str, dict[int, Path]], Counter]:
    """Group image files of a folder by case and channel (:func:`spinelm.io.scan.group_channels`);
    note odd names and duplicates."""
    endings: Counter = Counter()
    if not folder.is_dir():
        return {}, endings
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if image_ending(path.name) is None:
            problems.append(Problem("warning", str(path), "not an image file (expected one of "
                                    f"{', '.join(IMAGE_ENDINGS)}); ignored", "move it out of the folder"))
            continue
        files.append(path)
    by_case, probs = group_channels(files, require_suffix=True)
    problems += [Problem("error", p.path, p.message, p.fix) for p in probs]
    for chans in by_case.values():
        for path in chans.values():
            endings[image_ending(path.name)] += 1
    return by_case, endings


def _cases_from(by_case: dict[str, dict[int, Path]], n_channels: int, problems: list[Problem],
                folder: Path) -> dict[str, tuple[Path, ...]]:
    out = {}
    for case, chans in sorted(by_case.items()):
        what = channel_problem(case, chans, n_channels)
        if what:
            problems.append(Problem("error", str(folder / f"{case}_*"), what,
                                    "provide one file per channel listed in dataset.json channel_names", case))
            continue
        out[case] = tuple(chans[c] for c in range(n_channels))
    return out


def _find_by_case(folder: Path, suffixes: tuple[str, ...], problems: list[Problem],
                  what: str) -> dict[str, Path]:
    """Files of a folder keyed by case id, for the given suffixes (first match wins)."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        name = path.name
        suffix = next((s for s in suffixes if name.lower().endswith(s)), None)
        if suffix is None:
            problems.append(Problem("warning", str(path), f"not a {what} file (expected {', '.join(suffixes)}); "
                                    f"ignored", "move it out of the folder"))
            continue
        case = name[: -len(suffix)]
        if case in found:
            problems.append(Problem("error", str(path), f"duplicated case: {what} for case {case!r} also given "
                                    f"as {found[case].name}", "keep one file per case", case))
            continue
        found[case] = path
    return found


def _read_classes(path: Path, problems: list[Problem],
                  names: dict[str, str] | None = None) -> dict[str, list[tuple[int, str, float]]]:
    """``classesTr.csv`` -> ``{case: [(label, class name, weight), ...]}``.

    Columns ``case,label,class`` and optionally ``rater`` and ``probability`` (any order after the
    first three). Several rows for one vertebra are allowed when they come from different raters or
    carry probabilities: together they form a soft target (each row weighs its probability, default
    1; :func:`spinelm.classification.soft_targets` normalises). ``names`` (dataset.json ``classes``: ``{"0": "normal", ...}``)
    turns class codes into names. A missing row means the class is unknown.
    """
    out: dict[str, list[tuple[int, str, float]]] = defaultdict(list)
    if not path.is_file():
        return out
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        problems.append(Problem("error", str(path), f"unreadable CSV ({exc})", "save it as UTF-8 CSV"))
        return out
    if not rows:
        return out
    header = [h.strip().lower() for h in rows[0]]
    if header[:3] != ["case", "label", "class"]:
        problems.append(Problem("error", str(path), f"expected the header 'case,label,class' (then optionally "
                                f"'rater' and/or 'probability'), found {','.join(rows[0])!r}",
                                "add the header line case,label,class"))
        return out
    extra = [h for h in header[3:] if h not in ("rater", "probability")]
    if extra:
        problems.append(Problem("error", str(path), f"unknown column(s) {', '.join(extra)}; expected case, label, "
                                f"class, then optionally rater and probability", "rename or delete the column(s)"))
        return out
    rater_col = header.index("rater") if "rater" in header else None
    prob_col = header.index("probability") if "probability" in header else None
    names = {str(k): str(v) for k, v in (names or {}).items()}
    seen: dict[tuple[str, int, str], int] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < len(header):
            problems.append(Problem("error", f"{path}:{n}", f"expected {len(header)} columns {','.join(header)}, "
                                    f"found {len(row)}", "complete or delete the row"))
            continue
        case, lab, cls = (c.strip() for c in row[:3])
        try:
            label = L.vertebra(lab).label
        except KeyError:
            problems.append(Problem("error", f"{path}:{n}", f"unknown vertebra {lab!r}; expected a VerSe label "
                                    f"1-{L.MAX_LABEL} or a name such as 'L1'", "fix the label column", case))
            continue
        if not cls:
            problems.append(Problem("error", f"{path}:{n}", f"empty class for case {case!r}, {L.name_of(label)}",
                                    "give a class or delete the row (a missing row means unknown)", case))
            continue
        cls = names.get(cls, cls)
        weight = 1.0
        if prob_col is not None and row[prob_col].strip():
            try:
                weight = float(row[prob_col])
            except ValueError:
                weight = float("nan")
            if not 0.0 <= weight <= 1.0:
                problems.append(Problem("error", f"{path}:{n}", f"probability {row[prob_col].strip()!r} is not a "
                                        f"number between 0 and 1", "fix the probability column", case))
                continue
        rater = row[rater_col].strip() if rater_col is not None else ""
        key = (case, label, rater if prob_col is None else f"{rater}\0{cls}")
        if key in seen:
            who = f" by rater {rater!r}" if rater else ""
            problems.append(Problem("error", f"{path}:{n}", f"conflicting rows for case {case!r}, "
                                    f"{L.name_of(label)}{who} (also row {seen[key]})",
                                    "keep one row per vertebra and rater (add a 'rater' or 'probability' column "
                                    "for several opinions)", case))
            continue
        seen[key] = n
        out[case].append((label, cls, weight))
    return out


def _ignore_value(djson: dict, root: Path, problems: list[Problem]) -> int | None:
    """The mask value of unannotated voxels: nnU-Net v2's ``"ignore"`` entry of dataset.json's ``labels``
    (partial masks). It must lie above every vertebra label."""
    labels = djson.get("labels") if isinstance(djson.get("labels"), dict) else {}
    if "ignore" not in labels:
        return None
    try:
        value = int(labels["ignore"])
    except (TypeError, ValueError):
        value = -1
    if value <= L.MAX_LABEL or value > 32767:
        problems.append(Problem("error", str(root / "dataset.json"), f"labels 'ignore' is {labels['ignore']!r}; "
                                f"expected an integer above every vertebra label ({L.MAX_LABEL})",
                                f"use e.g. \"ignore\": {L.MAX_LABEL + 1}"))
        return None
    return value


def discover_dataset(root: str | os.PathLike) -> Dataset:
    """Find the cases of a dataset folder (file names only; nothing is read but dataset.json and CSV).

    Raises:
        FileNotFoundError: the folder or its ``imagesTr`` does not exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    problems: list[Problem] = []
    djson: dict = {}
    if (root / "dataset.json").is_file():
        try:
            djson = read_json(root / "dataset.json")
            if not isinstance(djson, dict):
                raise ValueError(f"{root / 'dataset.json'}: expected a JSON object")
        except ValueError as exc:
            problems.append(Problem("error", str(root / "dataset.json"), str(exc).split(": ", 1)[-1],
                                    "fix the JSON or delete the file to let spinelm infer it"))
            djson = {}
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: folder not found; a dataset needs imagesTr/ with files "
                                f"CASE_0000.nii.gz (nnU-Net v2 raw layout)")
    by_case, endings = _scan_images(images_dir, problems)
    unl_dir = root / "imagesUnlabelled"
    by_case_u, endings_u = _scan_images(unl_dir, problems)
    channel_names = djson.get("channel_names") or djson.get("modality")
    if not channel_names:
        n_ch = max((max(ch) + 1 for ch in by_case.values() if ch), default=1)
        channel_names = {str(i): "unknown" for i in range(n_ch)}
    channel_names = {str(k): str(v) for k, v in channel_names.items()}
    all_endings = endings + endings_u
    file_ending = djson.get("file_ending") or (all_endings.most_common(1)[0][0] if all_endings else ".nii.gz")
    n_ch = len(channel_names)
    images = _cases_from(by_case, n_ch, problems, images_dir)
    unlabelled = _cases_from(by_case_u, n_ch, problems, unl_dir)
    masks = _find_by_case(root / "labelsTr", tuple(IMAGE_ENDINGS), problems, "mask")
    centroids = _find_by_case(root / "centroidsTr", CENTROID_SUFFIXES, problems, "centroid")
    scribbles = _find_by_case(root / "scribblesTr", tuple(IMAGE_ENDINGS), problems, "scribble")
    boxes = _find_by_case(root / "boxesTr", BOX_SUFFIXES, problems, "box")
    classes = _read_classes(root / "classesTr.csv", problems, djson.get("classes") if isinstance(djson.get("classes"), dict) else None)
    for case, path in masks.items():
        if case not in images and case not in by_case:
            problems.append(Problem("error", str(path), f"mask without image: no imagesTr/{case}_0000*",
                                    "add the image or remove the mask", case))
    for what, found in (("centroids", centroids), ("scribbles", scribbles), ("boxes", boxes)):
        for case, path in found.items():
            if case not in images and case not in by_case:
                problems.append(Problem("error", str(path), f"{what} without image: no imagesTr/{case}_0000*",
                                        "add the image or remove the file", case))
    for case, path in scribbles.items():
        if case in masks:
            problems.append(Problem("error", str(path), f"case {case!r} has both a mask (labelsTr) and scribbles; "
                                    "a case has one voxel annotation", "keep one of them", case))
    for case in classes:
        if case not in images:
            problems.append(Problem("error", str(root / "classesTr.csv"), f"classes for case {case!r}, which "
                                    f"has no image in imagesTr", "fix the case name", case))
    for case in set(images) & set(unlabelled):
        problems.append(Problem("error", str(unl_dir / f"{case}_0000{file_ending}"), f"duplicated case: "
                                f"{case!r} is in both imagesTr and imagesUnlabelled", "rename one of them", case))
    ignore_value = _ignore_value(djson, root, problems)
    if scribbles and ignore_value is None:
        problems.append(Problem("error", str(root / "dataset.json"), "scribblesTr/ needs an 'ignore' label in "
                                "dataset.json: the value of the voxels that carry no stroke",
                                f'add "ignore": {DEFAULT_IGNORE_VALUE} to "labels" and use it in the scribble files'))
    cases = []
    for case, imgs in images.items():
        c = Case(case, imgs, masks.get(case), centroids.get(case), tuple(classes.get(case, ())), ignore_value,
                 scribbles.get(case), boxes.get(case))
        if not c.annotated:
            problems.append(Problem("error", str(imgs[0]), f"case {case!r} has no annotation: no mask (labelsTr/"
                                    f"{case}{file_ending}), centroids (centroidsTr/{case}.json), scribbles "
                                    f"(scribblesTr/) or boxes (boxesTr/{case}.json)",
                                    "add an annotation or move the image to imagesUnlabelled/", case))
        cases.append(c)
    if not cases:
        problems.append(Problem("error", str(images_dir), "no training images found (expected "
                                "CASE_0000.nii.gz files)", "add images in the nnU-Net v2 raw layout"))
    unl = tuple(Case(case, imgs) for case, imgs in unlabelled.items())
    splits = _read_splits(root / "splits.json", set(images), problems)
    return Dataset(root, channel_names, file_ending, tuple(cases), unl, djson, tuple(problems), splits)


def _read_splits(path: Path, cases: set[str], problems: list[Problem]) -> tuple:
    """The folds a dataset fixes (``splits.json``: ``[{"train": [...], "val": [...]}, ...]``, nnU-Net's
    ``splits_final.json`` format), checked against its cases."""
    if not path.is_file():
        return ()
    fix = 'write [{"train": ["case", ...], "val": ["case", ...]}, ...] or delete the file'
    try:
        splits = read_json(path)
    except ValueError as exc:
        problems.append(Problem("error", str(path), f"not valid JSON ({exc})", fix))
        return ()
    if not isinstance(splits, list) or not splits or not all(
            isinstance(f, dict) and isinstance(f.get("train"), list) and isinstance(f.get("val"), list)
            and f["train"] and f["val"] for f in splits):
        problems.append(Problem("error", str(path), "expected a list of folds, each with non-empty 'train' and "
                                "'val' lists of case names", fix))
        return ()
    for i, f in enumerate(splits):
        unknown = sorted({str(c) for c in f["train"] + f["val"]} - cases)
        if unknown:
            problems.append(Problem("error", str(path), f"fold {i} names case(s) without an image in imagesTr: "
                                    f"{', '.join(unknown[:5])}", "fix the names or remove them"))
            return ()
        both = sorted(set(f["train"]) & set(f["val"]))
        if both:
            problems.append(Problem("error", str(path), f"fold {i} trains and validates on the same case(s): "
                                    f"{', '.join(both[:5])}", "keep each case in one list"))
            return ()
    missing = sorted(cases - {c for f in splits for c in f["train"] + f["val"]})
    if missing:
        problems.append(Problem("warning", str(path), f"{len(missing)} case(s) in no fold (e.g. {missing[0]}); "
                                "they are not used", "add them to a fold"))
    return tuple({"train": sorted(map(str, f["train"])), "val": sorted(map(str, f["val"]))} for f in splits)


@dataclass
class LoadedCase:
    """A case read into memory in the canonical orientation (NumPy axis 0 cranio-caudal).

    Attributes:
        image: (C, z, y, x) float32.
        mask: (z, y, x) int16 mask, or None.
        geometry: canonical geometry shared by all channels and the mask.
        landmarks: centroids in world LPS mm (from the centroid file, else from the mask).
        landmarks_from_mask: True when the centroids were derived from the mask.
        scribbles: (z, y, x) int16 strokes (``scribblesTr/``), or None.
        boxes: the case's vertebra boxes (``boxesTr/``), world LPS mm.
    """

    case_id: str
    image: np.ndarray
    mask: np.ndarray | None
    geometry: Geometry
    landmarks: list[Landmark]
    landmarks_from_mask: bool
    scribbles: np.ndarray | None = None
    boxes: tuple = ()

    def training_mask(self, ignore_value: int | None) -> np.ndarray | None:
        """The voxel target training learns from: the mask; else the scribbles; else a mask derived from
        the boxes (:func:`spinelm.io.boxes.rasterize_boxes`); None for a centroid-only case."""
        if self.mask is not None:
            return self.mask
        if self.scribbles is not None:
            return self.scribbles
        if self.boxes:
            from spinelm.io.boxes import rasterize_boxes

            return rasterize_boxes(list(self.boxes), self.geometry,
                                   DEFAULT_IGNORE_VALUE if ignore_value is None else ignore_value)
        return None


def read_case_landmarks(case: Case, geometry: Geometry | None = None) -> list[Landmark]:
    """Centroids of a case from its centroid file (world LPS mm), or [] when it has none.

    ``geometry`` is the geometry of the case's first image as stored (needed for VerSe files);
    it is read from the header when not given.
    """
    if case.centroids is None:
        return []
    if geometry is None:
        geometry = read_geometry(case.images[0])
    return read_landmarks(case.centroids, geometry)


def ground_truth_landmarks(case: Case, mask: np.ndarray | None = None,
                           geometry: Geometry | None = None) -> tuple[list[Landmark], bool]:
    """A case's annotated centroids: from its centroid file, else the centres of its mask's labels
    (``mask``/``geometry`` when already read, else read from ``case.mask``). Boxes and scribbles give
    none: a box's centre can lie 25 mm from the centroid (a thoracic spinous process), and the mean of
    a stroke is not a centroid.

    Returns ``(landmarks in world LPS mm, derived_from_mask)``; ``([], False)`` without either.
    """
    if case.centroids is not None:
        return read_case_landmarks(case), False
    if mask is None and case.mask is not None:
        mask, geometry = load_volume(case.mask, dtype=None)
    if mask is not None:
        return centroids_from_mask(mask, geometry), True
    return [], False


def load_case(case: Case, canonical: bool = True) -> LoadedCase:
    """Read a case's channels, mask and centroids.

    Raises:
        FileNotFoundError / ImageReadError / ValueError: naming the file (run ``spinelm validate`` first
        to see all problems at once).
    """
    if canonical:
        image, geom, _ = read_scan(list(case.images))
    else:
        channels = [load_volume(p)[0] for p in case.images]
        image, geom = np.stack(channels), load_volume(case.images[0])[1]
    mask = None
    if case.mask is not None:
        mask, gm = load_volume(case.mask, canonical=canonical, dtype=None)
        if not gm.same_as(geom):
            raise ValueError(f"{case.mask}: mask geometry differs from its image ({'; '.join(gm.differences(geom))})")
        mask = np.rint(mask).astype(np.int16) if mask.dtype.kind == "f" else mask.astype(np.int16)
    scribbles = None
    if case.scribbles is not None:
        scribbles, gs = load_volume(case.scribbles, canonical=canonical, dtype=None)
        if not gs.same_as(geom):
            raise ValueError(f"{case.scribbles}: scribble geometry differs from its image "
                             f"({'; '.join(gs.differences(geom))})")
        scribbles = np.rint(scribbles).astype(np.int16) if scribbles.dtype.kind == "f" else scribbles.astype(np.int16)
    boxes = ()
    if case.boxes is not None:
        from spinelm.io.boxes import read_boxes

        boxes = tuple(read_boxes(case.boxes))
    lms, derived = ground_truth_landmarks(case, mask, geom)
    return LoadedCase(case.case_id, image, mask, geom, lms, derived, scribbles, boxes)
