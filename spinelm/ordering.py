"""Anatomical ordering: the most probable valid vertebra sequence for a set of heatmap candidates.

A pure function of candidates (positions in mm, peak scores, label probabilities) and a
:class:`SpineModel` (distance statistics between consecutive vertebrae, priors for gaps and
transitional vertebrae). No SimpleITK and no torch here.

The model, solved exactly by dynamic programming (Viterbi over candidates sorted head to foot):

- every candidate is either *kept* with a label or *dropped* as a false positive; kept labels are
  strictly ordered cranio-caudally and every label is used at most once;
- keeping candidate ``i`` as label ``l`` scores ``log q_i + w log p_i(l)`` (``p`` mixed with a
  uniform share ``LABEL_NOISE``, a robust likelihood) and dropping it
  ``log(1 - q_i) + w log(1/K)`` (no label evidence among ``K`` labels), with ``w`` the weight of the
  label evidence (:attr:`SpineModel.label_weight`, 1 unless fitted, :func:`fit_label_weight`), label probability
  ``p`` and ``q_i = 0.5 + s_i`` (within ``KEEP_RANGE``) the probability that a peak of score
  ``s_i`` is a vertebra: a peak that passed the detection threshold usually is one (on real MR
  validation folds about 80 % of them were), and one of half the target's height almost always
  is (over 90 % of the peaks scoring 0.45 or more on held-out phantoms, for each of three 8-minute
  demo models), even when the segmentation head has not learned its label yet;
- between two consecutive kept candidates labelled ``a`` and ``b`` the transition scores the
  anatomical path from ``a`` to ``b``: each skipped regular vertebra costs ``log GAP_PRIOR`` (a
  missed detection or a missing vertebra), each transitional vertebra (T13, L6) on the path costs
  its prior (counted from the training labels, at least ``VARIANT_PRIOR``) and each one passed over
  one minus it; the observed distance
  between the two candidates is compared with the sum of the expected distances along the path
  (a Gaussian log-likelihood capped at ``MAX_DISTANCE_PENALTY``, whose spread combines the
  fingerprint's spread, at least ``MIN_RELATIVE_STD``, with the localisation noise of the peaks),
  and a step more than 60 degrees away from the cranio-caudal axis costs that maximum too;
- the step's direction in the patient frame (world LPS) is evidence too (:func:`tilt_evidence`): its
  sagittal and coronal tilt against the tilt the training labels show for that anatomical path (the
  sagittal profile: cervical lordosis, thoracic kyphosis, lumbar lordosis), a Gaussian
  log-likelihood centred on its expectation (a step as expected scores 0 on average, so it does not
  make keeping a candidate cheaper), at least ``-MAX_DIRECTION_EVIDENCE``. Distances alone
  cannot place a run whose neither end is in view (every thoracic step looks alike up to a person's
  size); the tilt changes from level to level. Pairs seen in fewer than ``MIN_DIRECTION_CASES``
  training cases, and models planned without the offsets, give no such evidence;
- the sequence may start and end anywhere (partial fields of view), with the log-probability of
  its first and last label as seen in the training data (``labels_per_case`` of the fingerprint,
  add-``FOV_PRIOR_PSEUDOCOUNT`` smoothed, so other fields of view stay possible): a lumbar protocol
  whose annotations always end at L5 makes "the lowest vertebra found is L5" the default reading,
  which the image evidence can still overrule.

The distance and direction statistics come from the dataset fingerprint
(``plans["spine"]["consecutive_pairs"]``: ``distance_mm_*`` and ``offset_mm_*``); distances fall back,
for pairs never seen in training, to a typical adult profile scaled to the pairs that were seen.

The same model summed over every labelling instead of maximised (:func:`label_marginals`,
forward-backward) gives each kept label its posterior probability, which the per-vertebra
confidence uses (:mod:`spinelm.confidence`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import product

import numpy as np

from spinelm import labels as L

#: Peaks closer than this fraction of the median neighbour distance are one vertebra.
NMS_FRACTION = 0.6
#: Probability floor inside the log, for labels the model never gives.
LOG_FLOOR = 1e-3
#: Prior probability that a vertebra between two detected ones has no detection of its own.
GAP_PRIOR = 0.1
#: Prior probability of each transitional vertebra (T13, L6) when the training labels say nothing
#: more (see :func:`variant_prior_from_counts`).
VARIANT_PRIOR = 0.05
#: Weight of the default prior, in cases, against the training labels' count.
VARIANT_PRIOR_PSEUDOCOUNT = 10.0
#: Largest prior of a transitional vertebra counted from training labels.
MAX_VARIANT_PRIOR = 0.5
#: Smallest relative spread of an expected distance.
MIN_RELATIVE_STD = 0.12
#: Localisation noise of a candidate, relative to the expected distance: it widens every distance
#: model (peaks can sit off the vertebral body centre, e.g. by a few mm in the AP direction).
LOCALISATION_RELATIVE_STD = 0.15
#: Largest penalty of a distance mismatch (a robust likelihood): an implausible distance costs at
#: most this, so one badly placed peak cannot throw the whole labelling away.
MAX_DISTANCE_PENALTY = 4.5
#: Pseudo-count of every label as first / last vertebra of a run (smoothing of the field-of-view
#: prior): a prior estimated from a couple of dozen training cases stays a mild preference.
FOV_PRIOR_PSEUDOCOUNT = 2.0
#: Consecutive vertebrae lie mostly along the cranio-caudal axis: a step whose cranio-caudal share
#: (cosine to that axis) is below this (more than 60 degrees off) gets ``MAX_DISTANCE_PENALTY``.
#: Two peaks side by side at one level are not two vertebrae.
MIN_CRANIO_CAUDAL_COSINE = 0.5
#: Share of the label evidence treated as uninformative: a candidate's label probabilities enter as
#: ``(1 - LABEL_NOISE) * p + LABEL_NOISE / K``. A segmentation head early in training (or on an
#: unfamiliar scan) can be confidently wrong, e.g. near zero for every thoracic label; without the
#: mixture such a peak is cheaper to drop than to label, and correct detections disappear.
LABEL_NOISE = 0.25
#: Probabilities that a candidate is a vertebra are clipped into this range before taking logs.
KEEP_RANGE = (0.02, 0.98)

#: Direction evidence: a step between two kept candidates also points somewhere in the patient
#: frame. The training labels give, per pair of consecutive vertebrae, the mean and spread of the
#: step's tilt (sagittal: towards the back; coronal: towards the left) in world LPS; the sagittal
#: profile (cervical lordosis, thoracic kyphosis, lumbar lordosis) makes the tilt change with the
#: level, so a run's tilts tell where in the column it lies, also when neither end is in view.
#: A pair needs this many training cases before its tilt is used.
MIN_DIRECTION_CASES = 3
#: Smallest spread (radians) of a pair's tilt: a few training cases must not make a tilt exact.
MIN_DIRECTION_STD = 0.05
#: Largest cost (nats) of one step's direction.
MAX_DIRECTION_EVIDENCE = 3.0

#: Weights of the label evidence tried by :func:`fit_label_weight`, most trusting first (1: the
#: network's label probabilities as they are; 0.5: their square root). Never below a quarter: with
#: five validation scans the likelihood is nearly flat below it and a weaker label evidence lets the
#: geometry alone place cervical runs in the thorax (measured on whole-spine phantoms, README).
LABEL_WEIGHTS = (1.0, 0.7, 0.5, 0.35, 0.25)
#: Probability floor of the posterior in :func:`truth_log_likelihood` (one unforeseen truth costs at
#: most ``-log`` of it).
TRUTH_FLOOR = 1e-4

#: Typical centre-to-centre distance (mm) from each regular vertebra to the next one in adults,
#: keyed by the cranial vertebra's name. Only the shape of this profile matters: it is rescaled to
#: the dataset's own distances (see :meth:`SpineModel.from_stats`).
TYPICAL_DISTANCE_MM = {
    "C1": 15.0, "C2": 17.0, "C3": 15.0, "C4": 15.0, "C5": 15.0, "C6": 15.5, "C7": 17.0,
    "T1": 19.0, "T2": 20.0, "T3": 20.5, "T4": 21.0, "T5": 22.0, "T6": 23.0, "T7": 24.0, "T8": 25.0,
    "T9": 26.0, "T10": 27.0, "T11": 28.5, "T12": 31.0, "T13": 31.0,
    "L1": 32.0, "L2": 33.5, "L3": 34.5, "L4": 34.5, "L5": 36.0, "L6": 36.0, "S1": 45.0,
}


def variant_prior_from_counts(seen: int, visible: int) -> float:
    """Prior of a transitional vertebra from the training labels: ``seen`` cases hold it among
    ``visible`` cases that show the place where it would be (T12 and L1 for T13, L5 and S1 for L6).

    The rate shrunk towards the default, ``(seen + a * VARIANT_PRIOR) / (visible + a)`` with ``a =``
    :data:`VARIANT_PRIOR_PSEUDOCOUNT`, never below :data:`VARIANT_PRIOR` (a dataset
    whose annotations never name the variant, e.g. a protocol that labels L1-L5 only, is no evidence
    that its scans lack it) and at most :data:`MAX_VARIANT_PRIOR`. Lumbosacral transitional
    vertebrae are common (reported in roughly 4-30 % of people, by definition), and a dataset that
    holds them more often than the default should make the ordering expect them as often: on
    classification phantoms with an L6 in 4 of 40 training cases, labelling held-out cases with 0.08
    or 0.15 instead of 0.05 raised identification from 0.903 to 0.925 (``scripts/variant_prior.py``).
    """
    if visible <= 0:
        return VARIANT_PRIOR
    a = VARIANT_PRIOR_PSEUDOCOUNT
    return float(min(max((seen + a * VARIANT_PRIOR) / (visible + a), VARIANT_PRIOR), MAX_VARIANT_PRIOR))


def regular_labels() -> list[int]:
    """The regular cranio-caudal sequence C1..S1 (no transitional variants, no coccyx)."""
    return [v.label for v in L.VERTEBRAE if not v.transitional and v.label != L.label_of("Cocc")]


def sequence_labels() -> list[int]:
    """Every label the ordering may assign, cranio-caudally: C1..S1 with T13 and L6."""
    return [v.label for v in L.VERTEBRAE if v.label != L.label_of("Cocc")]


def label_range(allowed: list[int] | None) -> list[int]:
    """Labels (with variants) within the cranio-caudal span of ``allowed`` (default: all)."""
    seq = sequence_labels()
    if not allowed:
        return seq
    ranks = [L.cranio_caudal_rank(a) for a in allowed]
    lo, hi = min(ranks), max(ranks)
    return [lab for lab in seq if lo <= L.cranio_caudal_rank(lab) <= hi]


def suppress_duplicates(positions_mm: np.ndarray, scores: np.ndarray, min_distance_mm: float) -> list[int]:
    """Indices kept by greedy non-maximum suppression (highest score first)."""
    order = np.argsort(-np.asarray(scores))
    kept: list[int] = []
    for i in order:
        if all(np.linalg.norm(positions_mm[i] - positions_mm[j]) >= min_distance_mm for j in kept):
            kept.append(int(i))
    return kept


def _next_in_sequence(label: int) -> int | None:
    """The next label of :func:`sequence_labels` (variants included), or None after S1."""
    seq = sequence_labels()
    i = seq.index(label)
    return seq[i + 1] if i + 1 < len(seq) else None


@dataclass
class SpineModel:
    """Expected distances between consecutive vertebrae and the priors of the ordering model.

    Attributes:
        step_mean: ``{label: mm}``, expected distance from a vertebra to the next one of
            :func:`sequence_labels` (for T12 that is T13; the direct T12->L1 step is
            ``skip_mean[T12]``).
        step_std: spreads of the same steps.
        pair_offsets: the step vectors of consecutive pairs in world LPS, mean and spread (the
            direction evidence, :func:`tilt_evidence`).
        skip_mean / skip_std: for T12 and L5, the distance to the vertebra after the variant
            (L1, S1) when the variant is absent.
        variant_prior: prior of a transitional vertebra the data said nothing about.
        variant_priors: ``{label: prior}`` of T13 / L6 counted in the training labels
            (:func:`variant_prior_from_counts`).
    """

    step_mean: dict[int, float]
    step_std: dict[int, float]
    skip_mean: dict[int, float] = field(default_factory=dict)
    skip_std: dict[int, float] = field(default_factory=dict)
    gap_prior: float = GAP_PRIOR
    variant_prior: float = VARIANT_PRIOR
    variant_priors: dict[int, float] = field(default_factory=dict)
    first_counts: dict[int, int] = field(default_factory=dict)
    last_counts: dict[int, int] = field(default_factory=dict)
    #: ``{(a, b): (mean offset (3,), std (3,))}`` in world LPS mm of consecutive pairs seen in at
    #: least :data:`MIN_DIRECTION_CASES` training cases (the direction evidence; empty: none)
    pair_offsets: dict = field(default_factory=dict)
    #: Weight of the network's label evidence against the geometry: an exponent on the label
    #: probabilities (1: as they are; fitted on the validation cases by :func:`fit_label_weight`)
    label_weight: float = 1.0
    #: :meth:`transition_tables` by label span and priors (the distance statistics are fixed once used)
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def weighted(self, label_weight: float) -> "SpineModel":
        """This model with another weight of the label evidence; the transition tables do not depend on
        the weight, so the copy shares their cache (``dataclasses.replace`` would start an empty one)."""
        if float(label_weight) == self.label_weight:
            return self
        out = replace(self, label_weight=float(label_weight))
        out._tables = self._tables
        return out

    def prior_of(self, variant: int) -> float:
        """Prior probability of the transitional vertebra ``variant`` (T13 or L6)."""
        return float(self.variant_priors.get(variant, self.variant_prior))

    def fov_log_prior(self, labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Log-probabilities of each label being the first / last of a run (uniform without data)."""
        out = []
        for counts in (self.first_counts, self.last_counts):
            c = np.array([counts.get(lab, 0) for lab in labels], dtype=np.float64) + FOV_PRIOR_PSEUDOCOUNT
            out.append(np.log(c / c.sum()) + np.log(len(labels)))  # relative to uniform: 0 when flat
        return out[0], out[1]

    @classmethod
    def from_stats(cls, spine: dict | None = None, default_distance_mm: float | None = None) -> "SpineModel":
        """Build from the plan's spine statistics, else from the typical profile.

        ``spine`` is ``plans["spine"]`` (or a fingerprint's ``spine``): ``consecutive_pairs`` give the
        distances, ``first_label_counts`` / ``last_label_counts`` (``{name: count}``) the
        field-of-view prior, ``variant_counts`` (``{name: {"seen", "visible"}}``) the priors of the
        transitional vertebrae (:func:`variant_prior_from_counts`).

        Pairs seen in the data use their measured mean and spread. The others use
        :data:`TYPICAL_DISTANCE_MM` scaled by the median ratio measured/typical over the seen pairs
        (or so that the profile's median equals ``default_distance_mm`` when nothing was seen).
        """
        pairs = (spine or {}).get("consecutive_pairs", {}) or {}
        measured: dict[tuple[int, int], tuple[float, float]] = {}
        for p in pairs.values():
            measured[(int(p["from"]), int(p["to"]))] = (float(p["distance_mm_mean"]), float(p.get("distance_mm_std", 0)))
        typical = {L.label_of(k): v for k, v in TYPICAL_DISTANCE_MM.items()}
        ratios = [m / typical[a] for (a, b), (m, _) in measured.items() if a in typical]
        if ratios:
            scale = float(np.median(ratios))
        elif default_distance_mm:
            scale = float(default_distance_mm) / float(np.median(list(typical.values())))
        else:
            scale = 1.0

        def stat(a: int, b: int, fallback: float) -> tuple[float, float]:
            if (a, b) in measured:
                m, s = measured[(a, b)]
                return m, max(s, MIN_RELATIVE_STD * m)
            m = fallback * scale
            return m, MIN_RELATIVE_STD * m

        mean, std, skip_m, skip_s = {}, {}, {}, {}
        for lab in sequence_labels():
            nxt = _next_in_sequence(lab)
            if nxt is None:
                continue
            mean[lab], std[lab] = stat(lab, nxt, typical[lab])
            if L.vertebra(nxt).transitional:  # T12 -> L1 and L5 -> S1 without the variant
                after = _next_in_sequence(nxt)
                skip_m[lab], skip_s[lab] = stat(lab, after, typical[lab])
        first = {L.label_of(k): int(v) for k, v in ((spine or {}).get("first_label_counts") or {}).items()}
        last = {L.label_of(k): int(v) for k, v in ((spine or {}).get("last_label_counts") or {}).items()}
        variants = {L.label_of(k): variant_prior_from_counts(int(v.get("seen", 0)), int(v.get("visible", 0)))
                    for k, v in ((spine or {}).get("variant_counts") or {}).items()}
        offsets = {}
        for p in pairs.values():
            if int(p.get("n", 0)) >= MIN_DIRECTION_CASES and p.get("offset_mm_mean") is not None:
                m, sd = np.asarray(p["offset_mm_mean"], float), np.asarray(p.get("offset_mm_std", [0, 0, 0]), float)
                if m.shape == (3,) and sd.shape == (3,) and m[2] < 0:
                    offsets[(int(p["from"]), int(p["to"]))] = (m, sd)
        return cls(mean, std, skip_m, skip_s, variant_priors=variants, first_counts=first, last_counts=last,
                   pair_offsets=offsets)

    def paths(self, a: int, b: int) -> list[tuple]:
        """Every anatomical path from ``a`` down to ``b``: ``(mean mm, std mm, log prior, tilt)``, with
        ``tilt`` the ``(mean (2,), std (2,))`` of the path's sagittal and coronal tilt in radians
        (:func:`_tilt_of`), or None when a step of it has no measured offset.

        The prior counts skipped regular vertebrae (gaps) and transitional vertebrae taken or
        passed over strictly after ``a`` up to and including ``b``. Empty when ``b`` is not caudal
        to ``a``.
        """
        seq = sequence_labels()
        ia, ib = seq.index(a), seq.index(b)
        if ib <= ia:
            return []
        between = seq[ia + 1:ib]
        variants = [v for v in between if L.vertebra(v).transitional]
        out = []
        for choice in product((False, True), repeat=len(variants)):
            included = {v for v, c in zip(variants, choice) if c}
            nodes = [a] + [v for v in between if not L.vertebra(v).transitional or v in included] + [b]
            m = var = 0.0
            vec, vec_var = np.zeros(3), np.zeros(3)
            for x, y in zip(nodes[:-1], nodes[1:]):
                if vec is not None and (x, y) in self.pair_offsets:
                    om, osd = self.pair_offsets[(x, y)]
                    vec, vec_var = vec + om, vec_var + osd ** 2
                else:
                    vec = None
                if _next_in_sequence(x) == y:
                    m, var = m + self.step_mean[x], var + self.step_std[x] ** 2
                else:  # x -> y passes over a variant that is absent
                    m, var = m + self.skip_mean[x], var + self.skip_std[x] ** 2
            n_gaps = len(nodes) - 2
            logp = n_gaps * np.log(self.gap_prior)
            for v in variants:
                logp += np.log(self.prior_of(v)) if v in included else np.log(1 - self.prior_of(v))
            if L.vertebra(b).transitional:
                logp += np.log(self.prior_of(b))
            tilt = _tilt_of(vec, np.sqrt(vec_var), len(nodes) - 1) if vec is not None else None
            out.append((m, float(np.sqrt(var + (LOCALISATION_RELATIVE_STD * m) ** 2)), float(logp), tilt))
        return out

    def transition_tables(self, labels: list[int]) -> tuple[np.ndarray, ...]:
        """``(mean, std, log prior, tilt mean, tilt std)`` over the paths between labels: arrays of
        shape (P, K, K), the tilts (P, K, K, 2) (NaN where a path has no measured direction).

        Entries without a path have log prior ``-inf``. Built once per label span and priors: every
        ordering of a scan (the labelling, its posteriors, the turned-over comparison) reuses them.
        """
        key = (tuple(labels), self.gap_prior, self.variant_prior, tuple(sorted(self.variant_priors.items())))
        if key not in self._tables:
            self._tables[key] = self._build_tables(labels)
        return self._tables[key]

    def _build_tables(self, labels: list[int]) -> tuple[np.ndarray, ...]:
        k = len(labels)
        table = {}
        for i, a in enumerate(labels):
            for j, b in enumerate(labels):
                table[i, j] = self.paths(a, b)
        n_paths = max([len(v) for v in table.values()] + [1])
        mean = np.ones((n_paths, k, k))
        std = np.ones((n_paths, k, k))
        prior = np.full((n_paths, k, k), -np.inf)
        tilt_mean = np.full((n_paths, k, k, 2), np.nan)
        tilt_std = np.full((n_paths, k, k, 2), np.nan)
        for (i, j), ps in table.items():
            for p, (m, s, lp, tilt) in enumerate(ps):
                mean[p, i, j], std[p, i, j], prior[p, i, j] = m, s, lp
                if tilt is not None:
                    tilt_mean[p, i, j], tilt_std[p, i, j] = tilt
        return mean, std, prior, tilt_mean, tilt_std


