"""The network: nnU-Net's U-Net from the plan, one output tensor split into named heads.

Heads are plan fields (``plans["heads"]``, in order): ``segmentation`` (background + one channel
per vertebra label), ``heatmap`` (centroid heatmaps), and later others (auxiliary structures) plug
in by adding an entry with its channel count; no new network or trainer class. The per-vertebra
classification head (``plans["classification"]``) is a module of the fine network fed by its encoder
(:mod:`spinelm.classification`).
No SimpleITK here: this module runs on training machines.
"""
from __future__ import annotations

import torch


def head_slices(heads: dict) -> dict[str, slice]:
    """Channel range of every head in the network output, in plan order."""
    out, start = {}, 0
    for name, head in heads.items():
        out[name] = slice(start, start + int(head["channels"]))
        start += int(head["channels"])
    return out


def build_network(plans, deep_supervision: bool = True, configuration: str = "fine") -> torch.nn.Module:
    """The U-Net (PlainConvUNet or ResidualEncoderUNet) of a configuration of the plan, with all heads' channels."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from spinelm.plans import as_plans

    plans = as_plans(plans)
    arch = plans.configuration(configuration).architecture
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                 plans.n_channels, plans.n_outputs, allow_init=True,
                                 deep_supervision=deep_supervision)
    if plans.classification is not None and configuration == "fine":
        from spinelm.classification import attach_head

        attach_head(net, plans.classification)  # per-vertebra classes through the shared encoder
    if plans.identification is not None and configuration == "coarse":
        from spinelm.identification import attach_level_head

        attach_level_head(net, plans.identification)  # each vertebra's level from a crop around it
    return net


def split_heads(output: torch.Tensor, heads: dict) -> dict[str, torch.Tensor]:
    """``{head: output[:, channels]}`` for one output tensor (B, C, X, Y, Z)."""
    return {name: output[:, sl] for name, sl in head_slices(heads).items()}


def deep_supervision_scales(plans) -> list[list[float]]:
    """Relative size of every deep-supervision output (nnU-Net's rule: cumulative pooling, last dropped)."""
    import numpy as np

    from spinelm.plans import as_plans

    strides = as_plans(plans).configuration().strides
    return [list(s) for s in (1 / np.cumprod(np.vstack(strides), axis=0))[:-1]]
