"""One run setup for every entry point: devices, torch.distributed, seeding, logging, output folder.

Launch modes (decided in :func:`launch`):

- under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK set): one process per rank,
  DistributedDataParallel over NCCL (GPU) or gloo (CPU);
- started plainly with several ``--device_ids`` on a GPU machine: one DDP
  worker per listed GPU, spawned here;
- otherwise a single process on one GPU, or on the CPU when no GPU is
  present (``--device_ids`` naming absent GPUs is said once, then CPU).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import random
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .errors import EXIT_USER_ERROR, user_errors

logger = logging.getLogger("medsegx")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_DIST = DistInfo()


def dist_info() -> DistInfo:
    return _DIST


def is_main_process() -> bool:
    return _DIST.is_main


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available_gpus(device_ids: Sequence[int] | None) -> list[int]:
    """The requested GPU ids that exist here; warns about the others."""
    if not device_ids:
        return []
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    present = [i for i in device_ids if 0 <= i < count]
    absent = [i for i in device_ids if i not in present]
    if absent:
        where = f"this machine has {count} GPU(s)" if count else "no GPU is available here"
        print(f"[medsegx] --device_ids {' '.join(map(str, absent))}: {where}; "
              f"{'using ' + str(present) if present else 'running on the CPU'}", file=sys.stderr)
    return present


def launch(worker: Callable[[Any], Any], args: Any) -> Any:
    """Run ``worker(args)`` in the right process layout (see module docstring).

    User errors (:class:`~medsegx.errors.UserError`, missing files, a full disk) end the run with
    one ``error: ...`` line and exit status 2, in every process layout.
    """
    with user_errors(args):
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            return worker(args)  # torchrun started us
        gpus = available_gpus(getattr(args, "device_ids", None))
        if len(gpus) > 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            try:
                torch.multiprocessing.spawn(_spawned, args=(worker, args, gpus), nprocs=len(gpus), join=True)
            except torch.multiprocessing.ProcessExitedException as err:
                if err.exit_code == EXIT_USER_ERROR:  # the worker printed its error line
                    raise SystemExit(EXIT_USER_ERROR) from None
                raise
            return None
        _set_gpus(gpus)
        try:
            return worker(args)
        finally:
            _set_gpus(None)


# The GPUs launch() resolved for this process's run (None: not launched through it).
_GPUS: list[int] | None = None


def _set_gpus(gpus: list[int] | None) -> None:
    global _GPUS
    _GPUS = None if gpus is None else list(gpus)


def _spawned(index: int, worker: Callable[[Any], Any], args: Any, gpus: list[int]) -> None:
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(len(gpus)))
    _set_gpus(gpus)
    with user_errors(args):
        worker(args)


def init_distributed(args: Any) -> DistInfo:
    """Initialise torch.distributed when launched with several ranks; pick this rank's device."""
    global _DIST
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        gpus = _GPUS or available_gpus(getattr(args, "device_ids", None) or list(range(torch.cuda.device_count())))
        if gpus and torch.cuda.is_available():
            device = torch.device("cuda", gpus[local % len(gpus)])
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
        _DIST = DistInfo(rank, world, local, device)
    else:
        gpus = _GPUS
        if gpus is None:
            gpus = available_gpus(getattr(args, "device_ids", None))
        device = torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _DIST = DistInfo(0, 1, 0, device)
    return _DIST


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (one item when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum counts/totals across ranks (reduce counts, not means)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def seed_everything(seed: int, rank: int = 0) -> None:
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, for exact resume."""
    state = {
        "python": random.getstate(),
        "numpy": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in
                  zip(("kind", "keys", "pos", "has_gauss", "cached_gaussian"), np.random.get_state())},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def setup_logging(output_dir: Path | None = None, rank: int = 0) -> None:
    """Rank 0 logs INFO to the console (and a file in the output folder); other ranks only warnings."""
    level = logging.INFO if rank == 0 else logging.WARNING
    for handler in _LOG_FILES.values():
        handler.close()
    _LOG_FILES.clear()
    logging.basicConfig(level=level, format=_LOG_FORMAT, datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], force=True)
    if output_dir is not None:
        add_log_file(output_dir)


_LOG_FORMAT = "[%(asctime)s %(name)s] %(message)s"
_LOG_FILES: dict[Path, logging.Handler] = {}


def add_log_file(folder: Path) -> None:
    """Also log to ``folder/log.txt`` (rank 0; appended, so a resumed run continues it)."""
    if not is_main_process():
        return
    path = (Path(folder) / "log.txt").resolve()
    if path in _LOG_FILES:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt="%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    _LOG_FILES[path] = handler


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def plain_args(args: Any) -> dict[str, Any]:
    """Resolved arguments as plain data (what checkpoints and run_info.json store)."""
    if args is None:
        return {}
    items = vars(args).items() if not isinstance(args, dict) else args.items()
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in items if not k.startswith("_")}


def write_run_info(args: Any, output_dir: Path, name: str = "run_info.json", **extra: Any) -> None:
    """The resolved arguments and the git revision beside the outputs (rank 0, atomically), as
    ``output_dir/name``: every run describes itself (STYLE.md), evaluations and fine-tuning sites too."""
    if not is_main_process():
        return
    from .fileio import atomic_write_text

    info = {"args": plain_args(args), "git": git_revision(), "argv": sys.argv, "torch": torch.__version__,
            "world_size": _DIST.world_size, "device": str(_DIST.device), **extra}
    atomic_write_text(Path(output_dir) / name, json.dumps(info, indent=2, default=str))


def setup(args: Any, output_dir: Path | None) -> DistInfo:
    """The one setup every script calls: distributed, logging, seeding, run info."""
    info = init_distributed(args)
    setup_logging(output_dir, info.rank)
    seed_everything(getattr(args, "seed", 0), info.rank)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    log_machine()
    if getattr(args, "use_amp", False):
        args.use_amp = amp_allowed(info.device, True)  # recorded as resolved (run_info.json, logs)
    if output_dir is not None:
        write_run_info(args, output_dir)
    logger.info("device %s, world size %d", info.device, info.world_size)
    return info


# --------------------------------------------------------------------------- the CPU and bf16
@dataclass(frozen=True)
class CpuInfo:
    """What decides whether bfloat16 is fast here: the CPU model and its bf16 instructions."""

    model: str
    capability: str                 # torch's vectorisation level (torch.backends.cpu.get_cpu_capability())
    avx512_bf16: bool | None        # None: could not be determined
    amx_bf16: bool | None
    source: str                     # where the two flags came from: "torch" (cpuinfo), "/proc/cpuinfo", "unknown"

    @property
    def native_bf16(self) -> bool | None:
        """AVX512-BF16 or AMX-BF16 present (True), both absent (False), unknown (None)."""
        if self.avx512_bf16 or self.amx_bf16:
            return True
        if self.avx512_bf16 is None or self.amx_bf16 is None:
            return None
        return False

    def describe(self) -> str:
        units = [name for name, present in (("AVX512-BF16", self.avx512_bf16), ("AMX-BF16", self.amx_bf16)) if present]
        native = {True: f"yes ({', '.join(units)})", False: "no (bf16 is emulated)", None: "unknown"}[self.native_bf16]
        return f"CPU {self.model} (torch capability {self.capability}), native bf16: {native}"


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """The model name and the flags of the first processor of a ``/proc/cpuinfo`` text."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def detect_cpu(cpuinfo_text: str | None = None, torch_probe: bool = True) -> CpuInfo:
    """Detect the CPU: the bf16 units from torch's cpuinfo probes (``torch.cpu._is_avx512_bf16_supported``,
    ``_is_amx_tile_supported``) where this torch has them, else from the ``/proc/cpuinfo`` flags
    (``avx512_bf16``, ``amx_bf16``). oneDNN's own ``_is_mkldnn_bf16_supported`` is not used: it is also
    True on AVX-512 CPUs without bf16 instructions, where oneDNN emulates bf16."""
    import platform

    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo_text = ""
    model, flags = parse_cpuinfo(cpuinfo_text)
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    avx512_bf16 = amx_bf16 = None
    source = "unknown"
    probe_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None) if torch_probe else None
    probe_amx = getattr(torch.cpu, "_is_amx_tile_supported", None) if torch_probe else None
    if probe_bf16 is not None and probe_amx is not None:
        try:
            avx512_bf16, amx_bf16, source = bool(probe_bf16()), bool(probe_amx()), "torch"
        except RuntimeError:
            avx512_bf16 = amx_bf16 = None
    if source == "unknown" and flags:
        avx512_bf16, amx_bf16, source = "avx512_bf16" in flags, "amx_bf16" in flags, "/proc/cpuinfo"
    return CpuInfo(model or platform.processor() or platform.machine() or "unknown", capability, avx512_bf16,
                   amx_bf16, source)


