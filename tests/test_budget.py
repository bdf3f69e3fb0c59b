"""The measured compute budget: real step timing (cached per machine) and a plan fitted to it."""
from __future__ import annotations

import numpy as np

from spinelm import budget as B
from spinelm.planning import BUDGET_USABLE_SHARE

from tests.test_planning import _fingerprint


def _measure_at(seconds_per_mvoxel: float, calls: list):
    """A stand-in for :func:`measure_step`: a step costs ``seconds_per_mvoxel`` per million batch voxels."""
    def measure(plans, device, precision, configuration="fine"):
        cfg = plans["configurations"][configuration]
        vox = int(cfg["batch_size"] * np.prod(cfg["patch_size"]))
        calls.append(cfg["patch_size"])
        return {"seconds_per_step": seconds_per_mvoxel * vox / 1e6, "seconds_per_mvoxel": seconds_per_mvoxel,
                "batch_voxels": vox, "precision": "float32", "cached": False,
                "machine": {"threads": 2, "name": "test CPU"}}
    return measure


def test_a_slower_measured_step_gives_a_smaller_patch_that_buys_the_required_steps():
    fp = _fingerprint([[1.0, 1.0, 1.0]] * 8, [[300, 300, 300]] * 8)
    fast_calls, slow_calls = [], []
    fast = B.plan_within_budget(fp, device="cpu", time_budget_min=20, measure=_measure_at(0.5, fast_calls))
    slow = B.plan_within_budget(fp, device="cpu", time_budget_min=20, measure=_measure_at(3.0, slow_calls))
    pf, ps = (np.prod(p["configurations"]["fine"]["patch_size"]) for p in (fast, slow))
    assert ps < pf
    for plans in (fast, slow):
        b = plans["budget"]
        assert b["required_steps"] == B.CPU_REQUIRED_STEPS == 3000
        assert b["affordable_steps"] >= B.STEPS_TOLERANCE * b["required_steps"]
        shares = b["stage_shares"]
        assert abs(sum(shares.values()) - 1) < 1e-3 and shares.get("coarse", 0) <= B.COARSE_MAX_SHARE
        assert set(shares) == set(plans["configurations"])
        assert b["affordable_steps"] == int(20 * shares["fine"] * 60 * BUDGET_USABLE_SHARE
                                            / b["measured_step"]["seconds_per_step"])
        assert any("measured training step of this plan" in r for r in plans["rationale"])
    assert len(slow_calls) > 1  # re-planned and measured again


def test_no_budget_no_measurement():
    calls = []
    plans = B.plan_within_budget(_fingerprint([[1.0, 1.0, 1.0]] * 4, [[200, 150, 150]] * 4), device="cuda",
                                 gpu_memory_gb=24, measure=_measure_at(1.0, calls))
    assert calls == [] and "measured_step" not in plans["budget"]


def test_real_step_is_timed_on_this_machine_and_cached(phantom_dataset):
    from spinelm.fingerprint import compute_fingerprint
    from spinelm.planning import plan

    plans = plan(compute_fingerprint(phantom_dataset, num_workers=0, progress=False), device="cpu",
                 time_budget_min=2)
    first = B.measure_step(plans, "cpu", "fp32")
    again = B.measure_step(plans, "cpu", "fp32")
    assert first["seconds_per_step"] > 0 and not first["cached"] and first["precision"] == "float32"
    assert again["cached"] and again["seconds_per_step"] == first["seconds_per_step"]
    assert first["machine"]["threads"] >= 1 and first["machine"]["name"]
    assert (B.cache_dir() / "step_times.json").is_file()


def test_a_coarse_stage_too_slow_for_its_steps_gets_a_capped_patch():
    """A whole-body field of view (1 m of column): the coarse patch that holds it would buy a few dozen
    steps; the plan caps it so that its required steps fit its share of the budget."""
    fp = _fingerprint([[3.0, 2.23, 2.23]] * 8, [[330, 175, 226]] * 8, distance=24.0)
    calls = []
    plans = B.plan_within_budget(fp, device="cpu", time_budget_min=20, measure=_measure_at(3.0, calls))
    assert "coarse" in plans["configurations"]
    b = plans["budget"]
    assert b["affordable_steps_coarse"] >= B.STEPS_TOLERANCE * B.COARSE_REQUIRED_STEPS
    assert b["stage_shares"]["coarse"] <= B.COARSE_MAX_SHARE + 1e-6
    assert any("coarse patch capped" in r for r in plans["rationale"])


def test_a_capped_plan_that_buys_far_more_steps_than_needed_grows_its_patch():
    """Small patches cost less per voxel than the uncapped one the first cap was computed from: the
    plan is made once more with the capped patch's own cost, and the larger patch kept if it fits."""
    def measure_growing(calls):
        def measure(plans, device, precision, configuration="fine"):
            cfg = plans["configurations"][configuration]
            vox = int(cfg["batch_size"] * np.prod(cfg["patch_size"]))
            spmv = 0.5 + 2.5 * min(vox / 2e6, 1.0)  # dearer per voxel as the patch grows
            calls.append(cfg["patch_size"])
            return {"seconds_per_step": spmv * vox / 1e6, "seconds_per_mvoxel": spmv, "batch_voxels": vox,
                    "precision": "float32", "cached": False, "machine": {"threads": 2, "name": "test CPU"}}
        return measure

    fp = _fingerprint([[1.0, 1.0, 1.0]] * 8, [[300, 300, 300]] * 8)
    shrink_only = B.plan_within_budget(fp, device="cpu", time_budget_min=20, measure=measure_growing([]), grow=False)
    grown = B.plan_within_budget(fp, device="cpu", time_budget_min=20, measure=measure_growing([]))
    vox = [np.prod(p["configurations"]["fine"]["patch_size"]) for p in (shrink_only, grown)]
    assert shrink_only["budget"]["affordable_steps"] > B.GROW_MARGIN * shrink_only["budget"]["required_steps"]
    assert vox[1] > vox[0]
    assert grown["budget"]["affordable_steps"] >= B.STEPS_TOLERANCE * grown["budget"]["required_steps"]
