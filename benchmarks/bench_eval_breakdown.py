"""Where the whole-process time of ``evaluate_internal.py`` goes: start-up, the SAM file, model build, loop, reports.

Inputs (made once in ``--work_dir`` with :mod:`bench_eval`'s helpers): a phantom MedSegDB ``eval/ID`` of
``--n_slices`` slices, a random full-size SAM ViT-B file in Meta's layout (``SAM/sam_vit_b_01ec64.pth``,
375 MB) and, unless ``--no_weight``, a random MedSegX checkpoint (``medsegx_vit_b.pth``: every trained tensor
drawn at random, seed 1), so that every number the run reports comes from the files.

Each run is a fresh process. ``--mode plain`` runs the real script exactly as a user would::

    OMP_NUM_THREADS=1 python evaluate_internal.py --checkpoint <dir>/SAM --model_type vit_b \
        --model_weight <dir>/medsegx_vit_b.pth --data_path <dir>/db/eval/ID --device_ids \
        --num_workers 0 --batch_size 8 --threads 1 --output_dir <dir>/out

and gives the whole-process wall clock and CPU time (``RUSAGE_CHILDREN``). ``--mode parts`` runs the same
command through this file's ``--child``, which wraps the functions the run goes through with an exclusive
timer (a stack: time is charged to the innermost part) on both clocks, wall and process CPU; interpreter
start (process spawn to the child's first line) and exit (its last line to the parent seeing it exit) come
from the parent's clock (``time.monotonic``, one clock for both processes). Both modes check that the
report ``internal/ID.csv`` is byte-identical across runs and print its SHA-256 (to compare commits).

    python benchmarks/bench_eval_breakdown.py --work_dir /tmp/ev23 --mode both --repeats 3
    git archive <commit> | tar -x -C /tmp/before       # then the breakdown of both, alternating:
    python benchmarks/bench_eval_breakdown.py --work_dir /tmp/ev23 --baseline_root /tmp/before --repeats 3
"""
from __future__ import annotations

import time

_T_CHILD_START = time.monotonic()  # the child's first line: before any import of ours

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "evaluate_internal.py"

