"""The compute budget, measured: seconds per training step of a planned network on this device.

CPUs differ by 3-4x in training speed (bfloat16 instructions or not, core speed, threads), so a
time budget cannot be turned into steps with a constant. :func:`measure_step` times a few real
training steps (:func:`spinelm.training.train_step`: forward, losses, backward, optimiser) of the
plan's own network, patch and batch, in the precision training will use, on random data. It takes
seconds, and the result is cached per device (CPU model or GPU name, threads, torch version,
precision) and network, in ``$SPINELM_CACHE`` (default ``~/.cache/spinelm``), so planning the same
configuration again costs nothing. No SimpleITK here.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

#: Training steps the CPU recipe needs (AdamW 3e-3, poly decay over the budget). Measured on the
#: real lumbar MR set, fold 0, patch 80x80x28, batch 2: the validation identification rate was
#: 0.68-0.83 after 1,450-1,500 steps and 0.95 after 3,200 steps (two 20-minute runs in bfloat16);
#: a float32 run of 2,050 steps stopped at 0.59. Budgets that buy fewer steps shrink the patch.
CPU_REQUIRED_STEPS = 3000
#: Steps the coarse identification stage trains for (when the plan has one). Measured on the real
#: lumbar MR set in float32: a 6 mm network holding the whole scan in its patch reached an
#: identification rate of 0.97 after ~1,200 steps and 1.00 after ~1,350.
COARSE_REQUIRED_STEPS = 1500
#: The coarse stage never takes more than this share of a budget's training time.
COARSE_MAX_SHARE = 0.3
#: Steps timed after the warm-up ones (the first steps pay for allocations and oneDNN kernel choice).
#: Measured on 2 CPU cores, ten measurements of one 0.24 s float32 step interleaved with ten of the
#: other setting: the median of 3 steps after 1 warm-up varied by 12 % (coefficient of variation,
#: single readings up to 1.3x the median), the median of 8 after 2 warm-ups by 2.6 %. The patch the
#: budget affords follows the measurement, so that noise moved the planned patch between runs.
TIMED_STEPS = 8
WARMUP_STEPS = 2


def cache_dir() -> Path:
    return Path(os.environ.get("SPINELM_CACHE", Path.home() / ".cache" / "spinelm"))


def device_description(device: str) -> dict:
    """What makes a step's time specific to this machine."""
    import torch

    from spinelm.training import cpu_supports_bf16

    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {"device": dev.type, "name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "bf16_instructions": bool(dev.type == "cpu" and cpu_supports_bf16())}


def _precision_name(precision: str, device: str) -> str:
    import torch

    from spinelm.training import resolve_precision

    dtype, channels_last = resolve_precision(precision, torch.device(device))
    return (str(dtype).replace("torch.", "") if dtype is not None else "float32") + \
        (" + channels-last" if channels_last else "")


def measure_step(plans, device: str = "cpu", precision: str = "auto", use_cache: bool = True,
                 configuration: str = "fine") -> dict:
    """Seconds per training step of the plan's network on ``device`` (median of :data:`TIMED_STEPS`).

    Returns ``{"seconds_per_step", "seconds_per_mvoxel" (per million batch voxels), "batch_voxels",
    "precision", "machine", "cached"}``.
    """
    import numpy as np
    import torch

    from spinelm.losses import AUXILIARY_CONFIGURATIONS, MultiTaskLoss
    from spinelm.network import build_network
    from spinelm.plans import as_plans
    from spinelm.training import make_optimizer, resolve_precision, train_step

    plans = as_plans(plans)
    cfg = plans.configuration(configuration)
    machine = device_description(device)
    prec = _precision_name(precision, device)
    key_src = {"machine": machine, "precision": prec, "architecture": cfg.architecture, "patch": cfg.patch_size,
               "batch": cfg.batch_size, "in": plans.n_channels, "out": plans.n_outputs,
               "optimizer": plans.training.get("optimizer", "sgd"),
               "classification": plans.classification if configuration == "fine" else None,
               "identification": plans.identification if configuration == "coarse" else None,
               "auxiliary": configuration in AUXILIARY_CONFIGURATIONS, "timed": [WARMUP_STEPS, TIMED_STEPS]}
    key = hashlib.sha1(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()
    path = cache_dir() / "step_times.json"
    cache = _read_cache(path) if use_cache else {}
    batch_voxels = int(cfg.batch_size * np.prod(cfg.patch_size))
    if key in cache:
        return {**cache[key], "cached": True}
    dev = torch.device(device)
    dtype, channels_last = resolve_precision(precision, dev)
    torch.manual_seed(0)
    net = build_network(plans, configuration=configuration).to(dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    loss_fn = MultiTaskLoss(plans.head_dict, cfg.n_stages, auxiliary=configuration in AUXILIARY_CONFIGURATIONS)
    opt = make_optimizer(net, plans.training.get("optimizer", "sgd"), plans.training["initial_lr"])
    scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" and dtype == torch.float16 else None
    shape = (cfg.batch_size, *cfg.patch_size)
    heads = plans.heads
    batch = {"image": torch.randn(cfg.batch_size, plans.n_channels, *cfg.patch_size),
             "heatmap": torch.rand(cfg.batch_size, heads["heatmap"].channels, *cfg.patch_size)}
    if "segmentation" in heads:
        batch["seg"] = torch.randint(0, heads["segmentation"].channels, (shape[0], 1, *shape[1:]))
    if "structures" in heads:
        batch["structures"] = torch.randint(0, heads["structures"].channels, (shape[0], 1, *shape[1:]))
    spec = plans.classification if configuration == "fine" else None
    if spec is not None:  # the step also classifies masked vertebra crops (spinelm.classification)
        n_cls = int(spec.get("batch_size", 2))
        batch["class_image"] = torch.randn(n_cls, plans.n_channels, *[int(x) for x in spec["crop_size"]])
        batch["class_target"] = torch.full((n_cls, len(spec["classes"])), 1.0 / len(spec["classes"]))
    level = plans.identification if configuration == "coarse" else None
    if level is not None:  # the coarse step also classifies vertebra crops into levels (spinelm.identification)
        n_lvl = int(level.get("crops_per_step", 6))
        n_up = min(int(level.get("upright_crops", 0)), n_lvl)  # crops also shown turned over (upright head)
        batch["level_image"] = torch.randn(n_lvl + n_up, plans.n_channels, *[int(x) for x in level["crop_size"]])
        batch["level_target"] = torch.zeros(n_lvl + n_up, dtype=torch.long)
        if n_up:
            batch["upright_target"] = torch.zeros(n_lvl + n_up, dtype=torch.long)
    times = []
    for i in range(WARMUP_STEPS + TIMED_STEPS):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        train_step(net, opt, scaler, loss_fn, batch, dev, dtype, channels_last)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    result = {"seconds_per_step": round(seconds, 4), "seconds_per_mvoxel": round(seconds / batch_voxels * 1e6, 4),
              "batch_voxels": batch_voxels, "precision": prec, "machine": machine}
    if use_cache:
        cache = _read_cache(path)
        cache[key] = result
        from spinelm.io.files import write_json_atomic
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, cache)
    return {**result, "cached": False}


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def affordable_steps(time_budget_min: float, seconds_per_step: float, usable_share: float) -> int:
    """Training steps a budget buys, with ``usable_share`` of it left after validation and checkpoints."""
    return int(time_budget_min * 60.0 * usable_share / max(seconds_per_step, 1e-9))


#: Re-plans at most this many times: a smaller patch costs a little more per voxel than the first
#: measurement says, so the cap is corrected with the new configuration's own measurement.
MAX_REFITS = 3
#: A plan whose budget buys at least this share of the required steps is kept.
STEPS_TOLERANCE = 0.95
#: After capping, a plan that buys more than this multiple of the required steps is planned once
#: more with its own (cheaper) cost per voxel, and the larger patch is kept when it still buys them:
#: the first cap comes from the uncapped patch, whose step costs more per voxel. Measured on Dixon
#: phantoms: capped from a 3.10 s per million voxels measurement, the fine patch 48x24x28 cost
#: 1.58 s per million and bought 7860 steps where 3000 were needed.
GROW_MARGIN = 1.5
#: ... at most this many tries, each sized with the cost per voxel the previous try measured.
GROW_TRIES = 2


def plan_within_budget(fingerprint: dict, preset=None, device: str = "cpu", gpu_memory_gb: float | None = None,
                       time_budget_min: float | None = None, precision: str = "auto", measure=measure_step,
                       grow: bool = True) -> dict:
    """:func:`spinelm.planning.plan`, then, with a time budget, the measured cost of its training steps
    on this device: the coarse identification stage (when the plan has one) gets the time of
    :data:`COARSE_REQUIRED_STEPS` steps (at most :data:`COARSE_MAX_SHARE`), and when the rest buys
    fewer than the preset's required steps of the fine stage, the plan is made again with the fine
    patch capped at what it affords (measured again each time, at most :data:`MAX_REFITS` times).

    The last measurements, the steps they afford, each stage's share of the budget and the reason go
    into ``plans["budget"]`` and ``plans["rationale"]``. ``measure(plans, device, precision,
    configuration) -> dict`` is injectable (tests).
    """
    from spinelm.planning import BUDGET_USABLE_SHARE, plan

    raw = plan(fingerprint, preset, device, gpu_memory_gb, time_budget_min)
    budget, required = raw["budget"]["time_budget_min"], raw["budget"]["required_steps"]
    if not budget:
        return raw
    usable_s = budget * 60.0 * BUDGET_USABLE_SHARE
    step = measure(raw, device, precision, configuration="fine")

    def coarse_cost(plans):
        if "coarse" not in plans["configurations"]:
            return None, 0.0
        c = measure(plans, device, precision, configuration="coarse")
        return c, min(COARSE_REQUIRED_STEPS * c["seconds_per_step"], COARSE_MAX_SHARE * usable_s)

    coarse, coarse_s = coarse_cost(raw)
    coarse_spmv = None
    capped_once = False
    for _ in range(MAX_REFITS):
        fine_min = budget * (1 - coarse_s / usable_s)
        fine_ok = affordable_steps(fine_min, step["seconds_per_step"], BUDGET_USABLE_SHARE) >= STEPS_TOLERANCE * required
        coarse_ok = coarse is None or coarse_s / coarse["seconds_per_step"] >= STEPS_TOLERANCE * COARSE_REQUIRED_STEPS
        if fine_ok and coarse_ok:
            break
        if not coarse_ok:  # e.g. a whole-body field of view: cap the coarse patch too
            coarse_spmv = coarse["seconds_per_mvoxel"]
        capped = plan(fingerprint, preset, device, gpu_memory_gb, time_budget_min, step["seconds_per_mvoxel"],
                      fine_budget_min=fine_min, coarse_seconds_per_mvoxel=coarse_spmv)
        if capped["configurations"].keys() == raw["configurations"].keys() and all(
                capped["configurations"][c]["patch_size"] == raw["configurations"][c]["patch_size"]
                for c in capped["configurations"]):
            break  # the caps cannot shrink the patches any further
        raw, step = capped, measure(capped, device, precision, configuration="fine")
        coarse, coarse_s = coarse_cost(raw)
        capped_once = True
    fine_min = budget * (1 - coarse_s / usable_s)
    spmv = step["seconds_per_mvoxel"]
    for _ in range(GROW_TRIES if grow and capped_once else 0):
        if affordable_steps(fine_min, step["seconds_per_step"], BUDGET_USABLE_SHARE) <= GROW_MARGIN * required:
            break
        grown = plan(fingerprint, preset, device, gpu_memory_gb, time_budget_min, spmv, fine_budget_min=fine_min,
                     coarse_seconds_per_mvoxel=coarse_spmv)
        if grown["configurations"].keys() != raw["configurations"].keys() or \
                np.prod(grown["configurations"]["fine"]["patch_size"]) <= np.prod(raw["configurations"]["fine"]["patch_size"]):
            break
        g_step = measure(grown, device, precision, configuration="fine")
        g_coarse, g_coarse_s = coarse_cost(grown)
        g_min = budget * (1 - g_coarse_s / usable_s)
        if affordable_steps(g_min, g_step["seconds_per_step"], BUDGET_USABLE_SHARE) >= STEPS_TOLERANCE * required:
            raw, step, coarse, coarse_s = grown, g_step, g_coarse, g_coarse_s
            break
        spmv = g_step["seconds_per_mvoxel"]  # too big: its own cost per voxel sizes the next try
    shares = {"fine": 1 - coarse_s / usable_s}
    fine_min = budget * shares["fine"]
    steps = affordable_steps(fine_min, step["seconds_per_step"], BUDGET_USABLE_SHARE)
    m = step["machine"]
    raw["budget"].update({"measured_step": step, "affordable_steps": steps})
    if coarse is not None:
        shares["coarse"] = coarse_s / usable_s
        raw["budget"].update({"measured_step_coarse": coarse,
                              "affordable_steps_coarse": int(coarse_s / coarse["seconds_per_step"])})
        raw["rationale"].append(
            f"measured training step of the coarse stage: {coarse['seconds_per_step']:.3f} s; it trains for "
            f"{shares['coarse']:.0%} of the budget (about {raw['budget']['affordable_steps_coarse']} steps; "
            f"{COARSE_REQUIRED_STEPS} wanted)")
    raw["budget"]["stage_shares"] = {k: round(v, 4) for k, v in shares.items()}
    raw["rationale"].append(
        f"measured training step of this plan: {step['seconds_per_step']:.3f} s ({step['precision']}, {m['threads']} "
        f"thread(s), {m['name']}{'; cached' if step.get('cached') else ''}): {fine_min:.3g} of {budget:g} min buy "
        f"about {steps} steps ({BUDGET_USABLE_SHARE:.0%} of that time); the recipe needs {required}"
        + ("" if steps >= STEPS_TOLERANCE * required else " - the patch is at its smallest; expect a less trained "
                                                          "model or give more time"))
    return raw


__all__ = ["COARSE_MAX_SHARE", "COARSE_REQUIRED_STEPS", "CPU_REQUIRED_STEPS", "MAX_REFITS", "affordable_steps", "cache_dir", "device_description",
           "measure_step", "plan_within_budget"]
