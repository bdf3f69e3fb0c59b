"""Seconds per case and peak memory of ``spinelm predict`` against nnunetv2's predictor.

Both run the same trained network (one fold of a spinelm model folder) on the same files, one
process per tool and volume so that peak memory (max RSS) is each run's own. Each side does its
whole job for a case: read the file, preprocess (nnunetv2's preprocessor in both), sliding window
with Gaussian weighting and step 0.5, no mirroring, and write its outputs. nnunetv2's predictor
writes a segmentation after resampling all output channels back to the input grid; spinelm
decodes and orders the centroids and writes its five outputs (centroids in three formats,
instance mask, QC picture). For nnunetv2 the heatmap channel is declared as one more label (its
predictor allocates one output channel per label).

Volumes: real lumbar MR scans from ``../shared/data/lumbar-mr`` (skipped when absent) and a
synthetic CT-sized volume of 512 x 512 x 300 voxels (0.78 x 0.78 x 1.5 mm), a phantom resampled
onto that grid.

    python scripts/bench_predict.py MODEL_DIR [--fold 0] [--threads 2] [--cases 3]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPINELM_DATA", REPO.parent / "shared" / "data"))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_spinelm(model: Path, fold: int, image: Path, out: Path) -> dict:
    from spinelm.inference import Predictor
    from spinelm.io.outputs import write_case_outputs
    from spinelm.io.scan import read_scan

    predictor = Predictor.from_model_folder(model, folds=[fold])
    t0 = time.perf_counter()
    img, geom, original = read_scan([image])
    result = predictor.predict_array(img, geom)
    case = image.name.split(".")[0]
    write_case_outputs(out, case, result, img, geom, original, [image], {"model": predictor.describe()})
    return {"seconds": time.perf_counter() - t0, "n_vertebrae": len(result.landmarks)}


def run_nnunet(model: Path, fold: int, image: Path, out: Path) -> dict:
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from spinelm import labels as L
    from spinelm.network import build_network
    from spinelm.nnunet import plans_view
    from spinelm.plans import ModelFolder

    plans = ModelFolder(model).plans
    seg_labels = list(plans.heads["segmentation"].labels)
    dataset_json = {"channel_names": plans.channel_names, "file_ending": ".nii.gz", "numTraining": 0,
                    "labels": {"background": 0, **{L.name_of(x): i for i, x in enumerate(seg_labels, 1)},
                               "heatmap": len(seg_labels) + 1}}
    pm = PlansManager(plans_view(plans))
    cm = pm.get_configuration("fine")
    net = build_network(plans, deep_supervision=False)
    state = torch.load(model / f"fold_{fold}" / "checkpoint_final.pt", map_location="cpu", weights_only=True)["network"]
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(net, pm, cm, [state], dataset_json, "nnUNetTrainer", None)
    t0 = time.perf_counter()
    io = SimpleITKIO()
    data, props = io.read_images([str(image)])
    seg = predictor.predict_single_npy_array(data, props, None, None, False)
    io.write_seg(seg, str(out / f"{image.name.split('.')[0]}_nnunet.nii.gz"), props)
    return {"seconds": time.perf_counter() - t0}


def make_ct_sized_volume(path: Path) -> Path:
    """A CT phantom resampled onto a 512 x 512 x 300 grid (0.78 x 0.78 x 1.5 mm)."""
    import SimpleITK as sitk

    from spinelm.synthetic import PhantomConfig, make_phantom

    if path.is_file():
        return path
    ph = make_phantom(5, 0, PhantomConfig(modality="CT", min_vertebrae=10, max_vertebrae=10, p_oblique=0.0))
    src = ph.image
    ref = sitk.Image([512, 512, 300], sitk.sitkInt16)
    ref.SetSpacing((0.78, 0.78, 1.5))
    centre = src.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in src.GetSize()])
    ref.SetOrigin(tuple(c - 0.5 * (n - 1) * sp for c, n, sp in zip(centre, (512, 512, 300), (0.78, 0.78, 1.5))))
    img = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkInt16)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)
    return path


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fn = run_spinelm if args.tool == "spinelm" else run_nnunet
    r = fn(Path(args.model), args.fold, Path(args.image), out)
    r["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(r))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="trained spinelm model folder")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", type=int, default=3, help="lumbar MR scans to time (default 3)")
    p.add_argument("--work", default="/tmp/spinelm_bench_predict", help="scratch folder")
    p.add_argument("--no-ct", action="store_true", help="skip the 512x512x300 volume")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tool", help=argparse.SUPPRESS)
    p.add_argument("--image", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    work = Path(args.work)
    images = sorted((DATA / "lumbar-mr" / "imagesTr").glob("*_0000.nii.gz"))[: args.cases]
    if not images:
        print(f"no lumbar MR scans under {DATA}; timing the CT-sized volume only")
    if not args.no_ct:
        images.append(make_ct_sized_volume(work / "ct512x512x300_0000.nii.gz"))
    rows = []
    for image in images:
        res = {}
        for tool in ("nnunetv2", "spinelm"):
            cmd = [sys.executable, __file__, args.model, "--child", "--tool", tool, "--image", str(image),
                   "--out", str(work / tool), "--fold", str(args.fold), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(f"{tool} failed on {image}:\n{proc.stderr[-3000:]}")
            res[tool] = json.loads(line[0][7:])
        rows.append((image.name, res))
        s, n = res["spinelm"], res["nnunetv2"]
        print(f"{image.name:<32} nnunetv2 {n['seconds']:7.1f} s {n['peak_rss_mb']:7.0f} MB | spinelm "
              f"{s['seconds']:7.1f} s {s['peak_rss_mb']:7.0f} MB | ratio time {s['seconds'] / n['seconds']:.2f}, "
              f"memory {s['peak_rss_mb'] / n['peak_rss_mb']:.2f}", flush=True)
    print(json.dumps([{"image": name, **res} for name, res in rows], indent=1))


if __name__ == "__main__":
    main()
