"""Training: a small trainer composed of parts (network, loss, sampler, optimiser), k-fold.

``train_fold`` runs one fold of a planned and preprocessed model folder:

- deterministic k-fold splits in ``MODEL_DIR/splits.json`` (identical scans kept in one fold),
- SGD with Nesterov momentum and nnU-Net's poly learning-rate schedule,
- a fixed number of epochs or a time budget (whichever ends first),
- atomic checkpoints ``checkpoint_latest.pt`` (every epoch), ``checkpoint_best.pt`` (best
  validation), ``checkpoint_final.pt``, each a ``state_dict`` with JSON metadata beside it,
- exact resume: network, optimiser, AMP scaler, epoch, logs, elapsed time and every RNG state,
- validation on the held-out fold: sliding-window prediction, heatmap peaks labelled as a
  consecutive run (:mod:`spinelm.ordering`), identification rate and mean localisation error (mm),
- a log file, a progress bar and ``training_curve.png``,
- mixed precision: float16 AMP on CUDA; on a CPU with bfloat16 instructions (AVX512-BF16/AMX),
  bfloat16 autocast and channels-last memory (together about 2x the steps per second of float32 on
  2 cores; ``--precision fp32`` turns them off),
- DDP under ``torchrun`` (rank 0 validates and writes).

No SimpleITK here: this module runs on training machines with preprocessed data.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from spinelm.data import PatchSampler
from spinelm.evaluation import identification, summarise
from spinelm.io.files import atomic_path, read_json, write_json_atomic
from spinelm.losses import AUXILIARY_CONFIGURATIONS, MultiTaskLoss
from spinelm.network import build_network
from spinelm.plans import ModelFolder

log = logging.getLogger(__name__)

SPLIT_SEED = 12345
#: Decay of the exponential moving average of the weights that validation, the checkpoints and
#: prediction use (the raw weights keep training). A half-life of about 350 steps (7 epochs of 50):
#: on real lumbar MR in float32 the raw weights' validation swung between 0.71 and 1.00 from one
#: validation to the next (5 epochs apart) late in 20-minute runs.
EMA_DECAY = 0.998
#: Fraction of the time budget kept free for the final validation and checkpoint.
TIME_BUDGET_RESERVE = 0.1
#: Largest share of the wall time that the validations during training may take. The time budget
#: counts training steps only, so a validation is skipped (until the next scheduled one) when the
#: training since the last validation is shorter than (1 - share) / share times what that validation
#: took. Measured need: on neck-to-knee Dixon phantoms one fine validation of 5 volumes took 358 s
#: (48 s in the coarse stage), against 5 epochs of about 80 s of training.
VALIDATION_SHARE = 0.1


def validation_due(scheduled: bool, trained_since_s: float, last_cost_s: float,
                   share: float = VALIDATION_SHARE) -> bool:
    """Whether a scheduled validation runs: when the training since the last validation has bought it
    (:data:`VALIDATION_SHARE`). The final validation always runs (the caller forces it)."""
    return scheduled and trained_since_s * share >= last_cost_s * (1 - share)


@dataclass
class TrainSettings:
    """What a training run may vary without a new plan."""

    fold: int = 0
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    time_budget_min: float | None = None
    device: str = "cpu"
    seed: int = 0
    validate_every: int = 5
    num_workers: int | None = None  # None: resolve_workers's default for the device
    resume: bool = False
    progress: bool = True
    max_validation_cases: int | None = None
    precision: str = "auto"
    unlabelled: bool = True  # self-training on the unlabelled scans, when the plan has it
    init: str | None = None  # pretrained weights (spinelm pretrain) for the fine stage


@dataclass
class TrainLog:
    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    val_epoch: list[int] = field(default_factory=list)
    val_id_rate: list[float] = field(default_factory=list)
    val_d_mean_mm: list[float] = field(default_factory=list)
    #: per epoch, the mean unweighted loss of each crop head (``class``, ``level``) that trained in it
    head_loss: dict[str, list[float]] = field(default_factory=dict)
    #: the validations that graded vertebrae, and their balanced accuracy on the ground-truth masks
    val_class_epoch: list[int] = field(default_factory=list)
    val_class_balanced_accuracy: list[float] = field(default_factory=list)


def make_splits(case_ids: list[str], n_folds: int, groups: dict[str, str] | None = None,
                seed: int = SPLIT_SEED) -> list[dict[str, list[str]]]:
    """Deterministic k-fold splits; cases sharing a group (e.g. identical scans) share a fold."""
    groups = groups or {c: c for c in case_ids}
    # a group is named by its first case, so the folds depend on the case names only (a helper that
    # withholds labels, or a user, can recompute them without the preprocessed files)
    first = {}
    for c in sorted(case_ids):
        first.setdefault(groups[c], c)
    groups = {c: first[groups[c]] for c in case_ids}
    keys = sorted(set(groups.values()))
    order = np.random.default_rng(seed).permutation(len(keys))
    n_folds = max(1, min(n_folds, len(keys)))
    fold_of = {keys[i]: rank % n_folds for rank, i in enumerate(order)}
    splits = []
    for f in range(n_folds):
        val = sorted(c for c in case_ids if fold_of[groups[c]] == f)
        splits.append({"train": sorted(c for c in case_ids if c not in val), "val": val})
    return splits


def _content_groups(cache: Path, case_ids: list[str]) -> dict[str, str]:
    """Group identical preprocessed images (byte-identical scans under two names)."""
    groups = {}
    for c in case_ids:
        groups[c] = hashlib.sha1((cache / f"{c}_data.npy").read_bytes()).hexdigest()
    return groups


def load_or_create_splits(model_dir: Path, cache: Path, case_ids: list[str], n_folds: int,
                          fixed: bool = False) -> list[dict]:
    """The model folder's ``splits.json``, or new splits. ``fixed``: the dataset fixed the folds (its
    ``splits.json``, copied by planning): cases in no fold stay unused."""
    path = model_dir / "splits.json"
    if path.is_file():
        splits = read_json(path)
        known = {c for s in splits for c in s["train"] + s["val"]}
        if fixed or known >= set(case_ids):  # cases that failed preprocessing drop out of their folds
            return [{k: [c for c in v if c in set(case_ids)] for k, v in sp.items()} for sp in splits]
        log.warning("%s lists other cases than the cache; writing new splits", path)
    splits = make_splits(case_ids, n_folds, _content_groups(cache, case_ids))
    write_json_atomic(path, splits)
    return splits


def poly_lr(initial: float, progress: float, exponent: float = 0.9) -> float:
    """nnU-Net's poly schedule at ``progress`` in [0, 1) of the training run."""
    return initial * (1 - min(max(progress, 0.0), 0.999)) ** exponent


def training_progress(epoch: int, max_epochs: int, elapsed_s: float, budget_s: float | None) -> float:
    """How far training is: by epochs, or by the time budget when that ends it sooner, so that the
    learning rate decays over the run that actually happens."""
    frac = epoch / max_epochs
    if budget_s:
        frac = max(frac, elapsed_s / budget_s)
    return frac


