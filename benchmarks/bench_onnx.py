"""The onnxruntime backend against the torch backend: the same masks, and seconds per volume.

Both run through the same prediction pipeline (``Segmenter`` -> ``predict_case`` -> ``SliceRunner``):
the torch backend is ``build_model(model_type)`` (fast path, lite prefix cache), the onnx backend the
files of ``medsegx export --format onnx`` (``--onnx_dir``; exported here first when the folder is
absent). Printed:

1. the shared CT (``ct_abdomen_small.nii.gz``, 30 slices) with boxes from its label for four organs
   (liver, spleen, both kidneys): the 3-D DSC between the two backends' label maps per object;
2. the real slices of ``MedSegDB-real/eval/ID`` (boxes from their labels, each slice's own modality
   and task): the DSC between the backends per slice and object;
3. seconds per volume (``predict_case``) of the CT with the liver alone, the backends alternating
   (torch, onnx, torch, onnx, ...) for ``--rounds`` rounds, and their ratio.

    OMP_NUM_THREADS=1 python benchmarks/bench_onnx.py --onnx_dir /tmp/lite_onnx     # lite, ~10 min
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_header, pin_threads_from_argv  # noqa: E402

pin_threads_from_argv()

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from medsegx.inference.segmenter import Segmenter  # noqa: E402
from medsegx.metrics import dice  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
ORGANS = "5:Liver,1:Spleen,2:RightKidney,3:LeftKidney"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_type", default="lite")
    p.add_argument("--onnx_dir", type=Path, required=True, help="an export folder (written here when absent)")
    p.add_argument("--rounds", type=int, default=2, help="alternating timing rounds of the liver CT")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--skip", nargs="*", default=[], choices=["ct", "slices", "timing"])
    return p


def _dsc(a: np.ndarray, b: np.ndarray) -> float:
    if not a.any() and not b.any():
        return 1.0
    return float(dice(a[None], b[None], spatial_dims=a.ndim)[0])


def ct_parity(segs: dict[str, Segmenter]) -> list[float]:
    ct, label = SHARED / "volumes" / "ct_abdomen_small.nii.gz", SHARED / "volumes" / "ct_abdomen_small_label.nii.gz"
    out = {}
    for name, seg in segs.items():
        pred = seg.segment_file(ct, modality="CT", prompt_mask=label, labels_map=ORGANS)
        out[name] = pred
        print(f"CT, four organs, {name}: {pred.seconds:.1f} s ({sum(len(r) for r in pred.results)} slice-objects)",
              flush=True)
    scores = []
    for obj in out["torch"].objects:
        a, b = out["torch"].array == obj.label, out["onnx"].array == obj.label
        scores.append(_dsc(a, b))
        print(f"CT {obj.context.task:<12} label {obj.label}: DSC torch vs onnx {scores[-1]:.5f} "
              f"({a.sum()} / {b.sum()} voxels, {(a != b).sum()} differ)", flush=True)
    return scores


def slice_parity(segs: dict[str, Segmenter]) -> list[float]:
    root = SHARED / "MedSegDB-real" / "eval" / "ID"
    scores = []
    for path in sorted(root.glob("*/*/npy_imgs/*.npy")):
        modality, task = path.parents[1].name.split("_", 1)
        image = np.load(path)
        label = (np.load(str(path).replace("npy_imgs", "npy_gts")) > 0).astype(np.uint8)
        if not label.any():
            continue
        masks = {name: seg.segment(image, modality=modality, task=task, prompt_mask=label) > 0
                 for name, seg in segs.items()}
        scores.append(_dsc(masks["torch"], masks["onnx"]))
        print(f"{path.relative_to(root)}: DSC torch vs onnx {scores[-1]:.5f} "
              f"({(masks['torch'] != masks['onnx']).sum()} of {masks['torch'].sum()} px differ)", flush=True)
    return scores


def timing(segs: dict[str, Segmenter], rounds: int) -> None:
    ct, label = SHARED / "volumes" / "ct_abdomen_small.nii.gz", SHARED / "volumes" / "ct_abdomen_small_label.nii.gz"
    times: dict[str, list[float]] = {name: [] for name in segs}
    cpu: dict[str, list[float]] = {name: [] for name in segs}
    for r in range(rounds):
        for name, seg in segs.items():
            c0 = time.process_time()
            pred = seg.segment_file(ct, modality="CT", prompt_mask=label, labels_map="5:Liver")
            times[name].append(pred.seconds)
            cpu[name].append(time.process_time() - c0)
            print(f"#   round {r + 1} {name:<6} {pred.seconds:6.1f} s (CPU {cpu[name][-1]:.1f} s)", flush=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name in segs:
        print(f"seconds per volume (CT, liver, 30 slices), {name:<6}: {med[name]:6.1f} s wall, "
              f"{statistics.median(cpu[name]):6.1f} s CPU  (x{med['torch'] / med[name]:.2f} vs torch)", flush=True)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    print(machine_header(), flush=True)
    print(f"# load average at start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}", flush=True)
    if not args.onnx_dir.exists():
        from medsegx.model import build_model
        from medsegx.model.onnx_export import export_onnx

        t0 = time.perf_counter()
        export_onnx(build_model(args.model_type), args.onnx_dir, source={"model_type": args.model_type})
        print(f"# exported {args.model_type} into {args.onnx_dir} in {time.perf_counter() - t0:.0f} s", flush=True)
    segs = {"torch": Segmenter.load(args.model_type, device="cpu", batch_size=args.batch_size),
            "onnx": Segmenter.load(args.model_type, backend="onnx", onnx_dir=args.onnx_dir, device="cpu",
                                   batch_size=args.batch_size, threads=args.threads)}
    results = {}
    if "ct" not in args.skip:
        results["CT objects"] = ct_parity(segs)
    if "slices" not in args.skip:
        results["real slices"] = slice_parity(segs)
    for what, scores in results.items():
        print(f"{what}: {len(scores)}, smallest DSC torch vs onnx {min(scores):.5f}, mean {np.mean(scores):.5f}, "
              f"below 0.995: {sum(s < 0.995 for s in scores)}", flush=True)
    if "timing" not in args.skip:
        timing(segs, args.rounds)
    print(f"# load average at end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
