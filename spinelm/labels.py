"""The vertebra label table (VerSe convention): the only place that knows label numbers.

Voxel values and centroid labels follow VerSe: 1-7 C1-C7, 8-19 T1-T12, 20-24 L1-L5, 25 L6,
26 sacrum (S1), 27 coccyx, 28 T13; 0 is background. T13 and L6 are transitional variants: in a
spine that has them, T13 follows T12 and precedes L1, L6 follows L5 and precedes the sacrum.

Everything else in spinelm refers to vertebrae through this module (``label_of('L1')``,
``name_of(20)``, ``cranio_caudal_rank``, ``successors``), never through bare numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

BACKGROUND = 0


@dataclass(frozen=True)
class Vertebra:
    """One entry of the label table.

    Attributes:
        label: VerSe voxel value.
        name: Anatomical name (``"L1"``).
        region: ``"cervical"``, ``"thoracic"``, ``"lumbar"``, ``"sacral"`` or ``"coccygeal"``.
        rank: Cranio-caudal position (0 = C1); transitional variants slot in between.
        transitional: True for T13 and L6, which only some spines have.
    """

    label: int
    name: str
    region: str
    rank: int
    transitional: bool = False


def _build_table() -> tuple[Vertebra, ...]:
    rows: list[tuple[int, str, str, bool]] = []
    rows += [(i, f"C{i}", "cervical", False) for i in range(1, 8)]
    rows += [(7 + i, f"T{i}", "thoracic", False) for i in range(1, 13)]
    rows += [(28, "T13", "thoracic", True)]
    rows += [(19 + i, f"L{i}", "lumbar", False) for i in range(1, 6)]
    rows += [(25, "L6", "lumbar", True)]
    rows += [(26, "S1", "sacral", False), (27, "Cocc", "coccygeal", False)]
    return tuple(Vertebra(label, name, region, rank, trans)
                 for rank, (label, name, region, trans) in enumerate(rows))


#: All vertebrae in cranio-caudal order (T13 between T12 and L1, L6 between L5 and S1).
VERTEBRAE: tuple[Vertebra, ...] = _build_table()
_BY_LABEL = {v.label: v for v in VERTEBRAE}
_BY_NAME = {v.name.upper(): v for v in VERTEBRAE}
_ALIASES = {"SACRUM": 26, "S": 26, "COCCYX": 27, "CO": 27}

#: All valid foreground labels, ascending by number.
VALID_LABELS: tuple[int, ...] = tuple(sorted(_BY_LABEL))
#: Highest label value of the convention.
MAX_LABEL = max(VALID_LABELS)


def vertebra(label_or_name: int | str) -> Vertebra:
    """Look a vertebra up by VerSe label or by name (case-insensitive: ``"l1"``, ``"sacrum"``).

    Raises:
        KeyError: with the valid choices when the label or name is unknown.
    """
    if isinstance(label_or_name, str):
        key = label_or_name.strip().upper()
        if key.isdigit():
            return vertebra(int(key))
        if key in _BY_NAME:
            return _BY_NAME[key]
        if key in _ALIASES:
            return _BY_LABEL[_ALIASES[key]]
        close = [v.name for v in VERTEBRAE if v.name.upper().startswith(key[:1])]
        raise KeyError(f"unknown vertebra name {label_or_name!r}; did you mean one of {close}?")
    label = int(label_or_name)
    if label not in _BY_LABEL:
        raise KeyError(f"unknown vertebra label {label_or_name!r}; valid labels are 1-{MAX_LABEL} "
                       f"(VerSe convention)")
    return _BY_LABEL[label]


def is_valid_label(label: int) -> bool:
    """True for a foreground label of the convention."""
    return int(label) in _BY_LABEL


def name_of(label: int) -> str:
    """Name of a VerSe label (``20 -> "L1"``)."""
    return vertebra(label).name


def label_of(name: str) -> int:
    """VerSe label of a vertebra name (``"L1" -> 20``)."""
    return vertebra(name).label


def cranio_caudal_rank(label: int) -> int:
    """Position of a label from head to tail (C1 = 0); T13 sorts between T12 and L1."""
    return vertebra(label).rank


def level_coordinate(label: int) -> float:
    """Position of a vertebra counted in regular vertebrae (C1 = 0, T12 = 18, L1 = 19, S1 = 24);
    the transitional T13 and L6 sit halfway between their neighbours (18.5, 23.5), coccyx 25.

    An ordinal coordinate in which neighbours are one apart: the case checks compare the expected
    level of the candidates with their height, and the confidence compares a run with itself
    shifted by one level.
    """
    v = vertebra(label)
    regular = [x for x in VERTEBRAE if not x.transitional]
    if v.transitional:
        before = max(i for i, x in enumerate(regular) if x.rank < v.rank)
        return before + 0.5
    return float(regular.index(v))


def sort_cranio_caudal(labels: Iterable[int]) -> list[int]:
    """Labels sorted from head to tail."""
    return sorted((int(x) for x in labels), key=cranio_caudal_rank)


def successors(label: int) -> tuple[int, ...]:
    """Labels that may directly follow ``label`` in a spine, caudally.

    The regular successor always; in addition T12 may be followed by T13 and L5 by L6, the
    transitional variants. T13 is followed by L1 and L6 by the sacrum. The coccyx has none.
    """
    v = vertebra(label)
    regular = [w for w in VERTEBRAE if not w.transitional and w.rank > v.rank]
    out: list[int] = []
    if regular:
        out.append(regular[0].label)
    nxt = [w for w in VERTEBRAE if w.rank == v.rank + 1]
    if nxt and nxt[0].transitional:
        out.append(nxt[0].label)
    return tuple(out)


def predecessors(label: int) -> tuple[int, ...]:
    """Labels that may directly precede ``label`` (inverse of :func:`successors`)."""
    return tuple(v.label for v in VERTEBRAE if int(label) in successors(v.label))


def regular_sequence(first: int, last: int) -> list[int]:
    """Non-transitional labels from ``first`` to ``last`` inclusive, cranio-caudally."""
    lo, hi = cranio_caudal_rank(first), cranio_caudal_rank(last)
    return [v.label for v in VERTEBRAE
            if lo <= v.rank <= hi and (not v.transitional or v.label in (first, last))]


def region_of(label: int) -> str:
    """Anatomical region of a label."""
    return vertebra(label).region


def label_names(labels: Iterable[int]) -> list[str]:
    """Names of several labels, in the order given."""
    return [name_of(x) for x in labels]


# ------------------------------------------------------------------------------ auxiliary structures

#: Offsets of the TPTBox convention: a disc carries 100 + the label of the vertebra above it, an
#: endplate 200 + the label of its vertebra.
DISC_OFFSET = 100
ENDPLATE_OFFSET = 200
#: Other structures a mask may carry (TPTBox sub-region values).
CORD = 60
CANAL = 61
#: Auxiliary structures in a fixed order: what the structures head segments when masks carry them.
STRUCTURES = ("disc", "endplate", "canal", "cord")


def structure_of(value: int) -> str | None:
    """The auxiliary structure a mask value stands for (``"disc"`` for 101-128, ``"endplate"`` for
    201-228, ``"canal"`` 61, ``"cord"`` 60), or None (a vertebra, background, or unknown)."""
    value = int(value)
    if value - DISC_OFFSET in _BY_LABEL:
        return "disc"
    if value - ENDPLATE_OFFSET in _BY_LABEL:
        return "endplate"
    return {CANAL: "canal", CORD: "cord"}.get(value)
