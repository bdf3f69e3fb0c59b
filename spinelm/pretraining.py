"""Self-supervised pretraining: masked-image reconstruction with the plan's own network.

``spinelm pretrain DATASET -o PRETRAINED`` plans the dataset as ``spinelm plan`` does, preprocesses
every image (labelled and unlabelled; labels are not read) and trains the fine configuration's
U-Net to fill in masked blocks of random patches (a masked autoencoder for CNNs, as nnU-Net's
self-supervised pretraining does): a share of cubic blocks of each patch is set to zero and the
loss is the mean squared error of the reconstruction on the masked voxels. The network is the
plan's with one output per image channel, so every weight but the output layers loads into the
fine-tuning network (``spinelm plan-and-train ... --init PRETRAINED``; :func:`load_pretrained`).

Resumable (``--resume``), a time budget, a progress bar, ``pretrain_log.txt`` and
``pretrain_curve.png``. No SimpleITK here: this module runs on training machines.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from spinelm.io.files import atomic_path, read_json, write_json_atomic

log = logging.getLogger(__name__)

#: Share of each patch hidden from the network (in blocks).
MASK_RATIO = 0.6
#: Edge of a masked block, in voxels of the fine configuration (at least 1/8 of the patch edge).
MASK_BLOCK = 8
#: Optimiser: AdamW with a poly decay (a regression target; nnU-Net's SGD recipe is for Dice + CE).
PRETRAIN_LR = 1e-3
PRETRAINED_FILE = "pretrained.pt"


def pretrain_network(plans, configuration: str = "fine") -> torch.nn.Module:
    """The configuration's U-Net with one output per image channel, without deep supervision."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from spinelm.plans import as_plans

    plans = as_plans(plans)
    arch = plans.configuration(configuration).architecture
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  plans.n_channels, plans.n_channels, allow_init=True, deep_supervision=False)