def parameter_groups(network: torch.nn.Module, lr: float) -> list[dict]:
    """The network's parameters as optimiser groups: one at ``lr``, and one per submodule that asks for
    another rate with an ``lr_factor`` attribute (the class head, :data:`spinelm.classification.HEAD_LR_FACTOR`).
    Each group keeps its ``lr_factor`` so that the schedule scales every group alike (:func:`set_lr`)."""
    net = _unwrap(network)
    special = [m for m in net.modules() if m is not net and hasattr(m, "lr_factor")]
    taken = {id(p) for m in special for p in m.parameters()}
    groups = [{"params": [p for p in net.parameters() if id(p) not in taken], "lr": lr, "lr_factor": 1.0}]
    for m in special:
        groups.append({"params": list(m.parameters()), "lr": lr * float(m.lr_factor), "lr_factor": float(m.lr_factor)})
    return groups


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the schedule's rate: ``lr`` times each group's ``lr_factor``."""
    for g in optimizer.param_groups:
        g["lr"] = lr * float(g.get("lr_factor", 1.0))


def make_optimizer(network: torch.nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """``sgd``: nnU-Net's (Nesterov, momentum 0.99, weight decay 3e-5); ``adamw``: for short CPU budgets.
    Parameter groups as :func:`parameter_groups`."""
    if name == "sgd":
        return torch.optim.SGD(parameter_groups(network, lr), lr, weight_decay=3e-5, momentum=0.99, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(parameter_groups(network, lr), lr, weight_decay=1e-4)
    raise ValueError(f"unknown optimizer {name!r} in the plans; expected 'sgd' or 'adamw'")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (oneDNN with AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and \
            torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, channels_last)`` for a ``--precision`` choice on ``device``.

    ``auto``: float16 AMP on CUDA; bfloat16 autocast with channels-last on a CPU that has bfloat16
    instructions; float32 otherwise. Channels-last is used on the CPU only (oneDNN's fast path).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    cpu = device.type == "cpu"
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else ("bf16" if cpu and cpu_supports_bf16() else "fp32")
    if precision == "fp16" and cpu:
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return dtype, cpu and dtype is not None


def train_step(network, optimizer, scaler, loss_fn: MultiTaskLoss, batch: dict, device: torch.device,
               autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
               parts: dict | None = None) -> float:
    """One optimisation step on a batch (float16 AMP with ``scaler``, or autocast to
    ``autocast_dtype``); returns the loss. ``parts``, when given, receives the unweighted losses of the
    crop heads of this step (``class``, ``level``), so that the log shows when each starts to learn."""
    x = batch["image"].to(device, non_blocking=True)
    target, hidden = None, None
    if getattr(loss_fn, "has_reconstruction", False):  # the reconstruction head fills in hidden blocks
        from spinelm.losses import hide_blocks

        target = x
        x, hidden = hide_blocks(x, loss_fn.mask_ratio, loss_fn.block)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    hm = batch["heatmap"].to(device, non_blocking=True)
    seg = batch["seg"].to(device, non_blocking=True) if "seg" in batch else None
    structures = batch["structures"].to(device, non_blocking=True) if "structures" in batch else None
    known = batch.get("heatmap_known")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and autocast_dtype is None:
        autocast_dtype = torch.float16
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        outputs = network(x)
        loss, _ = loss_fn(outputs if isinstance(outputs, (list, tuple)) else [outputs], seg, hm, structures,
                          target, hidden, known)
        if "class_image" in batch:  # masked vertebra crops through the shared encoder and the class head
            from spinelm.classification import class_logits, soft_cross_entropy

            xc = batch["class_image"].to(device, non_blocking=True)
            if channels_last:
                xc = xc.contiguous(memory_format=torch.channels_last_3d)
            class_loss = soft_cross_entropy(class_logits(network, xc),
                                            batch["class_target"].to(device, non_blocking=True))
            loss = loss + batch.get("class_weight", 1.0) * class_loss
            if parts is not None:
                parts["class"] = float(class_loss.detach())
        if "level_image" in batch:  # vertebra crops through the shared encoder, the level and upright heads
            from spinelm.identification import IGNORE, level_and_upright_logits

            xl = batch["level_image"].to(device, non_blocking=True)
            if channels_last:
                xl = xl.contiguous(memory_format=torch.channels_last_3d)
            lv, up = level_and_upright_logits(network, xl)
            level_loss = torch.nn.functional.cross_entropy(
                lv.float(), batch["level_target"].to(device, non_blocking=True), ignore_index=IGNORE)
            loss = loss + batch.get("level_weight", 1.0) * level_loss
            if parts is not None and torch.isfinite(level_loss):  # NaN when every crop of the step is ignored
                parts["level"] = float(level_loss.detach())
            if up is not None and "upright_target" in batch:
                loss = loss + batch.get("upright_weight", 0.5) * torch.nn.functional.cross_entropy(
                    up.float(), batch["upright_target"].to(device, non_blocking=True))
    backward_and_step(loss, network, optimizer, scaler)
    return float(loss.detach())


def backward_and_step(loss, network, optimizer, scaler=None, clip: float = 12.0) -> None:
    """Backpropagate ``loss``, clip the gradient norm at ``clip`` (nnU-Net's 12) and step, through the
    float16 gradient ``scaler`` when there is one."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(network.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), clip)
        optimizer.step()


def _ddp_info() -> tuple[bool, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return world > 1 or torch.distributed.is_initialized(), rank, world


def _cached_case(cache: Path, case: str, plans) -> tuple:
    """A preprocessed case of the cache: ``(array, Frame placing it in the world, properties)``."""
    from spinelm.io.image import Frame, Geometry

    props = read_json(cache / f"{case}.json")
    frame = Frame.from_info(Geometry.from_json(props["canonical_geometry"]), plans.transpose_forward, props)
    return np.load(cache / f"{case}_data.npy"), frame, props


def validate(network, cache: Path, case_ids: list[str], plans, device, configuration: str = "fine",
             coarse: tuple | None = None) -> dict:
    """Identification rate and mean localisation error (mm) on cached cases, with the one predictor.

    Each case goes through :class:`spinelm.inference.Predictor` exactly as ``spinelm predict``
    labels it (same sliding window, decoding and ordering, in world LPS mm) and is scored with
    ``spinelm evaluate``'s metric against its annotated world centroids; on the same fold and
    checkpoint the figures equal ``spinelm predict`` + ``spinelm evaluate``. Label-free figures
    say whether the heatmap has learned where vertebrae are before the labels are right.

    ``configuration`` is the network's; ``coarse = (networks, coarse cache)`` adds the trained coarse
    identification stage, as prediction does.
    """
    from spinelm.inference import Predictor

    predictor = Predictor.from_network(network, plans, device, configuration,
                                       coarse_networks=coarse[0] if coarse else None)
    distance = predictor.plans.distance_mm
    results, nearest, precise = [], [], []
    for case in case_ids:
        data, frame, props = _cached_case(cache, case, predictor.plans)
        if not props.get("landmarks_known", True):  # boxes or scribbles only: no centroids to score against
            continue
        coarse_input = _cached_case(coarse[1], case, predictor.plans)[:2] if coarse else None
        lab = predictor.predict_preprocessed(data, frame, with_mask=False, coarse=coarse_input).labelled
        gt_mm = {int(lm["label"]): np.asarray(lm["position_mm"], dtype=np.float64) for lm in props["landmarks"]}
        results.append(identification({lb: lab.candidate_world_mm[i] for i, lb in zip(lab.kept, lab.labels)}, gt_mm))
        gts = np.asarray(list(gt_mm.values())).reshape(-1, 3)
        cands = lab.candidate_world_mm
        for g in gts:  # label-free: is there a peak on this vertebra at all?
            nearest.append(float(np.min(np.linalg.norm(cands - g, axis=1))) if len(cands) else np.inf)
        for i in lab.kept:  # and is each kept peak on some vertebra?
            precise.append(bool(len(gts)) and float(np.min(np.linalg.norm(gts - cands[i], axis=1))) <= 0.5 * distance)
    out = summarise(results)
    if predictor.classifier is not None:
        out.update(_validate_classes(predictor, cache, case_ids))
    nearest = np.asarray(nearest)
    out["peak_hit_rate"] = float(np.mean(nearest <= 0.5 * distance)) if len(nearest) else float("nan")
    out["peak_error_median_mm"] = float(np.median(nearest)) if len(nearest) else float("nan")
    out["peak_precision"] = float(np.mean(precise)) if precise else float("nan")
    return out


def _validate_classes(predictor, cache: Path, case_ids: list[str]) -> dict:
    """Classification of the validation cases' annotated vertebrae from their ground-truth masks (what
    ``spinelm predict --masks`` does): balanced accuracy and AUC of the abnormal classes."""
    from spinelm.classification import class_metrics, soft_targets

    plans = predictor.plans
    names = predictor.classifier.names
    seg_labels = np.asarray([0, *plans.heads["segmentation"].labels], np.int16)
    truth, probs = [], []
    for case in case_ids:
        data, _, props = _cached_case(cache, case, plans)
        rows = [(int(r[0]), str(r[1]), float(r[2]) if len(r) > 2 else 1.0) for r in props.get("classes", [])]
        targets = soft_targets(rows, names)
        if not props.get("has_mask") or not targets:
            continue
        seg = np.load(cache / f"{case}_seg.npy")[0]
        known = (seg > 0) & (seg < len(seg_labels))  # not outside the body, not a partial mask's ignored voxels
        instances = np.where(known, seg_labels[np.clip(seg, 0, len(seg_labels) - 1)], 0)
        found = predictor.classifier(data, instances, sorted(targets))
        for lab, p in found.items():
            truth.append(names[int(np.argmax(targets[lab]))])
            probs.append(p)
    if not truth:
        return {}
    m = class_metrics(truth, probs, names)
    return {"class_n": m["n"], "class_balanced_accuracy": m["balanced_accuracy"], "class_auc": m["auc"],
            "class_auc_abnormal": m["auc_abnormal"]}


class WeightAverage:
    """An exponential moving average of a network's weights (Polyak averaging), with the usual
    warm-up ``decay_t = min(decay, (1 + t) / (10 + t))`` so that early copies follow the weights."""

    def __init__(self, network: torch.nn.Module, decay: float = EMA_DECAY):
        import copy

        self.decay = decay
        self.steps = 0
        self.module = copy.deepcopy(_unwrap(network)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, network: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        src = _unwrap(network)
        ema_p, src_p = list(self.module.parameters()), list(src.parameters())
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for b, sb in zip(self.module.buffers(), src.buffers()):
            b.copy_(sb)


def _save_checkpoint(path: Path, network, optimizer, scaler, meta: dict, average: WeightAverage | None = None) -> None:
    """``network`` holds the weights prediction uses (the moving average when there is one);
    ``training_network`` the raw weights training continues from."""
    raw = _unwrap(network).state_dict()
    state = {"network": average.module.state_dict() if average is not None else raw,
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None}
    if average is not None:
        state["training_network"] = raw
        state["average_steps"] = average.steps
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    write_json_atomic(path.with_suffix(".json"), meta)


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _unwrap(network):
    return network.module if hasattr(network, "module") else network


def _plot(log_: TrainLog, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(log_.epoch, log_.train_loss, label="train loss")
    for name, values in sorted(log_.head_loss.items()):
        ax[0].plot(log_.epoch, values, label=f"{name} loss", lw=1)
    ax[0].set_xlabel("epoch")
    ax[0].set_yscale("log")
    ax[0].legend()
    if log_.val_epoch:
        ax[1].plot(log_.val_epoch, log_.val_d_mean_mm, "o-", label="val d_mean (mm)")
        ax2 = ax[1].twinx()
        ax2.plot(log_.val_epoch, log_.val_id_rate, "s--", color="tab:green", label="val id rate")
        if log_.val_class_epoch:
            ax2.plot(log_.val_class_epoch, log_.val_class_balanced_accuracy, "^:", color="tab:purple",
                     label="val class balanced accuracy")
        ax2.set_ylim(0, 1.02)
        ax[1].set_xlabel("epoch")
        ax[1].legend(loc="upper left")
        ax2.legend(loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


@dataclass
class _Run:
    """What one fold's training loop carries from epoch to epoch (and across a resume)."""

    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object
    rng: np.random.Generator
    out: Path
    fold: int
    settings: TrainSettings
    log: TrainLog = field(default_factory=TrainLog)
    start_epoch: int = 0
    elapsed: float = 0.0
    best: dict | None = None
    average: WeightAverage | None = None
    pseudo: dict = field(default_factory=lambda: {"rounds": [], "cases": []})  # self-training state

    def save(self, name: str, meta: dict) -> None:
        _save_checkpoint(self.out / f"checkpoint_{name}.pt", self.network, self.optimizer, self.scaler, meta,
                         self.average)

    @property
    def predicting_network(self) -> torch.nn.Module:
        """What validation and prediction use: the moving average of the weights, or the weights."""
        return self.average.module if self.average is not None else _unwrap(self.network)

    def save_latest(self, epoch: int) -> None:
        self.save("latest", {"epoch": epoch, "elapsed_s": self.elapsed, "best": self.best, "log": asdict(self.log),
                             "fold": self.fold, "settings": asdict(self.settings), "pseudo": self.pseudo,
                             "rng_state": self.rng.bit_generator.state,
                             "torch_rng_state": torch.get_rng_state().tolist(), "numpy_global_state": _numpy_state()})

    def restore(self, device) -> None:
        """Continue exactly where ``checkpoint_latest`` left: weights, optimiser, scaler, logs, every RNG."""
        latest = self.out / "checkpoint_latest.pt"
        if not latest.is_file():
            log.warning("--resume given but %s does not exist; starting from scratch", latest)
            return
        state = torch.load(latest, map_location=device, weights_only=True)
        self.network.load_state_dict(state.get("training_network", state["network"]))
        if self.average is not None:
            self.average.module.load_state_dict(state["network"])
            self.average.steps = int(state.get("average_steps", 0))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError:  # a checkpoint of a version with other parameter groups (before the head's own rate)
            log.warning("%s: the optimiser state has other parameter groups than this version's; training "
                        "continues with the saved weights and a fresh optimiser state", latest)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        meta = read_json(latest.with_suffix(".json"))
        self.start_epoch, self.elapsed, self.best = meta["epoch"] + 1, meta["elapsed_s"], meta.get("best")
        self.log = TrainLog(**meta["log"])
        self.pseudo = meta.get("pseudo") or {"rounds": [], "cases": []}
        # a crash during a round may have replaced or removed pseudo-labels since this checkpoint
        cache = ModelFolder(self.out.parent).cache_dir()
        self.pseudo["cases"] = [c for c in self.pseudo["cases"] if (cache / f"{c}.json").is_file()]
        self.rng.bit_generator.state = meta["rng_state"]
        torch.set_rng_state(torch.tensor(meta["torch_rng_state"], dtype=torch.uint8))
        kind, keys, pos, has_gauss, cached = meta["numpy_global_state"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        log.info("resumed from %s at epoch %d (%.0f s trained)", latest, self.start_epoch, self.elapsed)

    def step(self, optimise) -> float:
        """One optimisation step (``optimise()`` returns its loss), then the weight average follows."""
        loss = optimise()
        if self.average is not None:
            self.average.update(self.network)
        return loss

    def train_epoch(self, epoch: int, lr: float, iterations: int, step) -> float:
        """``iterations`` calls of ``step(parts)`` (one optimisation step each, returning its loss and
        filling ``parts`` with its crop heads' losses) at learning rate ``lr``; logs the epoch and returns
        its duration in seconds."""
        t0 = time.perf_counter()
        set_lr(self.optimizer, lr)
        self.network.train()
        losses, heads = [], {}
        for _ in range(iterations):
            parts: dict = {}
            losses.append(step(parts))
            for k, v in parts.items():
                heads.setdefault(k, []).append(v)
        dt = time.perf_counter() - t0
        self.elapsed += dt
        self.log.epoch.append(epoch)
        self.log.train_loss.append(float(np.mean(losses)))
        self.log.lr.append(lr)
        self.log.seconds.append(self.elapsed)
        for k in set(heads) | set(self.log.head_loss):  # an epoch without a head's crops is NaN for it
            past = self.log.head_loss.setdefault(k, [float("nan")] * (len(self.log.epoch) - 1))
            past.append(float(np.mean(heads[k])) if k in heads else float("nan"))
        return dt

    def head_losses_text(self) -> str:
        """``", class loss 0.812, level loss 1.402"`` for the last epoch (empty without crop heads)."""
        return "".join(f", {k} loss {v[-1]:.3f}" for k, v in sorted(self.log.head_loss.items()) if np.isfinite(v[-1]))

    def record_validation(self, epoch: int, summary: dict) -> None:
        """Log a validation and keep the best checkpoint (identification first, then d_mean)."""
        self.log.val_epoch.append(epoch)
        self.log.val_id_rate.append(summary["id_rate"])
        self.log.val_d_mean_mm.append(summary["d_mean_mm"])
        score = (summary["id_rate"], -summary["d_mean_mm"] if np.isfinite(summary["d_mean_mm"]) else -1e9)
        if self.best is None or score > tuple(self.best["score"]):
            self.best = {"epoch": epoch, "score": list(score), **summary}
            self.save("best", {"epoch": epoch, "validation": summary, "fold": self.fold, "plans": "../plans.json"})
        log.info("epoch %d: loss %.4f%s, val id rate %.3f, d_mean %.2f mm (%d/%d identified); a peak on %.0f%% "
                 "of vertebrae, median %.1f mm off, %.0f%% of peaks on a vertebra", epoch, self.log.train_loss[-1],
                 self.head_losses_text(), summary["id_rate"], summary["d_mean_mm"], summary["n_identified"], summary["n_gt"],
                 100 * summary["peak_hit_rate"], summary["peak_error_median_mm"], 100 * summary["peak_precision"])
        if "class_n" in summary:
            self.log.val_class_epoch.append(epoch)
            self.log.val_class_balanced_accuracy.append(summary["class_balanced_accuracy"])
            log.info("epoch %d: classes of %d vertebrae (ground-truth masks): balanced accuracy %.3f, AUC %.3f "
                     "(abnormal vs normal %.3f)", epoch, summary["class_n"], summary["class_balanced_accuracy"],
                     summary["class_auc"], summary["class_auc_abnormal"])


def _fold_logger(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / "training_log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


#: Data-loading processes per training process on a GPU, at most: augmentation in process costs about
#: 0.09 s per lumbar batch on one CPU core, as much as or more than a GPU step, so a GPU waits for data
#: without them (nnU-Net runs 12). On a CPU the default is none: the step itself uses every core.
GPU_DATA_WORKERS = 8


def resolve_workers(num_workers: int | None, device, local_processes: int | None = None,
                    cpu_count: int | None = None) -> int:
    """Data-loading processes: ``num_workers`` when given, else 0 on a CPU and, on a GPU, the cores left
    after one per training process, shared among the processes of this machine (at most
    :data:`GPU_DATA_WORKERS` each)."""
    if num_workers is not None:
        return int(num_workers)
    if torch.device(device).type != "cuda":
        return 0
    procs = max(int(local_processes or os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)
    if cpu_count is not None:
        cores = cpu_count
    elif hasattr(os, "sched_getaffinity"):  # the cores this process may use (a container, a SLURM job)
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    return max(0, min(GPU_DATA_WORKERS, (cores - procs) // procs))


def _batches(sampler: PatchSampler, s: TrainSettings, batch_size: int, rng, device, rank: int, start_epoch: int):
    """A function returning the next training batch (in process, or from data-loading processes)."""
    workers = resolve_workers(s.num_workers, device)
    if workers > 0:
        from spinelm.data import PatchStream
        log.info("data loading: %d process(es)", workers)
        loader = iter(torch.utils.data.DataLoader(PatchStream(sampler, batch_size, s.seed * 100 + rank + start_epoch),
                                                  batch_size=None, num_workers=workers,
                                                  pin_memory=device.type == "cuda", persistent_workers=True))
        return lambda: next(loader)
    return lambda: sampler.batch(rng, batch_size)


def _with_level_crops(next_batch, plans, cache: Path, train_cases: list[str], configuration: str, rng,
                      main_rank: bool = True):
    """``next_batch`` plus crops around annotated vertebrae for the coarse stage's level head
    (:mod:`spinelm.identification`), when the plan has one."""
    if plans.identification is None or configuration != "coarse":
        return next_batch
    from spinelm.identification import LevelCropSampler

    sampler = LevelCropSampler(cache, train_cases, plans)
    if not len(sampler):
        if main_rank:
            log.warning("the plan has a level head but no training case has annotated vertebrae: the head is not trained")
        return next_batch
    if main_rank:
        log.info("level head: %d annotated vertebrae, %d crops %s per step (%d of them also turned over for "
                 "the upright head)", len(sampler), sampler.n, list(sampler.crop_size), sampler.n_turned)
    weight = float(plans.identification.get("loss_weight", 1.0))
    upright_weight = float(plans.identification.get("upright_loss_weight", 0.5))

    def both():
        batch = next_batch()
        batch.update(sampler.batch(rng))
        batch["level_weight"] = weight
        batch["upright_weight"] = upright_weight
        return batch

    return both


def _with_class_crops(next_batch, plans, cache: Path, train_cases: list[str], configuration: str, rng,
                      main_rank: bool = True):
    """``next_batch`` plus class-balanced masked vertebra crops, when the plan has a classification head
    and the training cases have classes and masks."""
    if plans.classification is None or configuration != "fine":
        return next_batch
    from spinelm.classification import ClassCropSampler

    sampler = ClassCropSampler(cache, train_cases, plans)
    if not len(sampler):
        if main_rank:
            log.warning("the plan has a classification head but no training case has both a mask and classes: "
                        "the head is not trained")
        return next_batch
    if main_rank:
        log.info("classification: %d annotated vertebrae (%s; %d more have a class but no voxels in their mask, box or strokes), "
                 "%d masked crops %s per step", len(sampler),
                 ", ".join(f"{plans.classification['classes'][int(np.argmax(sampler.items[g[0]][2]))]} "
                           f"{len(g)}" for g in sampler.by_class), sampler.not_in_mask,
                 int(plans.classification.get("batch_size", 2)), list(sampler.crop_size))
    weight = float(plans.classification.get("loss_weight", 1.0))

    def both():
        batch = next_batch()
        batch.update(sampler.batch(rng))
        batch["class_weight"] = weight
        return batch

    return both


def training_cases(labelled: list[str], pseudo: list[str]) -> list[str]:
    """The cases patches are drawn from: the labelled ones repeated so that they give at least half of
    the patches however many pseudo-labelled scans join them."""
    repeat = max(1, -(-len(pseudo) // max(len(labelled), 1)))
    return list(labelled) * repeat + list(pseudo)


def _self_training(model: ModelFolder, s: TrainSettings, configuration: str, main_rank: bool, is_ddp: bool) -> list:
    """The fractions of the stage's budget after which the unlabelled scans are pseudo-labelled
    (empty when the plan, the settings or the data leave self-training off)."""
    plan = model.plans.training.get("self_training")
    if not plan or configuration != model.plans.stages[-1] or not s.unlabelled:
        return []
    cache = model.unlabelled_cache_dir(configuration)
    if not (cache / "cache.json").is_file():
        if main_rank:
            log.warning("the plan uses unlabelled scans but %s has none preprocessed (run spinelm preprocess); "
                        "training on the labelled cases only", cache)
        return []
    if is_ddp:
        if main_rank:
            log.warning("self-training on unlabelled scans is not supported under torchrun yet; training on the "
                        "labelled cases only")
        return []
    return [float(f) for f in plan["rounds"]]


def round_leaves_time(elapsed_s: float, budget_s: float | None, round_s: float) -> bool:
    """Whether a pseudo-labelling round that may take ``round_s`` still leaves at least as much training
    time after it (within the budget, less its reserve) to learn from its labels. Without a budget or
    a cap, always."""
    if budget_s is None or round_s <= 0:
        return True
    return budget_s * (1 - TIME_BUDGET_RESERVE) - elapsed_s - round_s >= round_s


def _pseudo_round(run: _Run, model: ModelFolder, configuration: str, coarse, device, epoch: int,
                  budget_s: float | None) -> None:
    """Pseudo-label the unlabelled scans with the current (averaged) weights, for at most the plan's
    ``round_share`` of the stage's budget (the scans no round has seen first); the accepted ones join
    or replace the fold's earlier pseudo-labels. The time counts towards the budget."""
    from spinelm.inference import Predictor
    from spinelm.semisupervised import PSEUDO_PREFIX, pseudo_label, round_order

    t0 = time.perf_counter()
    share = (model.plans.training.get("self_training") or {}).get("round_share")
    predictor = Predictor.from_network(run.predicting_network, model.plans, device, configuration,
                                       coarse_networks=coarse[0] if coarse else None)
    unl = model.unlabelled_cache_dir(configuration)
    seen = run.pseudo.setdefault("seen", [])
    res = pseudo_label(predictor, unl, model.cache_dir(configuration), model.plans,
                       model.unlabelled_cache_dir("coarse") if coarse else None, prefix=f"{PSEUDO_PREFIX}f{run.fold}__",
                       max_seconds=float(share) * budget_s if share and budget_s else None,
                       order=round_order(read_json(unl / "cache.json")["cases"], seen,
                                         [run.settings.seed, run.fold, len(run.pseudo["rounds"])]))
    dt = time.perf_counter() - t0
    run.elapsed += dt
    seen.extend(sorted(set(res["examined"]) - set(seen)))
    run.pseudo["cases"] = res["accepted"]
    run.pseudo["rounds"].append({"epoch": epoch, "scans": res["scans"], "examined": len(res["examined"]),
                                 "accepted_now": len(res["new"]), "accepted": len(res["accepted"]),
                                 "seconds": round(dt, 1), "rejected": res["rejected"]})
    log.info("self-training after epoch %d: %d of %d unlabelled scans labelled in %.0f s, %d accepted; %d pseudo-"
             "labelled scans in training%s", epoch, len(res["examined"]), res["scans"], dt, len(res["new"]),
             len(res["accepted"]), "".join(f"; {c}: {', '.join(r)}" for c, r in sorted(res["rejected"].items())[:5]))


def _fold_cases(model: ModelFolder, fold: int, configuration: str = "fine") -> tuple[Path, dict]:
    """The configuration's cache and the fold's split. Splits are made from the fine cache (the
    groups of identical scans, and the order of the folds, come from its files), so every stage of
    a plan trains and validates on the same cases."""
    cache = model.cache_dir(configuration)
    for c in {configuration, "fine"}:
        if not (model.cache_dir(c) / "cache.json").is_file():
            raise FileNotFoundError(f"{model.cache_dir(c)}: no preprocessed data; run 'spinelm preprocess DATASET -m "
                                    f"{model.root}'")
    case_ids = read_json(cache / "cache.json")["cases"]
    fine_cases = read_json(model.cache_dir() / "cache.json")["cases"]
    splits = load_or_create_splits(model.root, model.cache_dir(), fine_cases, model.plans.training["num_folds"],
                                   bool(model.plans.training.get("splits_from_dataset")))
    if set(case_ids) != set(fine_cases):
        splits = [{k: [c for c in v if c in case_ids] for k, v in sp.items()} for sp in splits]
    if not 0 <= fold < len(splits):
        raise ValueError(f"fold {fold} does not exist; the splits have folds 0-{len(splits) - 1}")
    return cache, splits[fold]


def _coarse_for_validation(model: ModelFolder, fold: int, device) -> tuple | None:
    """The fold's trained coarse stage and its cache, for validating the fine stage as prediction runs."""
    if not model.plans.has_coarse:
        return None
    ckpt = model.checkpoint(fold, "final", "coarse")
    if not ckpt.is_file():
        log.warning("%s is missing: validating the fine stage without the coarse identification stage", ckpt)
        return None
    from spinelm.inference import load_network

    return [load_network(model, fold, "final", "coarse", device)], model.cache_dir("coarse")


#: Where the coarse stage's refresh (self-training) keeps its run, inside the coarse stage's fold folder.
REFRESH_DIR = "refresh"
#: The coarse stage's own final checkpoint, kept when its refresh replaces ``checkpoint_final.pt``.
LABELLED_ONLY_CHECKPOINT = "checkpoint_final_labelled_only.pt"


def coarse_refresh_due(model: ModelFolder, fold: int, settings: TrainSettings) -> bool:
    """Whether the plan asks for the coarse stage's refresh after self-training and it has not run yet."""
    st = model.plans.training.get("self_training") or {}
    return bool(st.get("coarse_refresh")) and model.plans.has_coarse and settings.unlabelled and \
        not (model.fold_dir(fold, "coarse") / REFRESH_DIR / "installed.json").is_file()


def coarse_labels_itself(model: ModelFolder, settings: TrainSettings) -> bool:
    """Whether the plan's coarse refresh runs before the fine stage on the coarse stage's own
    pseudo-labels (``coarse_source`` ``own``) and this run can do it (unlabelled scans preprocessed for
    the coarse stage, self-training on, one process)."""
    st = model.plans.training.get("self_training") or {}
    return bool(st.get("coarse_refresh")) and st.get("coarse_source") == "own" and model.plans.has_coarse and \
        settings.unlabelled and (model.unlabelled_cache_dir("coarse") / "cache.json").is_file() and \
        int(os.environ.get("WORLD_SIZE", "1")) == 1


#: The coarse stage's own labelling round may take at most this part of its refresh's time.
COARSE_ROUND_OF_REFRESH = 0.5


def coarse_self_training(model_dir: str | os.PathLike, settings: TrainSettings) -> dict:
    """The coarse stage labels the unlabelled scans itself (alone, with its final weights; each run
    accepted when every label is >= :data:`spinelm.semisupervised.COARSE_SELF_POSTERIOR` probable
    under the ordering), for at most :data:`COARSE_ROUND_OF_REFRESH` of its refresh's time, then
    trains on them and the labelled runs for the rest of it (:func:`refresh_coarse`): the accepted
    centres teach its level head, not its heatmap or segmentation. Runs before the fine stage, which
    then keeps its whole share. ``--resume`` of an interrupted refresh keeps the round's labels."""
    from spinelm.inference import Predictor, load_network
    from spinelm.semisupervised import (COARSE_SELF_POSTERIOR, PSEUDO_PREFIX, pseudo_cases, pseudo_label,
                                        remove_cases, round_order)

    model = ModelFolder(model_dir)
    folder = model.fold_dir(settings.fold, "coarse") / REFRESH_DIR
    record = folder / "coarse_round.json"
    prefix = f"{PSEUDO_PREFIX}f{settings.fold}__"
    cache, unl = model.cache_dir("coarse"), model.unlabelled_cache_dir("coarse")
    if settings.resume and record.is_file() and (folder / "checkpoint_latest.pt").is_file():
        rnd = read_json(record)
        written = pseudo_cases(cache, prefix)
    else:
        t0 = time.perf_counter()
        remove_cases(cache, pseudo_cases(cache, prefix))  # an earlier run's labels belong to other weights
        device = torch.device(settings.device)
        predictor = Predictor(model.plans, [load_network(model, settings.fold, "final", "coarse", device)], device,
                              configuration="coarse")
        budget = settings.time_budget_min if settings.time_budget_min is not None else \
            model.plans.training.get("time_budget_min")
        cap = budget * 60 * model.plans.stage_share("coarse_refresh") * COARSE_ROUND_OF_REFRESH if budget else None
        res = pseudo_label(predictor, unl, cache, model.plans, prefix=prefix, max_seconds=cap,
                           order=round_order(read_json(unl / "cache.json")["cases"], [],
                                             [settings.seed, settings.fold]),
                           min_posterior=COARSE_SELF_POSTERIOR, centres_only=True, progress=settings.progress)
        written = res["accepted"]
        rnd = {"scans": res["scans"], "examined": len(res["examined"]), "accepted": len(written),
               "seconds": round(time.perf_counter() - t0, 1), "rejected": res["rejected"]}
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record, rnd)
        log.info("fold %d: the coarse stage labelled %d of %d unlabelled scans alone in %.0f s and accepted %d",
                 settings.fold, rnd["examined"], rnd["scans"], rnd["seconds"], rnd["accepted"])
    result = refresh_coarse(model.root, settings, written, spent_s=float(rnd["seconds"]), mapped=True)
    return {**result, "round": {k: v for k, v in rnd.items() if k != "rejected"}}


def refresh_coarse(model_dir: str | os.PathLike, settings: TrainSettings, pseudo: list[str], spent_s: float = 0.0,
                   mapped: bool = False) -> dict:
    """The coarse stage's refresh after self-training: the fine stage's accepted pseudo-labels
    ``pseudo`` (names in the fine cache) go to the coarse cache as centres
    (:func:`spinelm.semisupervised.coarse_pseudo_labels`; ``mapped``: ``pseudo`` are already coarse
    cache cases), the coarse stage trains on from its final weights for the plan's ``coarse_refresh``
    share of the budget (less ``spent_s`` already spent labelling) on the labelled and the
    pseudo-labelled runs, and its result replaces the coarse stage's ``checkpoint_final.pt`` (the
    labelled-only one is kept as :data:`LABELLED_ONLY_CHECKPOINT`). Without an accepted pseudo-label it
    trains on the labelled runs alone for that time (the plan took it from another stage)."""
    from spinelm.semisupervised import PSEUDO_PREFIX, coarse_pseudo_labels

    model = ModelFolder(model_dir)
    prefix = f"{PSEUDO_PREFIX}f{settings.fold}__"
    if mapped:
        written = list(pseudo)
    else:
        written = coarse_pseudo_labels(model.cache_dir(), model.unlabelled_cache_dir("coarse"),
                                       model.cache_dir("coarse"), model.plans,
                                       [c for c in pseudo if c.startswith(prefix)], prefix)
    if not written:  # the refresh's time is planned: the coarse stage trains on, on the labelled runs
        log.info("fold %d: no accepted pseudo-label; the coarse stage trains on the labelled runs for its refresh time",
                 settings.fold)
    result = train_fold(model.root, settings, "coarse", refresh=written, spent_s=spent_s)
    folder = model.fold_dir(settings.fold, "coarse")
    if not (folder / LABELLED_ONLY_CHECKPOINT).is_file():
        shutil.copy2(folder / "checkpoint_final.pt", folder / LABELLED_ONLY_CHECKPOINT)
        shutil.copy2(folder / "checkpoint_final.json", folder / LABELLED_ONLY_CHECKPOINT.replace(".pt", ".json"))
    for suffix in (".pt", ".json"):
        with atomic_path(folder / f"checkpoint_final{suffix}") as tmp:
            shutil.copy2(folder / REFRESH_DIR / f"checkpoint_final{suffix}", tmp)
    write_json_atomic(folder / REFRESH_DIR / "installed.json", {"pseudo_labelled_runs": len(written),
                                                                 "labelled_only": LABELLED_ONLY_CHECKPOINT})
    log.info("fold %d: the coarse stage's refresh on %d labelled and %d pseudo-labelled runs replaces its final "
             "weights (the labelled-only ones: %s)", settings.fold, result.get("labelled_runs", 0), len(written),
             folder / LABELLED_ONLY_CHECKPOINT)
    return {**result, "pseudo_labelled_runs": len(written)}


def _drop_pseudo_labels(model: ModelFolder, fold: int) -> None:
    """Remove the fold's pseudo-labelled cases that come from the fine stage's rounds: from the fine
    cache, and from the coarse cache when its refresh learns from them (``coarse_source`` ``fine``; the
    coarse stage's own labels stay with its refresh)."""
    from spinelm.semisupervised import PSEUDO_PREFIX, pseudo_cases, refresh_source, remove_cases

    stages = [model.plans.stages[-1]] + (["coarse"] if model.plans.has_coarse and
                                         refresh_source(model.plans.raw) == "fine" else [])
    for stage in stages:
        remove_cases(model.cache_dir(stage), pseudo_cases(model.cache_dir(stage), f"{PSEUDO_PREFIX}f{fold}__"))


def stage_budget_share(model: ModelFolder, settings: TrainSettings, configuration: str, rounds: list,
                       refresh: bool = False) -> float:
    """The share of the fold's time budget a stage trains for: the plan's, plus the coarse refresh's
    share when self-training does not run (it goes back to the stage it was taken from); ``refresh``:
    the coarse refresh itself."""
    from spinelm.semisupervised import refresh_source

    plans = model.plans
    if refresh:
        return plans.stage_share("coarse_refresh")
    share = plans.stage_share(configuration)
    if "coarse_refresh" in (plans.raw.get("budget", {}).get("stage_shares") or {}):
        source = refresh_source(plans.raw)
        if source == configuration == "coarse" and not coarse_labels_itself(model, settings):
            share += plans.stage_share("coarse_refresh")
        elif source == "fine" and configuration == plans.stages[-1] and not rounds:
            share += plans.stage_share("coarse_refresh")
    return share


def record_coarse_refresh(model: ModelFolder, fold: int, refresh: dict, update: dict | None = None) -> None:
    """Keep the coarse refresh's figures (and ``update``) in the fold's ``validation_summary.json``."""
    path = model.fold_dir(fold) / "validation_summary.json"
    if path.is_file():
        keep = ("final", "epochs_run", "elapsed_s", "labelled_runs", "pseudo_labelled_runs", "round")
        write_json_atomic(path, {**read_json(path), **(update or {}),
                                 "coarse_refresh": {k: v for k, v in refresh.items() if k in keep}})


def revalidate_fine(model_dir: str | os.PathLike, settings: TrainSettings, result: dict) -> dict:
    """Validate the fold's final fine stage again with its refreshed coarse stage (the fine stage's own
    validation ran with the labelled-only one) and record it in the fold's ``validation_summary.json``:
    ``final`` becomes the new figure, ``final_before_refresh`` keeps the earlier one."""
    from spinelm.inference import load_network

    model = ModelFolder(model_dir)
    device = torch.device(settings.device)
    _, split = _fold_cases(model, settings.fold)
    val = split["val"][: settings.max_validation_cases] if settings.max_validation_cases else split["val"]
    network = load_network(model, settings.fold, "final", "fine", device)
    summary = validate(network, model.cache_dir(), val, model.plans, device, "fine",
                       _coarse_for_validation(model, settings.fold, device))
    update = {"final": summary, "final_before_refresh": result.get("final")}
    record_coarse_refresh(model, settings.fold, result.get("coarse_refresh") or {}, update)
    log.info("fold %d: with the refreshed coarse stage the fine stage's validation identifies %.3f (d_mean %.2f mm; "
             "%.3f with the labelled-only coarse stage)", settings.fold, summary["id_rate"], summary["d_mean_mm"],
             (result.get("final") or {}).get("id_rate", float("nan")))
    return update


def train_fold(model_dir: str | os.PathLike, settings: TrainSettings, configuration: str = "fine",
               refresh: list[str] | None = None, spent_s: float = 0.0) -> dict:
    """Train one stage (``configuration``) of one fold; returns the final validation summary and where
    the checkpoints are. The time budget of ``settings`` is the fold's: the stage trains for its
    share of it (:meth:`spinelm.plans.Plans.stage_share`).

    ``refresh`` (coarse stage only; :func:`refresh_coarse`): the pseudo-labelled cases of the coarse
    cache to train on besides the labelled ones, starting from the stage's final weights, in
    ``REFRESH_DIR`` of its fold folder, for the plan's ``coarse_refresh`` share less ``spent_s`` (spent
    labelling them). A pseudo-label whose centres the heatmap must not learn (``landmarks_known`` false)
    feeds the level head's crops only."""
    from tqdm import tqdm

    s, model = settings, ModelFolder(model_dir)
    plans = model.plans
    cfg = plans.configuration(configuration)
    cache, split = _fold_cases(model, s.fold, configuration)
    if refresh is not None and configuration != "coarse":
        raise ValueError("only the coarse stage is refreshed on pseudo-labels")
    out = model.fold_dir(s.fold, configuration) / (REFRESH_DIR if refresh is not None else "")
    out.mkdir(parents=True, exist_ok=True)
    if configuration == "coarse" and refresh is None and int(os.environ.get("RANK", "0")) == 0:
        # a new coarse stage: an earlier refresh belongs to the weights this training replaces
        (out / LABELLED_ONLY_CHECKPOINT).unlink(missing_ok=True)
        (out / LABELLED_ONLY_CHECKPOINT.replace(".pt", ".json")).unlink(missing_ok=True)
        shutil.rmtree(out / REFRESH_DIR, ignore_errors=True)
    is_ddp, rank, world = _ddp_info()
    device = torch.device(s.device if s.device != "cuda" or not is_ddp else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    if is_ddp and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main_rank = rank == 0
    handler = _fold_logger(out) if main_rank else None
    epochs = s.epochs or plans.training["epochs"]
    iters = s.iterations_per_epoch or plans.training["iterations_per_epoch"]
    budget_s = s.time_budget_min if s.time_budget_min is not None else plans.training.get("time_budget_min")
    rounds = _self_training(model, s, configuration, main_rank, is_ddp)
    share = stage_budget_share(model, s, configuration, rounds, refresh is not None)
    # at least a second: labelling that overran the refresh's time still leaves it one epoch
    budget_s = max(budget_s * 60 * share - spent_s, 1.0) if budget_s else None
    # a round at 1.0 labels the unlabelled scans after the last epoch, with the final weights (for the coarse
    # refresh only): training leaves it its time
    final_round = bool(rounds) and rounds[-1] >= 1.0
    round_share = float((plans.training.get("self_training") or {}).get("round_share") or 0.0)
    stage_budget_s = budget_s
    if final_round and budget_s:
        budget_s = budget_s * (1 - round_share)
    if refresh is not None and budget_s is None:  # epochs, not minutes: the refresh's share of the stage's epochs
        epochs = max(1, round(epochs * plans.stage_share("coarse_refresh") / plans.stage_share(configuration)))
    torch.manual_seed(s.seed + rank)
    np.random.seed(s.seed + rank)  # batchgeneratorsv2 draws from the global NumPy generator
    autocast_dtype, channels_last = resolve_precision(s.precision, device)
    network = build_network(plans, configuration=configuration)
    if s.init and configuration == plans.stages[-1] and not (s.resume and (out / "checkpoint_latest.pt").is_file()):
        from spinelm.pretraining import load_pretrained

        got = load_pretrained(network, s.init)
        if main_rank:
            log.info("initialised from %s: %d of %d tensors (not loaded: %s)", s.init, got["loaded"], got["tensors"],
                     ", ".join(got["skipped"][:6]) + (" ..." if len(got["skipped"]) > 6 else ""))
    if refresh is not None and not (s.resume and (out / "checkpoint_latest.pt").is_file()):
        start = model.fold_dir(s.fold, configuration) / LABELLED_ONLY_CHECKPOINT
        start = start if start.is_file() else model.checkpoint(s.fold, "final", configuration)
        network.load_state_dict(torch.load(start, map_location="cpu", weights_only=True)["network"])
        if main_rank:
            log.info("coarse stage refresh: from %s, on %d labelled and %d pseudo-labelled runs", start,
                     len(split["train"]), len(refresh))
    network = network.to(device)
    if channels_last:
        network = network.to(memory_format=torch.channels_last_3d)
    loss_fn = MultiTaskLoss(plans.head_dict, cfg.n_stages, auxiliary=configuration in AUXILIARY_CONFIGURATIONS)
    lr0 = plans.training["initial_lr"]
    optimizer = make_optimizer(network, plans.training.get("optimizer", "sgd"), lr0)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and autocast_dtype == torch.float16 else None
    run = _Run(network, optimizer, scaler, np.random.default_rng([s.seed, rank]), out, s.fold, s,
               average=WeightAverage(network, float(plans.training.get("ema_decay", EMA_DECAY))) if main_rank else None)
    if s.resume:
        run.restore(device)
    if is_ddp:
        run.network = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device] if device.type == "cuda" else None)
    batch_size = max(1, cfg.batch_size // world)
    coarse = _coarse_for_validation(model, s.fold, device) if configuration != "coarse" else None
    if rounds and main_rank and not (s.resume and (out / "checkpoint_latest.pt").is_file()):
        _drop_pseudo_labels(model, s.fold)  # an earlier run's pseudo-labels belong to other weights

    taught = [c for c in refresh or [] if read_json(cache / f"{c}.json").get("landmarks_known", True)]

    def sampler_batches(start_epoch: int):
        cases = training_cases(split["train"], run.pseudo["cases"] if rounds else taught)
        nb = _batches(PatchSampler(cache, cases, plans, augment=True, configuration=configuration), s, batch_size,
                      run.rng, device, rank, start_epoch)
        nb = _with_class_crops(nb, plans, cache, split["train"], configuration, run.rng, main_rank)
        return _with_level_crops(nb, plans, cache, training_cases(split["train"], refresh or []), configuration,
                                 run.rng, main_rank)

    next_batch = sampler_batches(run.start_epoch)
    if rounds and main_rank:
        log.info("self-training: the unlabelled scans are pseudo-labelled after %s of the stage's budget; only "
                 "anatomically valid, confident labellings are kept", " and ".join(f"{100 * f:.0f} %" for f in rounds))
    val_cases = split["val"][: s.max_validation_cases] if s.max_validation_cases else split["val"]
    if main_rank:
        log.info("fold %d, %s stage: %d training, %d validation cases; %s (%s%s); patch %s, batch %d, up to %d "
                 "epochs x %d iterations%s", s.fold, configuration, len(split["train"]), len(val_cases), device,
                 str(autocast_dtype).replace("torch.", "") if autocast_dtype else "float32",
                 ", channels-last" if channels_last else "", list(cfg.patch_size), batch_size, epochs,
                 iters, f", time budget {budget_s / 60:.1f} min" if budget_s else "")
    summary = None
    bar = tqdm(total=epochs, initial=run.start_epoch, desc=f"fold {s.fold} {configuration}", unit="epoch",
               disable=not (s.progress and main_rank))
    epoch = run.start_epoch - 1
    last_cost, trained_since, skipped = 0.0, 0.0, 0
    for epoch in range(run.start_epoch, epochs):
        lr = poly_lr(lr0, training_progress(epoch, epochs, run.elapsed, budget_s))
        dt = run.train_epoch(epoch, lr, iters, lambda parts: run.step(lambda: train_step(
            run.network, optimizer, scaler, loss_fn, next_batch(), device, autocast_dtype, channels_last, parts)))
        out_of_time = budget_s is not None and run.elapsed + dt > budget_s * (1 - TIME_BUDGET_RESERVE)
        if is_ddp and budget_s is not None:  # every rank stops after the same epoch: rank 0's clock decides
            flag = torch.tensor([float(out_of_time)], device=device)
            torch.distributed.broadcast(flag, 0)
            out_of_time = bool(flag.item())
        trained_since += dt
        scheduled = (epoch + 1) % s.validate_every == 0
        if main_rank and (validation_due(scheduled, trained_since, last_cost) or epoch == epochs - 1 or out_of_time):
            t0 = time.perf_counter()
            summary = validate(run.predicting_network, cache, val_cases, plans, device, configuration, coarse)
            last_cost, trained_since = time.perf_counter() - t0, 0.0
            run.record_validation(epoch, summary)
        elif main_rank:
            if scheduled:
                skipped += 1
                if skipped == 1:
                    log.info("validations take %.0f s each: they run after at least %.0f s of training, so that they "
                             "take at most %.0f %% of the time", last_cost,
                             last_cost * (1 - VALIDATION_SHARE) / VALIDATION_SHARE, 100 * VALIDATION_SHARE)
            log.info("epoch %d: loss %.4f%s, lr %.5f, %.1f s", epoch, run.log.train_loss[-1], run.head_losses_text(),
                     lr, dt)
        due = len(run.pseudo["rounds"]) < len(rounds) and not out_of_time and epoch < epochs - 1 and \
            training_progress(epoch + 1, epochs, run.elapsed, budget_s) >= rounds[len(run.pseudo["rounds"])]
        if due and main_rank and not round_leaves_time(run.elapsed, budget_s, round_share * (stage_budget_s or 0)):
            log.info("self-training: no round after epoch %d: after its %.0f s there would be too little time left to "
                     "train on its labels; training on", epoch, round_share * stage_budget_s)
            run.pseudo["rounds"].append({"epoch": epoch, "skipped": True, "scans": 0, "examined": 0, "accepted_now": 0,
                                         "accepted": len(run.pseudo["cases"]), "seconds": 0.0})
        elif due and main_rank:
            _pseudo_round(run, model, configuration, coarse, device, epoch, stage_budget_s)
            next_batch = sampler_batches(epoch + 1)
            out_of_time = budget_s is not None and run.elapsed + dt > budget_s * (1 - TIME_BUDGET_RESERVE)
        if main_rank:
            run.save_latest(epoch)
            _plot(run.log, out / "training_curve.png")
        bar.update(1)
        bar.set_postfix(loss=f"{run.log.train_loss[-1]:.3f}",
                        **({"id": f"{run.log.val_id_rate[-1]:.2f}", "err": f"{run.log.val_d_mean_mm[-1]:.1f}mm"}
                           if run.log.val_epoch else {}))
        if out_of_time:
            log.info("time budget reached after epoch %d (%.1f min)", epoch, run.elapsed / 60)
            break
    bar.close()
    if final_round and main_rank and len(run.pseudo["rounds"]) < len(rounds):
        _pseudo_round(run, model, configuration, coarse, device, epoch, stage_budget_s)
        run.save_latest(epoch)
    result = {"final": summary, "best": run.best, "epochs_run": epoch + 1, "elapsed_s": run.elapsed,
              "labelled_runs": len(split["train"])}
    if rounds:
        result["self_training"] = run.pseudo
    if main_rank:
        run.save("final", {"epoch": epoch, "validation": summary, "best": run.best, "elapsed_s": run.elapsed,
                           "fold": s.fold})
        write_json_atomic(out / "validation_summary.json", result)
    if handler is not None:
        log.removeHandler(handler)
        handler.close()
    if is_ddp and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return {**result, "folder": str(out)}
