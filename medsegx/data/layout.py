"""The MedSegDB folder layout and slice naming: the one place they are written down.

::

    <root>/train/<Dataset>/<Modality_Task>/[<Sequence>/]npy_imgs|npy_gts/<slice>.npy
    <root>/eval/ID/<Dataset>/<Modality_Task>/[<Sequence>/]npy_imgs|npy_gts/<slice>.npy
    <root>/eval/<OOD|RealWorld>/<cross_site|cross_task>/<Modality_Task>/<Dataset>/[<Sequence>/]
        <finetune|inference>/npy_imgs|npy_gts/<slice>.npy

A slice converted from a volume is ``casenum_<case>_sliceid_<k>.npy``; any other name is a case of
its own. Reports name a slice by its group (``Dataset/Task[/Sequence]`` for train and ID,
``Task/Dataset[/Sequence]`` for the external splits) and its file name.
"""
from __future__ import annotations

import re
from pathlib import Path

IMAGES_DIR = "npy_imgs"
MASKS_DIR = "npy_gts"
TRAIN = "train"
EVAL = "eval"
ID = "ID"
EXTERNAL_SPLITS = ("OOD", "RealWorld")
SHIFT_TYPES = ("cross_site", "cross_task")
FINETUNE, INFERENCE = "finetune", "inference"  # an external site: adaptation data, held-out test data
SUBSETS = (FINETUNE, INFERENCE)
# The two report layouts (the reports' ``layout``, the evaluation's sub-folders): internal (ID, train) groups
# are Dataset/Task, external ones Task/Dataset; the position of the task in a report group.
INTERNAL, EXTERNAL = "internal", "external"
TASK_POSITION = {INTERNAL: 1, EXTERNAL: 0}
# How a catalog reads a split root's folders: Dataset/Task/.. (train, ID), Task/Dataset/../subset (the
# external splits), or decided per folder (external where a finetune/inference folder is present).
ID_LAYOUT, EXTERNAL_LAYOUT, AUTO_LAYOUT = "id", EXTERNAL, "auto"
FOLDER_LAYOUTS = (ID_LAYOUT, EXTERNAL_LAYOUT, AUTO_LAYOUT)

_SLICE = re.compile(r"^casenum_(?P<case>.+)_sliceid_(?P<slice>[^_]+)\.npy$")


def slice_name(case: str, k: int) -> str:
    """The file name of slice ``k`` of ``case``."""
    return f"casenum_{case}_sliceid_{k}.npy"


def slice_glob(case: str) -> str:
    """A glob pattern matching every slice file of ``case`` (escape ``case`` with ``glob.escape`` first)."""
    return f"casenum_{case}_sliceid_*.npy"


def parse_slice_name(name: str) -> tuple[str, int]:
    """``casenum_{case}_sliceid_{k}[.npy]`` (or a path to one) -> (case, k); ValueError otherwise."""
    match = re.fullmatch(r"casenum_(.+)_sliceid_(\d+)(?:\.npy)?", Path(name).name)
    if not match:
        raise ValueError(f"{name!r} is not a casenum_<case>_sliceid_<k>.npy slice name")
    return match.group(1), int(match.group(2))


def case_and_slice(file_name: str) -> tuple[str, str | None]:
    """(case id, slice id) of a slice file name; a name of another form is its own case (slice None)."""
    match = _SLICE.match(file_name)
    if match:
        return match["case"], match["slice"]
    return (file_name[:-4] if file_name.endswith(".npy") else file_name), None


def id_folder(split_root: str | Path, dataset: str, task_folder: str, sequence: str | None = None) -> Path:
    """The folder holding npy_imgs/npy_gts of a train/ or eval/ID group."""
    path = Path(split_root) / dataset / task_folder
    return path / sequence if sequence else path


def site_folder(shift_root: str | Path, task_folder: str, dataset: str, sequence: str | None = None) -> Path:
    """The folder of an external site (``meta.json`` lives here); its subsets are below it."""
    path = Path(shift_root) / task_folder / dataset
    return path / sequence if sequence else path


def external_folder(shift_root: str | Path, task_folder: str, dataset: str, sequence: str | None,
                    subset: str) -> Path:
    """The folder holding npy_imgs/npy_gts of one subset (finetune/inference) of an external site."""
    if subset not in SUBSETS:
        raise ValueError(f"an external site's subset is one of {SUBSETS}, got {subset!r}")
    return site_folder(shift_root, task_folder, dataset, sequence) / subset


def group_key(dataset: str, task_folder: str, sequence: str | None, external: bool) -> tuple[str, ...]:
    """The report group of a leaf folder: (Task, Dataset[, Sequence]) external, else (Dataset, Task[, ...])."""
    key = (task_folder, dataset) if external else (dataset, task_folder)
    return key + (sequence,) if sequence else key


def task_of(group: tuple[str, ...] | str, layout: str) -> str:
    """The task folder of a report group (or of a ``File`` key of a report CSV)."""
    parts = group.split("/") if isinstance(group, str) else group
    return parts[min(TASK_POSITION[layout], len(parts) - 1)]


def external_stem(split: str, shift_type: str) -> str:
    """``("OOD", "cross_site") -> "OOD-site"``: the published report name."""
    return f"{split}-{shift_type.split('_')[-1]}"
