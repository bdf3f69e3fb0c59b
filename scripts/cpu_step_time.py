"""Seconds per training step (forward + backward + SGD) of small PlainConvUNets on this machine.

The ``cpu_seconds_per_mvoxel`` of ``plans/cpu.json`` comes from this measurement:
    python scripts/cpu_step_time.py --threads 2
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()

    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.set_num_threads(args.threads)
    for base, max_f, patch, stages in [(8, 128, 64, 5), (16, 128, 64, 5), (8, 128, 96, 5)]:
        net = PlainConvUNet(1, stages, [min(base * 2 ** i, max_f) for i in range(stages)], torch.nn.Conv3d, 3,
                            [1] + [2] * (stages - 1), [2] * stages, 30, [2] * (stages - 1), True,
                            torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                            {"inplace": True}, deep_supervision=True)
        opt = torch.optim.SGD(net.parameters(), 0.01, momentum=0.99, nesterov=True)
        x = torch.randn(2, 1, patch, patch, patch)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            loss = sum(o.mean() for o in net(x))
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        best = min(times[1:])
        print(f"features {base}-{max_f}, patch {patch}^3, batch 2: {best:.2f} s/step, "
              f"{best / (2 * patch ** 3 / 1e6):.2f} s per million batch voxels")


if __name__ == "__main__":
    main()