# Parts in report order: (key, label). Keys are charged by the child's wrappers below.
PARTS = [
    ("start", "interpreter start (spawn to first line)"),
    ("imports", "imports (evaluate_internal, the recipe and what it imports)"),
    ("args", "argument parsing, recipe glue (rest of the run)"),
    ("setup", "runtime setup (logging, seed, threads, machine log)"),
    ("index", "indexing (open_catalog)"),
    ("read_sam", "read the 375 MB SAM file (torch.load)"),
    ("read_weight", "read the MedSegX file (torch.load)"),
    ("construct", "model build: construct the network (init)"),
    ("load_sam", "model build: SAM weights into it (remap, resize, copy)"),
    ("load_weight", "model build: MedSegX weights into it"),
    ("freeze", "model build: freeze policy"),
    ("build_rest", "model build: rest (to(device), eval)"),
    ("data", "loop: read slices (dataset)"),
    ("forward", "loop: forward"),
    ("binarize", "loop: sigmoid > 0.5 (binarize)"),
    ("score", "loop: selection + DSC (score_multimask)"),
    ("hd95", "loop: HD95"),
    ("loop_rest", "loop: rest (loader, tqdm, result dicts, spacing)"),
    ("mpl_import", "figures: import matplotlib"),
    ("boxplot", "figures: DSC box plot PNG"),
    ("gallery", "figures: worst-slice gallery PNG"),
    ("reports", "reports: Markdown / CSV, atomic writes, run info"),
    ("exit", "interpreter exit (last line to process end)"),
]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", required=True, help="inputs are made here once and reused")
    p.add_argument("--n_slices", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mode", choices=["plain", "parts", "both"], default="both")
    p.add_argument("--no_weight", action="store_true", help="no --model_weight (adapters at zero)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baseline_root", help="a copy of another commit (git archive): its script and child alternate "
                   "with this tree's, as 'before' and 'after'")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more arguments for the script (last)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--parts_json", help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------- inputs


def prepare(work: Path, n_slices: int, weight: bool) -> tuple[Path, Path, Path | None]:
    """(eval/ID folder, SAM folder, MedSegX file or None), made once."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    from bench_eval import count_slices, make_phantom_id, write_random_sam

    id_dir = work / "db" / "eval" / "ID"
    if not id_dir.is_dir() or count_slices(id_dir) != n_slices:
        import shutil

        shutil.rmtree(work / "db", ignore_errors=True)
        make_phantom_id(work / "db", n_slices)
    write_random_sam(work / "SAM")
    path = work / "medsegx_vit_b.pth"
    if weight and not path.exists():
        import torch

        from medsegx.model.build import build_model
        from medsegx.model.checkpoint import medsegx_keys, save_checkpoint

        model = build_model("vit_b", checkpoint=work / "SAM")
        state = model.state_dict()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for key in medsegx_keys(model):
                t = state[key]
                if t.is_floating_point():
                    t.copy_(torch.randn(t.shape, generator=g) * (0.02 if "adapter" in key else 0.1) + t)
        save_checkpoint(path, model)
    return id_dir, work / "SAM", path if weight else None


def script_args(args: argparse.Namespace, id_dir: Path, sam: Path, weight: Path | None, out: Path) -> list[str]:
    return ["--checkpoint", str(sam), "--model_type", "vit_b", *(["--model_weight", str(weight)] if weight else []),
            "--data_path", str(id_dir), "--device_ids", "--num_workers", "0", "--batch_size", str(args.batch_size),
            "--threads", str(args.threads), "--output_dir", str(out), *args.extra]


# ----------------------------------------------------------------------------- the child: timed parts


class Timer:
    """Exclusive time per part on two clocks: a part's time excludes the parts it calls."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.stack: list[str] = []
        self.mark = (time.perf_counter(), time.process_time())

    def _charge(self) -> None:
        now = (time.perf_counter(), time.process_time())
        if self.stack:
            top = self.stack[-1]
            self.wall[top] = self.wall.get(top, 0.0) + now[0] - self.mark[0]
            self.cpu[top] = self.cpu.get(top, 0.0) + now[1] - self.mark[1]
        self.mark = now

    def push(self, key: str) -> None:
        self._charge()
        self.stack.append(key)

    def pop(self) -> None:
        self._charge()
        self.stack.pop()

    def wrap(self, owner, name: str, key, method: bool = False) -> None:
        """Replace ``owner.name`` by a timed call; ``key``: a part, or a function of the call's arguments."""
        fn = getattr(owner, name)

        def timed(*a, **kw):
            self.push(key(*a, **kw) if callable(key) else key)
            try:
                return fn(*a, **kw)
            finally:
                self.pop()

        setattr(owner, name, timed)


def child(args: argparse.Namespace, rest: list[str]) -> None:
    timer = Timer()
    timer.push("imports")
    sys.path.insert(0, str(ROOT))
    import importlib

    import evaluate_internal

    recipe = importlib.import_module(evaluate_internal.COMMAND.recipe.split(":")[0])
    timer.pop()
    timer.push("args")
    from medsegx import engine, reports, runtime
    from medsegx.data import dataset
    from medsegx.metrics import select
    from medsegx.model import build, checkpoint

    timer.wrap(runtime, "setup", "setup")
    timer.wrap(recipe, "open_catalog", "index")
    timer.wrap(checkpoint, "torch_load", lambda path, *a, **k: "read_sam" if "sam_vit" in str(path) else "read_weight")
    timer.wrap(build, "build_sam256", "construct")
    timer.wrap(checkpoint, "load_sam_checkpoint", "load_sam")
    timer.wrap(checkpoint, "load_medsegx_weights", "load_weight")
    timer.wrap(build, "apply_freeze_policy", "freeze")
    timer.wrap(recipe, "model_from_args", "build_rest")
    timer.wrap(recipe, "evaluate", "loop_rest")
    timer.wrap(dataset.MedSegDataset, "__getitem__", "data")
    timer.wrap(engine, "_forward", "forward")
    timer.wrap(engine, "binarize", "binarize")
    timer.wrap(engine, "score_multimask", "score")
    timer.wrap(select, "hd95", "hd95")
    timer.wrap(recipe.reports, "write_report", "reports")
    timer.wrap(runtime, "write_run_info", "reports")
    mpl_done = []

    def figure(key):
        def part(*a, **kw):
            if not mpl_done:  # the first figure pays matplotlib's import: a part of its own
                mpl_done.append(True)
                timer.push("mpl_import")
                import matplotlib
                matplotlib.use("Agg")
                import matplotlib.pyplot  # noqa: F401
                timer.pop()
            return key
        return part

    timer.wrap(reports, "plot_dsc_boxplot", figure("boxplot"))
    timer.wrap(reports, "plot_gallery", figure("gallery"))
    parsed = evaluate_internal.get_args_parser().parse_args(rest)
    evaluate_internal.main(parsed)
    timer.pop()
    if hasattr(evaluate_internal, "before_exit"):  # what the script does last, as in its __main__ block
        evaluate_internal.before_exit()
    out = {"start": _T_CHILD_START, "end": time.monotonic(), "wall": timer.wall, "cpu": timer.cpu}
    Path(args.parts_json).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- the parent


def run(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of the child, monotonic end) of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with log.open("w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=cwd).returncode
    end = time.monotonic()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}\n" + "\n".join(log.read_text().splitlines()[-25:]))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return end - t0, cpu, t0


def csv_digest(out: Path) -> str:
    return hashlib.sha256((out / "internal" / "ID.csv").read_bytes()).hexdigest()


def _table(rows: list[tuple[str, list[dict[str, float]], list[dict[str, float]]]]) -> None:
    """One column group per tree: median wall seconds of each part, its share, its CPU seconds."""
    head = " | ".join(f"{name} wall s | share | CPU s" for name, _, _ in rows)
    print(f"\n| part | {head} |\n|---|" + "---:|---:|---:|" * len(rows))
    cols = []
    for _, walls, cpus in rows:
        med_w = {k: statistics.median(p.get(k, 0.0) for p in walls) for k, _ in PARTS}
        med_c = {k: statistics.median(p.get(k, 0.0) for p in cpus) for k, _ in PARTS if k not in ("start", "exit")}
        cols.append((med_w, med_c, sum(med_w.values()), sum(med_c.values())))
    for key, label in PARTS:
        cells = [f"{w[key]:.2f} | {100 * w[key] / tw:.1f}% | " + (f"{c[key]:.2f}" if key in c else "-")
                 for w, c, tw, _ in cols]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("| **sum of parts** | " + " | ".join(f"**{tw:.2f}** | 100% | {tc:.2f}" for _, _, tw, tc in cols) + " |")
    print("| everything but the forward | " + " | ".join(
        f"{tw - w['forward']:.2f} | {100 * (tw - w['forward']) / tw:.1f}% | {tc - c['forward']:.2f}"
        for w, c, tw, tc in cols) + " |")


def main(args: argparse.Namespace, rest: list[str]) -> None:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    id_dir, sam, weight = prepare(work, args.n_slices, not args.no_weight)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env.setdefault("PYTHONWARNINGS", "ignore")
    trees = ([("before", Path(args.baseline_root).resolve())] if args.baseline_root else []) + [("after", ROOT)]
    cmds = {}
    for name, root in trees:
        out = work / f"out-{name}"
        cmds[name] = {
            "out": out,
            "plain": [sys.executable, str(root / "evaluate_internal.py"), *script_args(args, id_dir, sam, weight, out)],
            "parts": [sys.executable, str(root / "benchmarks" / "bench_eval_breakdown.py"), "--work_dir", str(work),
                      "--child", "--parts_json", str(work / f"parts-{name}.json"), "--",
                      *script_args(args, id_dir, sam, weight, out)],
        }
    # untimed warm-up of each tree: page cache for the package, the data and the SAM file, the index file
    digests = {}
    for name, _ in trees:
        run(cmds[name]["plain"], env, work / f"log-warm-{name}.txt", cwd=dict(trees)[name])
        digests[name] = csv_digest(cmds[name]["out"])
    digest = digests[trees[-1][0]]

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from _common import machine_header

    torch.set_num_threads(args.threads)  # the header reports the children's threads

    print(machine_header(), flush=True)
    print(f"# evaluate_internal.py, vit_b, {args.n_slices} slices, batch {args.batch_size}, --threads {args.threads}, "
          f"{'no --model_weight' if weight is None else 'random MedSegX checkpoint'}; median of {args.repeats} "
          f"fresh processes per tree and mode, alternating; load at start "
          f"{Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
    print(f"# command: OMP_NUM_THREADS={args.threads} {' '.join(cmds[trees[-1][0]]['plain'])}", flush=True)
    if args.baseline_root:
        print(f"# before = {trees[0][1]}, after = {ROOT}; ID.csv of the warm-up runs: "
              f"{'byte-identical' if len(set(digests.values())) == 1 else 'DIFFERENT'}", flush=True)
    modes = ["plain", "parts"] if args.mode == "both" else [args.mode]
    whole = {(t, m): [] for t, _ in trees for m in modes}
    parts: dict[str, tuple[list, list]] = {t: ([], []) for t, _ in trees}
    for r in range(args.repeats):
        for mode in modes:
            for name, root in trees:  # alternating
                c = cmds[name]
                secs, cpu, t0 = run(c[mode], env, work / f"log-{mode}-{name}.txt", cwd=root)
                if mode == "parts":
                    got = json.loads((work / f"parts-{name}.json").read_text())
                    wall = dict(got["wall"], start=got["start"] - t0, exit=(t0 + secs) - got["end"])
                    parts[name][0].append(wall)
                    parts[name][1].append(dict(got["cpu"]))
                whole[(name, mode)].append((secs, cpu))
                same = csv_digest(c["out"]) == digests[name]
                print(f"#   run {r + 1} {name:<6} {mode:<5} {secs:7.2f} s wall {cpu:7.2f} s CPU  ID.csv "
                      f"{'identical' if same else 'DIFFERENT'}", flush=True)
                if not same:
                    raise SystemExit("the report ID.csv changed between runs")
    for (name, mode), vals in whole.items():
        print(f"whole process, {name}, {mode}: {statistics.median(s for s, _ in vals):.2f} s wall, "
              f"{statistics.median(c for _, c in vals):.2f} s CPU (median of {len(vals)})")
    if "parts" in modes:
        _table([(name, *parts[name]) for name, _ in trees])
    print(f"# ID.csv sha256 {digest}" + (f" (before: {digests['before']})" if args.baseline_root else ""))
    print(f"# load at end {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    argv = sys.argv[1:]
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    parsed = get_args_parser().parse_args(argv)
    if parsed.child:
        child(parsed, rest)
    else:
        main(parsed, rest)
