"""The MedSegX label taxonomy: modality table and body part -> subregion -> organ -> target tree.

The table lives in ``taxonomy.json`` beside this module; this module only loads it, checks it once
and answers one question: which embedding rows (the *context*) belong to a task folder such as
``MRI_ProstatePeripheralZone``. The indices are rows of the model's context embedding tables, so
they must stay exactly those of the released weights.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_TAXONOMY = Path(__file__).with_name("taxonomy.json")
# The spare task row of the released weights; checked against the data file on load.
UNKNOWN_TASK = 111
_TRAILING_DIGITS = re.compile(r"\d+$")


class TaxonomyError(ValueError):
    """The taxonomy file is inconsistent, or a name cannot be resolved against it."""


@dataclass(frozen=True)
class Context:
    """Context of a task folder: names and the embedding rows the model looks up.

    ``organ_indices`` is the ``(4,)`` organ context of the model: body part, subregion, organ, task
    (the root row 0 is implicit).
    """

    task_folder: str
    modality: str  # canonical modality name, e.g. "Dermos" for a "Dermoscopy_Skin" folder
    target: str  # the task name with trailing digits dropped, e.g. "Liver" for "CT_Liver2"
    modal: int
    body_part: int
    subregion: int
    organ: int
    task: int
    in_tree: bool  # False: the target is in no organ tree, body part/subregion/organ are placeholders
    known_task: bool  # False: the task row is the spare UNKNOWN_TASK row

    @property
    def organ_indices(self) -> tuple[int, int, int, int]:
        return (self.body_part, self.subregion, self.organ, self.task)


def split_task_folder(task_folder: str) -> tuple[str, str]:
    """``"CT_Liver2"`` -> ``("CT", "Liver")``: modality alias and target (trailing digits dropped)."""
    modality, sep, task = task_folder.partition("_")
    if not sep or not modality or not task:
        raise TaxonomyError(f"task folder {task_folder!r} is not named Modality_Task (e.g. 'CT_Liver')")
    target = _TRAILING_DIGITS.sub("", task)
    if not target:
        raise TaxonomyError(f"task folder {task_folder!r} has no task name after the modality")
    return modality, target


@dataclass
class Taxonomy:
    """The loaded, validated taxonomy. Build it with :func:`load_taxonomy`."""

    version: str
    modalities: dict[str, int]  # canonical name -> row
    aliases: dict[str, str]  # lower-cased alias (and canonical name) -> canonical name
    spellings: dict[str, tuple[str, ...]]  # canonical name -> its aliases as written in the file
    body_parts: dict[str, int]
    subregions: dict[str, int]
    organs: dict[str, int]
    tasks: list[str]  # row = position
    targets: dict[str, tuple[str, str, str]]  # target -> (body part, subregion, organ)
    unknown_task: int
    unknown_target: tuple[int, int, int]  # rows used for a target in no tree
    source: str = ""
    _task_rows: dict[str, int] = field(default_factory=dict, repr=False)
    _warned: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self._task_rows = {name: i for i, name in enumerate(self.tasks)}

    # -- sizes of the model's embedding tables -------------------------------------------------
    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def organ_level_sizes(self) -> tuple[int, int, int, int, int]:
        """Rows of the five organ-level tables: root, body part, subregion, organ, task (+ spare)."""
        return (1, len(self.body_parts), len(self.subregions), len(self.organs), self.unknown_task + 1)

    # -- look-ups ------------------------------------------------------------------------------
    def canonical_modality(self, name: str) -> str:
        """Canonical modality name of an alias (case-insensitive), e.g. ``"Dermoscopy"`` -> ``"Dermos"``."""
        canonical = self.aliases.get(name.lower())
        if canonical is None:
            known = "; ".join(
                self._describe(m) for m in self.modalities
            )
            raise TaxonomyError(f"unknown modality {name!r}; known modalities (aliases): {known}")
        return canonical

    def _describe(self, modality: str) -> str:
        others = [a for a in self.spellings[modality] if a.lower() != modality.lower()]
        return f"{modality} ({', '.join(others)})" if others else modality

    def modality_index(self, name: str) -> int:
        return self.modalities[self.canonical_modality(name)]

    def context(self, task_folder: str) -> Context:
        """Context rows of a ``Modality_Task`` folder name.

        - target with a task row: its own rows;
        - target in the tree without a task row (e.g. StomachCancer): its ancestors and the spare
          task row ``unknown_task``;
        - target in no tree (e.g. FetalHead): ``unknown_target`` rows (0, 0, 0) and ``unknown_task``,
          with one warning per target name.
        An unknown modality raises :class:`TaxonomyError` listing the known ones.
        """
        alias, target = split_task_folder(task_folder)
        modality = self.canonical_modality(alias)
        modal = self.modalities[modality]
        ancestors = self.targets.get(target)
        task = self._task_rows.get(target, self.unknown_task)
        if ancestors is None:
            if target not in self._warned:
                self._warned.add(target)
                logger.warning(
                    "task %r (folder %r) is in no organ tree of the taxonomy: using body part/subregion/"
                    "organ rows %s and the spare unknown-task row %d",
                    target, task_folder, self.unknown_target, self.unknown_task,
                )
            body_part, subregion, organ = self.unknown_target
        else:
            body_part = self.body_parts[ancestors[0]]
            subregion = self.subregions[ancestors[1]]
            organ = self.organs[ancestors[2]]
        return Context(
            task_folder=task_folder, modality=modality, target=target, modal=modal,
            body_part=body_part, subregion=subregion, organ=organ, task=task,
            in_tree=ancestors is not None, known_task=target in self._task_rows,
        )


def _index_table(records: list[Mapping], level: str, source: str) -> dict[str, int]:
    table: dict[str, int] = {}
    for rec in records:
        name, index = rec["name"], rec["index"]
        if name in table:
            raise TaxonomyError(f"{source}: {level} {name!r} is listed twice")
        table[name] = index
    if sorted(table.values()) != list(range(len(table))):
        raise TaxonomyError(f"{source}: {level} indices must be 0..{len(table) - 1} without gaps or repeats")
    return table


def parse_taxonomy(raw: Mapping, source: str = "<dict>") -> Taxonomy:
    """Validate the JSON structure of ``taxonomy.json`` and build a :class:`Taxonomy`."""
    try:
        version = str(raw["version"])
        modalities = _index_table(raw["modalities"], "modality", source)
        body_parts = _index_table(raw["body_parts"], "body part", source)
        subregions = _index_table(raw["subregions"], "subregion", source)
        organs = _index_table(raw["organs"], "organ", source)
        tasks = list(raw["tasks"])
        unknown_task = int(raw["unknown_task"])
        unknown = raw["unknown_target"]
        unknown_target = (int(unknown["body_part"]), int(unknown["subregion"]), int(unknown["organ"]))
        sub_parent = {r["name"]: r["body_part"] for r in raw["subregions"]}
        organ_parent = {r["name"]: r["subregion"] for r in raw["organs"]}
        target_records = raw["targets"]
    except (KeyError, TypeError) as err:
        raise TaxonomyError(f"{source}: malformed taxonomy ({err!r} missing or of the wrong type)") from err

    aliases: dict[str, str] = {}
    spellings: dict[str, tuple[str, ...]] = {}
    for rec in raw["modalities"]:
        names = tuple(dict.fromkeys([rec["name"], *rec.get("aliases", [])]))
        spellings[rec["name"]] = names
        for alias in names:
            previous = aliases.setdefault(alias.lower(), rec["name"])
            if previous != rec["name"]:
                raise TaxonomyError(f"{source}: alias {alias!r} names both {previous!r} and {rec['name']!r}")

    for sub, part in sub_parent.items():
        if part not in body_parts:
            raise TaxonomyError(f"{source}: subregion {sub!r} has unknown body part {part!r}")
    for organ, sub in organ_parent.items():
        if sub not in subregions:
            raise TaxonomyError(f"{source}: organ {organ!r} has unknown subregion {sub!r}")

    targets: dict[str, tuple[str, str, str]] = {}
    for rec in target_records:
        name, part, sub, organ = rec["name"], rec["body_part"], rec["subregion"], rec["organ"]
        if name in targets:
            raise TaxonomyError(f"{source}: target {name!r} is listed twice")
        if organ not in organs:
            raise TaxonomyError(f"{source}: target {name!r} has unknown organ {organ!r}")
        # The ancestors are written out per target for readability; they must agree with the tree.
        if organ_parent[organ] != sub or sub_parent[sub] != part:
            raise TaxonomyError(
                f"{source}: target {name!r} lists {part}/{sub}/{organ}, but the tree says "
                f"{sub_parent[organ_parent[organ]]}/{organ_parent[organ]}/{organ}"
            )
        targets[name] = (part, sub, organ)

    if len(set(tasks)) != len(tasks):
        raise TaxonomyError(f"{source}: the task list repeats a name")
    missing = [t for t in tasks if t not in targets]
    if missing:
        raise TaxonomyError(f"{source}: tasks without a target record (ancestors unknown): {missing}")
    if unknown_task != len(tasks) or unknown_task != UNKNOWN_TASK:
        raise TaxonomyError(
            f"{source}: unknown_task must be the row after the last task ({len(tasks)}) and equal to "
            f"UNKNOWN_TASK={UNKNOWN_TASK} of the released weights, got {unknown_task}"
        )
    if not (unknown_target[0] < len(body_parts) and unknown_target[1] < len(subregions)
            and unknown_target[2] < len(organs)):
        raise TaxonomyError(f"{source}: unknown_target rows {unknown_target} are outside the tables")

    return Taxonomy(
        version=version, modalities=modalities, aliases=aliases, spellings=spellings, body_parts=body_parts,
        subregions=subregions, organs=organs, tasks=tasks, targets=targets,
        unknown_task=unknown_task, unknown_target=unknown_target, source=source,
    )


def __getattr__(name: str) -> str:
    # TAXONOMY_VERSION is read from the packaged file on first use, not at import time.
    if name == "TAXONOMY_VERSION":
        return load_taxonomy().version
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """Load and validate a taxonomy file; the packaged one (loaded once per process) by default.

    A new :class:`Taxonomy` is returned for an explicit ``path`` (so its warn-once state is fresh).
    """
    if path is None:
        return _default_taxonomy()
    return _load(Path(path))


@lru_cache(maxsize=1)
def _default_taxonomy() -> Taxonomy:
    return _load(DEFAULT_TAXONOMY)


def _load(path: Path) -> Taxonomy:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TaxonomyError(f"cannot read taxonomy file {path}: {err}") from err
    return parse_taxonomy(raw, source=str(path))
