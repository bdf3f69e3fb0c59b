"""Training iterations per second: spinelm against nnunetv2's own nnUNetTrainer, same plan and patch.

Both train the network of the model folder's plan on the same batches with the plan's optimiser
(nnU-Net's trainer always uses its SGD) (drawn and augmented by
spinelm's sampler from the preprocessing cache): nnU-Net's ``nnUNetTrainer.train_step`` with its
Dice+CE deep-supervision loss on the segmentation channels, spinelm's step with its multitask loss
(segmentation + heatmap heads). Data loading is timed separately for spinelm. One run, ratio printed.
spinelm's step is timed twice: in float32 like nnU-Net's on the CPU (same arithmetic), and with
the precision ``spinelm train`` picks by default (bfloat16 + channels-last on a CPU with bfloat16
instructions, float16 AMP on CUDA).

Usage: python scripts/bench_training.py MODEL_DIR [--device cpu|cuda] [--steps 20] [--warmup 3]
(MODEL_DIR planned and preprocessed: spinelm plan + spinelm preprocess)
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    from spinelm.data import PatchSampler
    from spinelm.losses import MultiTaskLoss
    from spinelm.network import build_network, deep_supervision_scales
    from spinelm.nnunet import nnunet_environment, plans_dataset_json, plans_view
    from spinelm.plans import ModelFolder
    from spinelm.training import make_optimizer, resolve_precision, train_step

    model = Path(args.model)
    plans = ModelFolder(model).plans
    cfg = plans.raw["configurations"]["fine"]
    cache = ModelFolder(model).cache_dir()
    cases = json.loads((cache / "cache.json").read_text())["cases"]
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    sampler = PatchSampler(cache, cases, plans, augment=True)
    rng = np.random.default_rng(0)
    n = args.warmup + args.steps
    t0 = time.perf_counter()
    batches = [sampler.batch(rng, cfg["batch_size"]) for _ in range(n)]
    t_data = (time.perf_counter() - t0) / n
    scales = deep_supervision_scales(plans)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

    # nnU-Net v2's own trainer
    fp = {"spacings": [], "shapes_after_crop": [], "foreground_intensity_properties_per_channel":
          plans.raw["foreground_intensity_properties_per_channel"], "median_relative_size_after_cropping": 1.0}
    with nnunet_environment(plans_dataset_json(plans), fp) as name:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        # initialize() only looks at the preprocessed folder to pick its dataset class; batches come from spinelm
        folder = Path(os.environ["nnUNet_preprocessed"]) / name / cfg["data_identifier"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "unused.npz").touch()
        trainer = nnUNetTrainer(dict(plans_view(plans), continue_training=False), "fine", 0,
                                plans_dataset_json(plans), device)
        trainer.print_to_log_file = lambda *a, **k: None
        trainer.initialize()
        times = []
        for i, b in enumerate(batches):
            seg = b["seg"].float()
            seg[seg >= plans.heads["segmentation"].channels] = 0
            target = [seg if s == [1, 1, 1] else F.interpolate(seg, scale_factor=s, mode="nearest-exact") for s in scales]
            sync()
            t = time.perf_counter()
            trainer.train_step({"data": b["image"], "target": target})
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        t_nnunet = float(np.median(times))

    # spinelm's step, in float32 and in the default precision
    def spinelm_step_time(precision: str) -> float:
        torch.manual_seed(0)
        dtype, channels_last = resolve_precision(precision, device)
        net = build_network(plans).to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last_3d)
        loss_fn = MultiTaskLoss(plans.head_dict, plans.configuration().n_stages)
        opt = make_optimizer(net, plans.training.get("optimizer", "sgd"), plans.training["initial_lr"])
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        times = []
        for i, b in enumerate(batches):
            sync()
            t = time.perf_counter()
            train_step(net, opt, scaler, loss_fn, b, device, dtype, channels_last)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        return float(np.median(times))

    t_fp32 = spinelm_step_time("fp32") if device.type == "cpu" else None
    dtype, channels_last = resolve_precision("auto", device)
    auto_name = (str(dtype).replace("torch.", "") if dtype else "float32") + (" + channels-last" if channels_last else "")
    t_spine = spinelm_step_time("auto")
    print(f"plan {model / 'plans.json'}: patch {cfg['patch_size']}, batch {cfg['batch_size']}, "
          f"device {device}, {args.steps} timed steps")
    print(f"nnunetv2 nnUNetTrainer.train_step: {t_nnunet:.3f} s/it ({1 / t_nnunet:.2f} it/s)")
    if t_fp32 is not None:
        print(f"spinelm train step, float32:       {t_fp32:.3f} s/it ({1 / t_fp32:.2f} it/s)")
    print(f"spinelm train step, default ({auto_name}): {t_spine:.3f} s/it ({1 / t_spine:.2f} it/s)")
    print(f"spinelm data (sample + augment):   {t_data:.3f} s/batch, in the training process")
    if t_fp32 is not None:
        print(f"ratio spinelm/nnunetv2 iterations per second, both float32 (step only): {t_nnunet / t_fp32:.2f}")
    print(f"ratio spinelm (default precision)/nnunetv2 (step only):                 {t_nnunet / t_spine:.2f}")
    print(f"ratio with spinelm's in-process data loading:                          "
          f"{t_nnunet / (t_spine + t_data):.2f}")


if __name__ == "__main__":
    main()