def block_mask(shape, rng: np.random.Generator, ratio: float = MASK_RATIO, block: int = MASK_BLOCK) -> np.ndarray:
    """Boolean (X, Y, Z) mask, True where hidden: cubic blocks, ``ratio`` of them."""
    grid = [max(1, -(-int(s) // block)) for s in shape]
    hidden = rng.random(grid) < ratio
    full = hidden.repeat(block, 0).repeat(block, 1).repeat(block, 2)
    return full[: shape[0], : shape[1], : shape[2]]


class ImagePatches:
    """Random patches (random flips on the plan's mirror axes) from preprocessed images of one or
    more caches; labels are never read."""

    def __init__(self, caches: list[Path], patch_size, mirror_axes):
        self.items = []
        for cache in caches:
            meta = Path(cache) / "cache.json"
            if meta.is_file():
                self.items += [(Path(cache), c) for c in read_json(meta)["cases"]]
        if not self.items:
            raise ValueError("no preprocessed images to pretrain on (run spinelm preprocess)")
        self.patch_size = [int(p) for p in patch_size]
        self.mirror_axes = list(mirror_axes)

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, rng: np.random.Generator, batch_size: int) -> torch.Tensor:
        from spinelm.data import _crop

        out = []
        for _ in range(batch_size):
            cache, case = self.items[int(rng.integers(len(self.items)))]
            data = np.load(cache / f"{case}_data.npy", mmap_mode="r")
            centre = rng.uniform(0, 1, 3) * np.asarray(data.shape[1:])
            img, _ = _crop(np.asarray(data), centre, self.patch_size, 0.0)
            for ax in self.mirror_axes:
                if rng.random() < 0.5:
                    img = np.flip(img, ax + 1)
            out.append(np.ascontiguousarray(img))
        return torch.from_numpy(np.stack(out)).float()


def masked_loss(network, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Mean squared reconstruction error on the hidden voxels of ``images`` (B, C, X, Y, Z)."""
    hidden = torch.from_numpy(np.stack([block_mask(images.shape[2:], rng) for _ in range(images.shape[0])]))
    hidden = hidden[:, None].to(images.device)
    recon = network(images.masked_fill(hidden, 0.0))
    if isinstance(recon, (list, tuple)):
        recon = recon[0]
    err = (recon.float() - images) ** 2
    return (err * hidden).sum() / hidden.sum().clamp(min=1) / images.shape[1]


def pretrain(model_dir: str | os.PathLike, time_budget_min: float | None = 10.0, steps: int | None = None,
             device: str = "cpu", seed: int = 0, resume: bool = False, progress: bool = True,
             precision: str = "auto", batch_size: int | None = None) -> dict:
    """Pretrain the fine configuration of a planned, preprocessed model folder on all its images
    (the labelled cache and the unlabelled one). Stops after ``steps`` or ``time_budget_min``.
    Writes ``PRETRAINED_FILE`` (the weights), ``pretrain_latest.pt`` (to resume) and a log."""
    from tqdm import tqdm

    from spinelm.plans import ModelFolder
    from spinelm.training import TrainLog, _plot, backward_and_step, poly_lr, resolve_precision

    model = ModelFolder(model_dir)
    plans = model.plans
    cfg = plans.configuration("fine")
    dev = torch.device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    autocast_dtype, channels_last = resolve_precision(precision, dev)
    patches = ImagePatches([model.cache_dir("fine"), model.unlabelled_cache_dir("fine")], cfg.patch_size,
                           plans.mirror_axes)
    net = pretrain_network(plans).to(dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    if not steps and not time_budget_min:
        raise ValueError("give a number of steps or a time budget")
    opt = torch.optim.AdamW(net.parameters(), PRETRAIN_LR, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" and autocast_dtype == torch.float16 else None
    batch = batch_size or cfg.batch_size
    latest = model.root / "pretrain_latest.pt"
    hist = TrainLog()
    step, elapsed = 0, 0.0
    if resume and latest.is_file():
        state = torch.load(latest, map_location=dev, weights_only=False)
        net.load_state_dict(state["network"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed, hist = state["step"], state["elapsed_s"], TrainLog(**state["log"])
        rng.bit_generator.state = state["rng_state"]
        log.info("resumed pretraining at step %d (%.0f s)", step, elapsed)
    budget_s = time_budget_min * 60 if time_budget_min else None
    total = steps or 10 ** 9
    handler = logging.FileHandler(model.root / "pretrain_log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.info("pretraining on %d images: masked-image reconstruction (%.0f %% of %d-voxel blocks hidden), patch %s, "
             "batch %d, %s%s", len(patches), 100 * MASK_RATIO, MASK_BLOCK, list(cfg.patch_size), batch,
             str(autocast_dtype).replace("torch.", "") if autocast_dtype else "float32",
             f", {time_budget_min:g} min" if budget_s else "")
    per_epoch = 50
    bar = tqdm(total=budget_s and int(budget_s) or total, initial=int(elapsed) if budget_s else step,
               unit="s" if budget_s else "step", desc="pretraining", disable=not progress)
    net.train()

    def save(path: Path, what: dict) -> None:
        with atomic_path(path) as tmp:
            torch.save(what, tmp)

    while step < total and not (budget_s and elapsed >= budget_s):
        t0 = time.perf_counter()
        frac = max(step / total if steps else 0.0, elapsed / budget_s if budget_s else 0.0)
        for g in opt.param_groups:
            g["lr"] = poly_lr(PRETRAIN_LR, frac)
        losses = []
        for _ in range(per_epoch):
            images = patches.batch(rng, batch).to(dev)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = masked_loss(net, images, rng)
            opt.zero_grad(set_to_none=True)
            backward_and_step(loss, net, opt, scaler)
            losses.append(float(loss.detach()))
            step += 1
            if step >= total or (budget_s and elapsed + time.perf_counter() - t0 >= budget_s):
                break
        dt = time.perf_counter() - t0
        elapsed += dt
        hist.epoch.append(len(hist.epoch))
        hist.train_loss.append(float(np.mean(losses)))
        hist.lr.append(opt.param_groups[0]["lr"])
        hist.seconds.append(elapsed)
        log.info("pretraining step %d: reconstruction loss %.4f, %.1f s", step, hist.train_loss[-1], dt)
        save(latest, {"network": net.state_dict(), "optimizer": opt.state_dict(), "step": step, "elapsed_s": elapsed,
                      "log": hist.__dict__, "rng_state": rng.bit_generator.state})
        _plot(hist, model.root / "pretrain_curve.png")
        bar.update(int(dt) if budget_s else len(losses))
        bar.set_postfix(loss=f"{hist.train_loss[-1]:.3f}", step=step)
    bar.close()
    save(model.root / PRETRAINED_FILE, {"network": net.state_dict()})
    info = {"steps": step, "elapsed_s": round(elapsed, 1), "images": len(patches),
            "final_loss": hist.train_loss[-1] if hist.train_loss else None, "mask_ratio": MASK_RATIO,
            "mask_block": MASK_BLOCK, "patch_size": list(cfg.patch_size), "batch_size": batch,
            "architecture": cfg.architecture["arch_kwargs"]}
    write_json_atomic(model.root / "pretrained.json", info)
    log.info("pretrained %d steps in %.1f min -> %s", step, elapsed / 60, model.root / PRETRAINED_FILE)
    log.removeHandler(handler)
    handler.close()
    return info


def load_pretrained(network: torch.nn.Module, path: str | os.PathLike) -> dict:
    """Copy every pretrained tensor whose name and shape match into ``network`` (all but the output
    layers when the plan is the same). ``path``: a pretrained folder or its ``pretrained.pt``.

    Raises:
        FileNotFoundError: no pretrained weights there.
        ValueError: too little matches (the pretraining was planned with another network).
    """
    path = Path(path)
    if path.is_dir():
        path = path / PRETRAINED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no pretrained weights (run spinelm pretrain DATASET -o FOLDER first)")
    src = torch.load(path, map_location="cpu", weights_only=True)["network"]
    own = network.state_dict()
    loaded = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    encoder = [k for k in own if k.startswith("encoder.")]
    share = sum(k in loaded for k in encoder) / max(len(encoder), 1)
    if share < 0.9:
        raise ValueError(f"{path}: only {100 * share:.0f} % of the encoder's weights match this network; the "
                         f"pretraining was planned with another network (plan both with the same dataset, device, "
                         f"--time-budget and --precision)")
    network.load_state_dict(loaded, strict=False)
    return {"loaded": len(loaded), "tensors": len(own), "skipped": sorted(set(own) - set(loaded))}
