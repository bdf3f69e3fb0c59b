"""Losses: nnU-Net's Dice + CE for the segmentation head, a foreground-weighted L2 for heatmaps,
both with nnU-Net's deep-supervision weighting. No SimpleITK here."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from spinelm.network import split_heads

#: Heatmap voxels above this target value form the foreground of the balanced L2 (a ball of about
#: 2 sigma around each centroid).
HEATMAP_FOREGROUND_THRESHOLD = 0.1


#: Configurations whose training step includes the auxiliary heads. Not the coarse stage: with both
#: auxiliary heads trained in both stages (classification phantoms, 20 float32 minutes), the coarse
#: stage's step grew and its own identification fell from 0.863 to 0.745, and the fine stage, which
#: takes its labels from it, ended at 0.839 instead of 0.896.
AUXILIARY_CONFIGURATIONS = ("fine",)


def hide_blocks(images: torch.Tensor, ratio: float, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images with hidden blocks set to 0 (the normalised mean), hidden (B, 1, X, Y, Z) bool)``: cubic
    blocks of edge ``block`` voxels on a grid, each hidden with probability ``ratio``, drawn per image
    from torch's generator (so a resumed run draws the same)."""
    b, _, *shape = images.shape
    grid = [max(1, -(-int(s) // block)) for s in shape]
    hidden = torch.rand(b, 1, *grid) < ratio
    for ax in range(3):
        hidden = hidden.repeat_interleave(block, dim=2 + ax)
    hidden = hidden[:, :, : shape[0], : shape[1], : shape[2]].to(images.device)
    return images.masked_fill(hidden, 0.0), hidden


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's: 1, 1/2, 1/4, ... with the lowest resolution unused, normalised to sum 1."""
    w = [1 / (2 ** i) for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    s = sum(w)
    return [x / s for x in w]


def heatmap_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Balanced L2: mean squared error over the foreground plus mean squared error over the rest.

    Centroid heatmaps cover about 0.1 % of a patch; a plain (or mildly weighted) L2 is minimised by
    predicting zero everywhere, which is what small networks learn first and stay at under a CPU
    budget (measured: peak output 0.02 after 400 steps). Averaging the two regions separately makes
    the zero map cost about as much as an all-background error. ``valid`` (broadcastable bool): the voxels
    whose target is known; the others do not count.
    """
    err = (pred.float() - target) ** 2
    fg = target > HEATMAP_FOREGROUND_THRESHOLD
    bg = ~fg
    if valid is not None:
        valid = valid.expand_as(err)
        fg, bg = fg & valid, bg & valid
    loss = err[bg].mean() if bool(bg.any()) else err.new_zeros(())
    if bool(fg.any()):
        loss = loss + err[fg].mean()
    return loss


class MultiTaskLoss(torch.nn.Module):
    """Deep-supervised sum of the heads' losses.

    The segmentation target uses ``ignore_label`` (= number of segmentation channels) for voxels
    and whole cases without a mask, so centroid-only cases train the heatmap alone.

    ``auxiliary``: train the auxiliary heads (structures, reconstruction) when the plan has them. Off
    for the coarse identification stage (:data:`AUXILIARY_CONFIGURATIONS`).
    """

    def __init__(self, heads: dict, n_outputs: int, auxiliary: bool = True):
        super().__init__()
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        self.heads = heads
        self.weights = deep_supervision_weights(n_outputs)
        self.has_seg = "segmentation" in heads
        self.ignore_label = int(heads["segmentation"]["channels"]) if self.has_seg else None
        if self.has_seg:
            self.seg_loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                                           weight_ce=1, weight_dice=1, ignore_label=self.ignore_label,
                                           dice_class=MemoryEfficientSoftDiceLoss)
        self.has_structures = auxiliary and "structures" in heads
        if self.has_structures:  # auxiliary: discs, endplates, canal, cord where a case annotates them
            self.structures_ignore = int(heads["structures"]["channels"])
            self.structures_weight = float(heads["structures"].get("loss_weight", 0.5))
            self.structures_loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
                                                  {}, weight_ce=1, weight_dice=1, ignore_label=self.structures_ignore,
                                                  dice_class=MemoryEfficientSoftDiceLoss)
        rec = heads.get("reconstruction") if auxiliary else None
        self.has_reconstruction = rec is not None
        if rec is not None:  # auxiliary: fill in the hidden blocks of the input (spinelm.losses.hide_blocks)
            self.reconstruction_weight = float(rec.get("loss_weight", 1.0))
            self.mask_ratio = float(rec.get("mask_ratio", 0.15))
            self.block = int(rec.get("block", 8))

    def forward(self, outputs: list[torch.Tensor], seg: torch.Tensor | None,
                heatmap: torch.Tensor, structures: torch.Tensor | None = None, image: torch.Tensor | None = None,
                hidden: torch.Tensor | None = None, heatmap_known: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """``outputs``: network outputs, full resolution first; ``seg`` (B, 1, ...) long; ``heatmap`` (B, C, ...);
        ``structures`` (B, 1, ...) long: the structures head's target, when the plan has one; ``image`` (the
        input before hiding) and ``hidden`` (B, 1, ...) bool: the reconstruction head's target, scored on the
        hidden voxels of the full-resolution output only. ``heatmap_known`` (B,) bool: the patches whose case
        says where its centroids are (boxes and scribbles alone do not); in the others the heatmap learns only
        from the voxels the segmentation target calls background."""
        known = None if heatmap_known is None or bool(heatmap_known.all()) else heatmap_known.to(heatmap.device)
        total = outputs[0].new_zeros((), dtype=torch.float32)
        parts = {"seg": 0.0, "heatmap": 0.0, "structures": 0.0, "reconstruction": 0.0}
        if self.has_reconstruction and image is not None and hidden is not None and bool(hidden.any()):
            rec = split_heads(outputs[0], self.heads)["reconstruction"].float()
            err = ((rec - image.float()) ** 2) * hidden
            l_rec = err.sum() / (hidden.sum() * image.shape[1]).clamp(min=1)
            total = total + self.reconstruction_weight * l_rec
            parts["reconstruction"] = float(l_rec.detach())
        for w, out in zip(self.weights, outputs):
            if w == 0:
                continue
            heads = split_heads(out, self.heads)
            size = out.shape[2:]
            hm_t = heatmap if heatmap.shape[2:] == size else F.interpolate(heatmap, size=size, mode="trilinear",
                                                                          align_corners=False)
            seg_t = None
            if self.has_seg and seg is not None:
                seg_t = seg if seg.shape[2:] == size else F.interpolate(seg.float(), size=size, mode="nearest-exact").long()
            valid = None
            if known is not None:
                valid = known.view(-1, *([1] * (hm_t.dim() - 1)))
                valid = valid | (seg_t == 0) if seg_t is not None else valid.expand(-1, 1, *size)
            l_hm = heatmap_loss(heads["heatmap"], hm_t, valid)
            total = total + w * l_hm
            parts["heatmap"] += w * float(l_hm.detach())
            if seg_t is not None:
                if bool((seg_t != self.ignore_label).any()):
                    l_seg = self.seg_loss(heads["segmentation"], seg_t)
                    total = total + w * l_seg
                    parts["seg"] += w * float(l_seg.detach())
            if self.has_structures and structures is not None:
                st_t = structures if structures.shape[2:] == size else \
                    F.interpolate(structures.float(), size=size, mode="nearest-exact").long()
                if bool((st_t != self.structures_ignore).any()):
                    l_st = self.structures_loss(heads["structures"], st_t)
                    total = total + w * self.structures_weight * l_st
                    parts["structures"] += w * float(l_st.detach())
        return total, parts
