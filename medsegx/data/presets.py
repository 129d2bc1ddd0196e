"""The preprocessing choices of conversion and prediction: CT windows, percentiles, slicing axes.

Command-line parsers read these, so this module imports neither numpy nor SimpleITK (``--help``
stays instant). The CT windows are data, in ``windows.json`` beside this module: CT and CTA are
windowed (level/width in HU), every other modality (MRI, CBCT, US, ...) is clipped to the
0.5-99.5 percentiles of the case's non-zero voxels (:mod:`medsegx.data.intensity` applies both).
Default CT windows by task:

=============  ===========  ======  ============================================================
preset         level (HU)   width   default for (CT tasks; trailing digits of the task dropped)
=============  ===========  ======  ============================================================
abdomen        40           400     every CT task not listed below (liver, kidney, pancreas,
                                    spleen, stomach, colon, tumours, ...), the MedSAM default
liver          60           160     none by default (narrow contrast-enhanced liver window;
                                    ``--window liver``)
lung           -600         1500    lungs, airways, COVID, GGO, consolidation, pneumothorax,
                                    lung cancer, interstitial thickening, pulmonary fibrosis
mediastinum    50           350     heart and its chambers, esophagus, pleural effusion
bone           400          1800    spine, sacrum, hips, femur, tibia, collar bones, mandible,
                                    teeth
brain          40           80      brain tumours, haemorrhage, stroke lesions, brain tissues
head_neck      50           350     nasopharynx/neck GTVs, glottis, thyroid, parotid, ears
angio          300          600     vessels (aorta, pulmonary artery/embolism, carotid, dissection
                                    lumina); also the default for modality CTA
=============  ===========  ======  ============================================================
"""
from __future__ import annotations

import json
import re
from pathlib import Path

WINDOWS_FILE = Path(__file__).with_name("windows.json")

AXES = AXIAL, CORONAL, SAGITTAL = ("axial", "coronal", "sagittal")  # the slicing axes of the canonical stack
ORIENTATIONS = LPS, KEEP_ORDER = ("LPS", "none")  # re-order volumes to LPS, or keep the stored order
DEFAULT_AXIS, DEFAULT_ORIENT = AXIAL, LPS  # conversion's, prediction's and the server's
ORIENTATION_WORDS = " or ".join(repr(o) for o in ORIENTATIONS)  # for messages: 'LPS' or 'none'
DEFAULT_PERCENTILES = (0.5, 99.5)


def _load_windows(path: Path) -> tuple[dict[str, tuple[float, float]], dict[str, str], dict[str, str]]:
    """``windows.json`` -> (preset -> (level, width), modality -> default preset, task -> preset), checked."""
    table = json.loads(path.read_text(encoding="utf-8"))
    presets = {name: (float(level), float(width)) for name, (level, width) in table["presets"].items()}
    task_preset: dict[str, str] = {}
    for preset, tasks in table["tasks"].items():
        for task in tasks:
            if task in task_preset:
                raise ValueError(f"{path}: task {task!r} is listed under {task_preset[task]!r} and {preset!r}")
            task_preset[task] = preset
    named = set(table["defaults"].values()) | set(table["tasks"])
    if named - set(presets):
        raise ValueError(f"{path}: unknown presets {sorted(named - set(presets))}")
    return presets, dict(table["defaults"]), task_preset


WINDOW_PRESETS, MODALITY_WINDOW, TASK_WINDOW = _load_windows(WINDOWS_FILE)
HU_MODALITIES = frozenset(MODALITY_WINDOW)  # modalities measured in Hounsfield units: windowed


def parse_window(text: str | None) -> tuple[float, float] | None:
    """``"40,400"`` or a preset name (``"lung"``) -> (level, width); ``None`` -> ``None``."""
    if text is None or text == "":
        return None
    if text in WINDOW_PRESETS:
        return WINDOW_PRESETS[text]
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError as err:
        raise ValueError(f"window {text!r} is neither 'level,width' nor one of {sorted(WINDOW_PRESETS)}") from err
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return level, width


def default_window(modality: str, task: str) -> tuple[float, float]:
    """The documented CT window (level, width) for ``task`` (trailing digits ignored)."""
    base = re.sub(r"\d+$", "", task)
    if base in TASK_WINDOW:
        return WINDOW_PRESETS[TASK_WINDOW[base]]
    return WINDOW_PRESETS[MODALITY_WINDOW["CTA" if modality == "CTA" else "CT"]]
