"""How fast the classification head learns when it trains alone: the plan's fine encoder and class
head, trained on the class-balanced masked vertebra crops of a model's training fold only (no
segmentation or heatmap loss), with AdamW at one rate for the encoder and another for the head.
Prints the mean class loss of every 100 steps; ln(number of classes) is a uniform output.

    python scripts/class_head_alone.py MODEL_DIR [--steps 1000] [--lr 3e-3] [--head-lr 3e-4]
        [--batch 2] [--fold 0] [--seed 0]

MODEL_DIR is a trained (or at least preprocessed) spinelm model folder whose plan has a
``classification`` field. CPU, float32.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-3, help="the encoder's rate (the CPU preset's is 3e-3)")
    p.add_argument("--head-lr", type=float, default=None, help="the head's rate (default: the plan's lr_factor x --lr)")
    p.add_argument("--batch", type=int, default=2, help="crops per step (the plan's is 2)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from spinelm.classification import HEAD_LR_FACTOR, ClassCropSampler, class_logits, soft_cross_entropy
    from spinelm.network import build_network
    from spinelm.plans import ModelFolder

    model = ModelFolder(Path(args.model))
    plans = model.plans
    if plans.classification is None:
        raise SystemExit(f"{args.model}: the plan has no classification head")
    head_lr = args.head_lr if args.head_lr is not None else args.lr * float(
        plans.classification.get("lr_factor", HEAD_LR_FACTOR))
    split = json.loads(model.splits_path.read_text())[args.fold]
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    net = build_network(plans)
    sampler = ClassCropSampler(model.cache_dir(), split["train"], plans, augment=True)
    opt = torch.optim.AdamW([{"params": list(net.encoder.parameters()), "lr": args.lr},
                             {"params": list(net.class_head.parameters()), "lr": head_lr}], weight_decay=1e-4)
    print(f"{len(sampler)} training vertebrae; encoder rate {args.lr:g}, head rate {head_lr:g}, {args.batch} crops "
          f"per step; uniform output: {np.log(len(sampler.names)):.3f}")
    net.train()
    losses, t0 = [], time.perf_counter()
    for i in range(args.steps):
        b = sampler.batch(rng, args.batch)
        loss = soft_cross_entropy(class_logits(net, b["class_image"]), b["class_target"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (i + 1) % 100 == 0:
            print(f"step {i + 1}: class loss {np.mean(losses[-100:]):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