_CPU: CpuInfo | None = None


def cpu_info() -> CpuInfo:
    """This machine's :class:`CpuInfo` (detected once per process)."""
    global _CPU
    if _CPU is None:
        _CPU = detect_cpu()
    return _CPU


def native_bf16() -> bool | None:
    """Whether this CPU runs bfloat16 natively (AVX512-BF16 / AMX); None if it cannot be told."""
    return cpu_info().native_bf16


def log_machine() -> None:
    """The CPU model and native bf16 yes/no in the log (every command's setup says it)."""
    logger.info("%s, torch %s, %d thread(s)", cpu_info().describe(), torch.__version__, torch.get_num_threads())


_WARNED: set[str] = set()


def amp_allowed(device: torch.device | str, requested: bool) -> bool:
    """The one decision of mixed precision. CUDA: as requested. CPU (autocast is bf16 there): only where
    bf16 is native; without it ``--use_amp`` warns once and stays float32 (emulated bf16 measured up to 7x
    slower than float32, docs/PERFORMANCE.md). Unknown: as requested."""
    if not requested:
        return False
    if torch.device(device).type != "cpu":
        return True
    if native_bf16() is False:
        if "amp" not in _WARNED:
            _WARNED.add("amp")
            logger.warning("--use_amp: %s; bf16 would be emulated and several times slower than float32, so this "
                           "run stays in float32 (docs/PERFORMANCE.md)", cpu_info().describe())
        return False
    return True


def autocast(device: torch.device, enabled: bool, dtype: str | None = "float16") -> contextlib.AbstractContextManager:
    """Mixed precision: fp16 on CUDA (with a GradScaler), bf16 on CPU or CUDA; a no-op when disabled, and on
    a CPU without native bf16 (:func:`amp_allowed`)."""
    if not amp_allowed(device, enabled):
        return contextlib.nullcontext()
    torch_dtype = resolve_amp_dtype(device, dtype)
    return torch.autocast(device_type=device.type, dtype=torch_dtype)


def resolve_amp_dtype(device: torch.device, dtype: str | None) -> torch.dtype:
    if dtype in (None, "float16", "fp16") and device.type == "cuda":
        return torch.float16
    if dtype in (None, "float16", "fp16"):
        # CPU autocast supports bf16 (fast where native); fp16 on CPU would be slow and lossy
        return torch.bfloat16
    if dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    raise ValueError(f"unknown --amp_dtype {dtype!r}: use float16 or bfloat16")