def _tilt_of(offset_mm: np.ndarray, std_mm: np.ndarray, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Sagittal and coronal tilt (radians) of a head-to-foot step vector in world LPS (``offset_mm``:
    caudal minus cranial, ``-z`` mostly) and their spreads: the step's own spread (``std_mm`` across
    the step, over its length, at least :data:`MIN_DIRECTION_STD`) and the localisation noise of two
    peaks (the share of :data:`LOCALISATION_RELATIVE_STD` of one step across each axis)."""
    m = np.asarray(offset_mm, float)
    length = max(float(np.linalg.norm(m)), 1e-3)
    down = max(-m[2], 1e-3)
    mean = np.array([np.arctan2(m[1], down), np.arctan2(m[0], down)])
    own = np.maximum(np.asarray(std_mm, float)[[1, 0]] / length, MIN_DIRECTION_STD)
    loc = LOCALISATION_RELATIVE_STD / np.sqrt(3.0) / max(n_steps, 1)
    return mean, np.sqrt(own ** 2 + loc ** 2)


def tilt_evidence(step_mm: np.ndarray, tilt_mean: np.ndarray, tilt_std: np.ndarray) -> np.ndarray:
    """Log-likelihood of a step's direction (``step_mm``, from the cranial candidate to the caudal
    one, world LPS) under each anatomical path (``tilt_mean`` / ``tilt_std`` (..., 2), radians),
    centred on its expectation under that path: ``sum(-(z ** 2 - 1) / 2)`` over the sagittal and
    coronal tilt. A step that tilts as the path expects scores 0 on average, so keeping a candidate
    is neither rewarded nor penalised by it (only a tilt that the path does not expect costs). 0 where
    a path has no measured tilt; at least -:data:`MAX_DIRECTION_EVIDENCE` (one badly placed peak
    cannot decide a labelling) and at most 1."""
    step = np.asarray(step_mm, float)
    down = -step[2]
    if down <= 0:
        return np.zeros(tilt_mean.shape[:-1])
    obs = np.array([np.arctan2(step[1], down), np.arctan2(step[0], down)])
    z2 = ((obs - tilt_mean) / tilt_std) ** 2
    ev = np.sum(-0.5 * (z2 - 1.0), axis=-1)
    return np.where(np.isfinite(ev), np.maximum(ev, -MAX_DIRECTION_EVIDENCE), 0.0)


def _step_scores(positions_mm: np.ndarray, model: SpineModel, labels: list[int], cc_axis: int) -> dict:
    """``{(a, i): (P, K, K)}``: for every pair of candidates ``a`` before ``i`` (sorted head to foot),
    each anatomical path's log prior, distance and direction terms, and the penalty of a step far off
    the head-foot axis. Computed once per ordering and reduced over the paths by :func:`_lattice` (the
    best path for the labelling, the sum for the posteriors)."""
    pos = np.asarray(positions_mm, dtype=np.float64).reshape(-1, 3)
    mean, std, prior, tilt_mean, tilt_std = model.transition_tables(labels)
    out = {}
    for i in range(len(pos)):
        for a in range(i):
            d = float(np.linalg.norm(pos[i] - pos[a]))
            score = prior - np.minimum(0.5 * ((d - mean) / std) ** 2, MAX_DISTANCE_PENALTY)
            if model.pair_offsets and cc_axis == 2:  # the statistics are in world LPS (head = +z)
                score = score + tilt_evidence(pos[i] - pos[a], tilt_mean, tilt_std)
            if abs(pos[i, cc_axis] - pos[a, cc_axis]) < MIN_CRANIO_CAUDAL_COSINE * d:
                score = score - MAX_DISTANCE_PENALTY
            out[a, i] = score
    return out


def _lattice(positions_mm: np.ndarray, scores, label_probs: list[dict[int, float]], model: SpineModel,
             allowed: list[int] | None, cc_axis: int, over_paths=np.max, steps: dict | None = None):
    """The ordering model's terms for candidates sorted head to foot (shared by :func:`viterbi_labels`
    and :func:`label_marginals`): ``(labels, emit (n, K), cum_drop (n + 1,), start (K,), last (K,),
    trans)``, where ``trans[a][i]`` (K, K) scores keeping ``a`` then ``i`` with nothing kept between,
    the anatomical paths combined by ``over_paths`` (the best one, or the sum over the hypotheses).
    ``steps``: :func:`_step_scores` of these candidates when the caller already has them."""
    n = len(label_probs)
    labels = label_range(allowed)
    k = len(labels)
    s = np.clip(0.5 + np.asarray(scores, dtype=np.float64), *KEEP_RANGE)
    probs = np.array([[max(p.get(lab, 0.0), LOG_FLOOR) for lab in labels] for p in label_probs])
    probs = (1 - LABEL_NOISE) * probs / probs.sum(1, keepdims=True) + LABEL_NOISE / k
    w = float(model.label_weight)
    emit = np.log(s)[:, None] + w * np.log(probs)  # (n, K)
    drop = np.log(1 - s) + w * np.log(1.0 / max(k, 2))  # (n,): no label evidence
    cum_drop = np.concatenate([[0.0], np.cumsum(drop)])  # drops of candidates [a, b) = cum[b] - cum[a]
    first_prior, last_prior = model.fov_log_prior(labels)
    start = first_prior + np.array([np.log(model.prior_of(lab)) if L.vertebra(lab).transitional else 0.0
                                    for lab in labels])
    if steps is None:
        steps = _step_scores(positions_mm, model, labels, cc_axis)
    trans: dict[int, dict[int, np.ndarray]] = {}
    for (a, i), score in steps.items():
        trans.setdefault(a, {})[i] = over_paths(score, axis=0)
    return labels, emit, cum_drop, start, last_prior, trans


def viterbi_labels(positions_mm: np.ndarray, scores, label_probs: list[dict[int, float]], model: SpineModel,
                   allowed: list[int] | None = None, cc_axis: int = 2, steps: dict | None = None) -> list[int | None]:
    """Labels for candidates already sorted head to foot; ``None`` for dropped candidates.

    Args:
        positions_mm: (n, 3) positions in mm (distances and the direction of steps are used).
        scores: peak scores in [0, 1].
        label_probs: per candidate ``{label: probability}``.
        model: distance statistics and priors.
        allowed: labels the model was trained on; assignments stay within their span (variants in
            that span included). Default: C1..S1.
        cc_axis: index of the cranio-caudal axis in ``positions_mm``.
    """
    n = len(label_probs)
    if n == 0:
        return []
    labels, emit, cum_drop, start, last_prior, trans = _lattice(positions_mm, scores, label_probs, model, allowed,
                                                                cc_axis, steps=steps)
    k = len(labels)
    best = np.full((n, k), -np.inf)
    back = np.full((n, k, 2), -1, dtype=np.int64)  # (previous candidate, previous label index)
    for i in range(n):
        best[i] = emit[i] + start + cum_drop[i]  # first kept candidate
        for a in range(i):
            cand = best[a][:, None] + trans[a][i] + (cum_drop[i] - cum_drop[a + 1])  # (K prev, K next)
            j = np.argmax(cand, axis=0)
            val = cand[j, np.arange(k)] + emit[i]
            better = val > best[i]
            best[i, better] = val[better]
            back[i, better, 0] = a
            back[i, better, 1] = j[better]
    final = best + (cum_drop[n] - cum_drop[1:])[:, None] + last_prior[None, :]
    out: list[int | None] = [None] * n
    if np.max(final) <= cum_drop[n]:  # dropping everything is at least as likely
        return out
    i, j = np.unravel_index(int(np.argmax(final)), final.shape)
    while i >= 0:
        out[i] = labels[j]
        i, j = back[i, j]
    return out


def _logsumexp(x: np.ndarray, axis=None) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return np.squeeze(out, axis=axis) if axis is not None else out.reshape(())


def label_marginals(positions_mm: np.ndarray, scores, label_probs: list[dict[int, float]], model: SpineModel,
                    allowed: list[int] | None = None, cc_axis: int = 2,
                    steps: dict | None = None) -> tuple[list[int], np.ndarray]:
    """The ordering model's posterior over every labelling of the candidates (sorted head to foot):
    ``(labels, P)`` with ``P[i, j]`` the probability that candidate ``i`` is kept as ``labels[j]``
    (``1 - P[i].sum()`` that it is dropped).

    The same model as :func:`viterbi_labels`, summed instead of maximised (forward-backward), and
    summed over the anatomical paths between two kept vertebrae: a run whose count cannot tell an
    extra transitional vertebra (T13, L6) from none splits its probability between the readings by
    the variant prior, so no label of such a run is more certain than the prior allows.
    """
    n = len(label_probs)
    if n == 0:
        return label_range(allowed), np.zeros((0, len(label_range(allowed))))
    labels, emit, cum_drop, start, last_prior, trans = _lattice(positions_mm, scores, label_probs, model, allowed,
                                                                cc_axis, over_paths=_logsumexp, steps=steps)
    k = len(labels)
    fwd = np.full((n, k), -np.inf)  # every labelling of candidates 0..i in which i is the last kept, as label j
    for i in range(n):
        terms = [np.broadcast_to(start + cum_drop[i], (1, k))]
        for a in range(i):
            terms.append(fwd[a][:, None] + trans[a][i] + (cum_drop[i] - cum_drop[a + 1]))
        fwd[i] = emit[i] + _logsumexp(np.concatenate(terms, axis=0), axis=0)
    bwd = np.full((n, k), -np.inf)  # every labelling of candidates after i, given i kept as label j
    for i in range(n - 1, -1, -1):
        terms = [np.broadcast_to(last_prior + (cum_drop[n] - cum_drop[i + 1]), (1, k))]
        for b in range(i + 1, n):
            terms.append((trans[i][b] + (emit[b] + bwd[b])[None, :] + (cum_drop[b] - cum_drop[i + 1])).T)
        bwd[i] = _logsumexp(np.concatenate(terms, axis=0), axis=0)
    first = emit + start[None, :] + cum_drop[:n, None] + bwd  # the first kept candidate is i, as label j
    z = np.logaddexp(cum_drop[n], _logsumexp(first))
    return labels, np.exp(fwd + bwd - z)


def order_candidates(positions_mm: np.ndarray, scores, label_probs: list[dict[int, float]], cc_axis: int,
                     distance_mm: float, superior_is_positive: bool = True, allowed: list[int] | None = None,
                     model: SpineModel | None = None, with_posterior: bool = False):
    """``[(candidate index, label)]`` head to foot: suppression, sorting, then :func:`viterbi_labels`.

    With ``with_posterior``: ``(that list, [posterior probability of each of its labels])``, from
    :func:`label_marginals` on the same candidates.

    Args:
        positions_mm: (n, 3) candidate positions in a frame whose ``cc_axis`` runs head-foot; the
            model's step directions are weighed only in world LPS mm (``cc_axis`` 2, head = +z), the
            frame the fingerprint measured them in.
        scores: heatmap peak values.
        label_probs: per candidate label probabilities.
        cc_axis: index of the cranio-caudal axis in ``positions_mm``.
        distance_mm: median distance between neighbouring vertebrae (suppression radius, and the
            scale of the default :class:`SpineModel`).
        superior_is_positive: whether larger coordinates along ``cc_axis`` are more cranial.
        allowed: labels the model knows.
        model: distance statistics; default: the typical profile scaled to ``distance_mm``.
    """
    positions_mm = np.asarray(positions_mm, dtype=np.float64).reshape(-1, 3)
    if len(positions_mm) == 0:
        return ([], []) if with_posterior else []
    scores = np.asarray(scores, dtype=np.float64)
    model = model or SpineModel.from_stats(None, default_distance_mm=distance_mm)
    kept = _kept_sorted(positions_mm, scores, cc_axis, distance_mm, superior_is_positive)
    probs = [label_probs[i] for i in kept]
    steps = _step_scores(positions_mm[kept], model, label_range(allowed), cc_axis)  # shared by both passes
    labs = viterbi_labels(positions_mm[kept], scores[kept], probs, model, allowed, cc_axis, steps)
    ordered = [(i, lab) for i, lab in zip(kept, labs) if lab is not None]
    if not with_posterior:
        return ordered
    names, marg = label_marginals(positions_mm[kept], scores[kept], probs, model, allowed, cc_axis, steps)
    col = {lab: j for j, lab in enumerate(names)}
    return ordered, [float(marg[r, col[lab]]) for r, lab in enumerate(labs) if lab is not None]


def _kept_sorted(positions_mm: np.ndarray, scores: np.ndarray, cc_axis: int, distance_mm: float,
                 superior_is_positive: bool) -> list[int]:
    """Candidates that survive suppression, sorted head to foot (what the ordering sees)."""
    kept = suppress_duplicates(positions_mm, scores, NMS_FRACTION * distance_mm)
    sign = -1.0 if superior_is_positive else 1.0
    return sorted(kept, key=lambda i: sign * positions_mm[i, cc_axis])


def candidate_truth(positions_mm: np.ndarray, gt_mm: dict[int, np.ndarray], radius_mm: float,
                    margin_mm: float, cc_axis: int = 2) -> list:
    """What each candidate is by the annotation: its vertebra's label when it is the candidate closest
    to that annotated centre and that centre is the closest to it, within ``radius_mm`` (the VerSe
    rule of :func:`spinelm.evaluation.identification`); ``None`` (a false positive) when it lies among
    the annotated vertebrae otherwise; ``False`` (not judged) beyond the annotated ends by more than
    ``margin_mm`` along ``cc_axis`` (e.g. a T12 in a scan annotated L1-L5)."""
    pos = np.asarray(positions_mm, dtype=np.float64).reshape(-1, 3)
    labels = list(gt_mm)
    gt = np.asarray([gt_mm[k] for k in labels], dtype=np.float64).reshape(-1, 3)
    out: list = [None] * len(pos)
    if not len(gt) or not len(pos):
        return out
    d = np.linalg.norm(pos[:, None, :] - gt[None, :, :], axis=2)  # (candidates, gt)
    lo, hi = gt[:, cc_axis].min() - margin_mm, gt[:, cc_axis].max() + margin_mm
    for i in range(len(pos)):
        if not lo <= pos[i, cc_axis] <= hi:
            out[i] = False
    for j, lab in enumerate(labels):
        i = int(np.argmin(d[:, j]))
        if d[i, j] <= radius_mm and int(np.argmin(d[i])) == j:
            out[i] = lab
    return out


def truth_log_likelihood(positions_mm: np.ndarray, scores, label_probs: list[dict[int, float]],
                         gt_mm: dict[int, np.ndarray], cc_axis: int, distance_mm: float,
                         allowed: list[int] | None = None, model: SpineModel | None = None,
                         superior_is_positive: bool = True, radius_mm: float = 20.0) -> tuple[float, int]:
    """``(sum of log posterior, candidates judged)``: how probable the ordering model finds the annotated
    reading of one case (annotated centres ``gt_mm``): every candidate that survives suppression kept
    with its true label or dropped, what each one is decided among the survivors by
    :func:`candidate_truth` (those beyond the annotated ends are left out). The score that
    :func:`fit_label_weight` maximises: a proper score of the posteriors, so it rewards being sure
    where it is right as much as it punishes being sure where it is wrong."""
    positions_mm = np.asarray(positions_mm, dtype=np.float64).reshape(-1, 3)
    scores = np.asarray(scores, dtype=np.float64)
    if len(positions_mm) == 0:
        return 0.0, 0
    model = model or SpineModel.from_stats(None, default_distance_mm=distance_mm)
    kept = _kept_sorted(positions_mm, scores, cc_axis, distance_mm, superior_is_positive)
    truth = candidate_truth(positions_mm[kept], gt_mm, radius_mm, 0.5 * distance_mm, cc_axis)
    names, marg = label_marginals(positions_mm[kept], scores[kept], [label_probs[i] for i in kept], model,
                                  allowed, cc_axis)
    col = {lab: j for j, lab in enumerate(names)}
    total, n = 0.0, 0
    for r, t in enumerate(truth):
        if t is False:
            continue
        p = (1.0 - float(marg[r].sum())) if t is None else (float(marg[r, col[t]]) if t in col else 0.0)
        total += float(np.log(max(p, TRUTH_FLOOR)))
        n += 1
    return total, n


def fit_label_weight(cases: list[tuple], cc_axis: int, distance_mm: float, allowed: list[int] | None = None,
                     model: SpineModel | None = None, weights=LABEL_WEIGHTS) -> tuple[float, dict]:
    """The weight of the label evidence (:attr:`SpineModel.label_weight`) under which the annotated
    readings of ``cases`` (``(positions_mm, scores, label_probs, annotated centres {label: mm})`` each)
    are most probable (:func:`truth_log_likelihood`), and per weight tried the mean log-likelihood per
    judged candidate. Ties go to the more trusting weight (earlier in ``weights``).

    Temperature scaling of the label evidence: the label probabilities of a segmentation head and of
    the identification stages combined are overconfident where the network learned little (a shifted
    run carries confident wrong labels that outweigh the column's geometry), and near calibrated where
    it learned well; the validation cases of the training run say which. The choice is
    the plain maximum; the standard error of each weight's difference to the best is returned beside
    it, for the record (the errors come by case: that of a mean over cases)."""
    model = model or SpineModel.from_stats(None, default_distance_mm=distance_mm)
    weights = [float(w) for w in weights]
    per_case = np.zeros((len(weights), len(cases)))
    judged = np.zeros(len(cases))
    for a, w in enumerate(weights):
        m = model.weighted(w)
        for c, (pos, sc, probs, gt) in enumerate(cases):
            per_case[a, c], judged[c] = truth_log_likelihood(pos, sc, probs, gt, cc_axis, distance_mm, allowed, m)
    n = max(float(judged.sum()), 1.0)
    mean = per_case.sum(1) / n
    best = int(np.argmax(mean))
    diff = per_case[best][None, :] - per_case  # (weights, cases): how much better the best weight reads each case
    se = np.sqrt(len(cases) * diff.var(axis=1, ddof=1)) / n if len(cases) > 1 else np.zeros(len(weights))
    return weights[best], {w: {"log_likelihood": float(mean[a]), "standard_error": float(se[a])}
                           for a, w in enumerate(weights)}
