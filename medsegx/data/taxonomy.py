"""The MedSegX label taxonomy: modality table and body part -> subregion -> organ -> target tree.

The table lives in ``taxonomy.json`` beside this module, and ``synonyms.json`` places the names of
other schemes (TotalSegmentator, AMOS, BTCV, MSD, ...) in its tree. This module only loads and checks
them once and answers one question: which embedding rows (the *context*) belong to a task folder such
as ``MRI_ProstatePeripheralZone``. The indices are rows of the model's context embedding tables, so
they must stay exactly those of the released weights. A level that a name does not determine gets
:data:`NEUTRAL_ROW`, which the model embeds as a zero vector, never a real organ's row.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_TAXONOMY = Path(__file__).with_name("taxonomy.json")
DEFAULT_SYNONYMS = Path(__file__).with_name("synonyms.json")
# The spare task row of the released weights; checked against the data file on load.
UNKNOWN_TASK = 111
# Row of a body part / subregion / organ level that a name does not determine. Not a row of any
# table: the model embeds it as zero (see medsegx.model.conmoae.embed_context).
NEUTRAL_ROW = -1
_TRAILING_DIGITS = re.compile(r"\d+$")
_NOT_ALNUM = re.compile(r"[^0-9a-z]")
# The levels a name can be placed at, coarse to fine, as written in synonyms.json ("level:node").
_LEVELS = ("body_part", "subregion", "organ", "target")
_SIDES = ("left", "right")


class TaxonomyError(UserError, ValueError):
    """The taxonomy file is inconsistent, or a name cannot be resolved against it."""


@dataclass(frozen=True)
class Context:
    """Context of a task folder: names and the embedding rows the model looks up.

    ``organ_indices`` is the ``(4,)`` organ context of the model: body part, subregion, organ, task
    (the root row 0 is implicit). A body part, subregion or organ the name does not determine is
    :data:`NEUTRAL_ROW`; a coarser level is never neutral when a finer one is known.
    """

    task_folder: str
    modality: str  # canonical modality name, e.g. "Dermos" for a "Dermoscopy_Skin" folder
    target: str  # the task name as looked up: "Liver" for "CT_Liver2", "RibLeft9" for "CT_RibLeft9"
    modal: int
    body_part: int
    subregion: int
    organ: int
    task: int
    in_tree: bool  # True: body part, subregion and organ are all rows of the tree (none neutral)
    known_task: bool  # False: the task row is the spare UNKNOWN_TASK row
    placed_as: str  # the tree node the name maps to, "level:node" (e.g. "subregion:torso"), or "neutral" / ""
    match: str  # how: "official" (the published rule), "name" (case/separators), "synonym", "none"

    @property
    def organ_indices(self) -> tuple[int, int, int, int]:
        return (self.body_part, self.subregion, self.organ, self.task)

    @property
    def neutral_levels(self) -> tuple[str, ...]:
        """The levels left neutral, e.g. ``("organ",)`` for a rib."""
        rows = {"body_part": self.body_part, "subregion": self.subregion, "organ": self.organ}
        return tuple(level for level, row in rows.items() if row == NEUTRAL_ROW)


def _split(task_folder: str) -> tuple[str, str]:
    """``"CT_Liver2"`` -> ``("CT", "Liver2")``, checking the ``Modality_Task`` form."""
    modality, sep, task = task_folder.partition("_")
    if not sep or not modality or not task:
        raise TaxonomyError(f"task folder {task_folder!r} is not named Modality_Task (e.g. 'CT_Liver')")
    if not _TRAILING_DIGITS.sub("", task):
        raise TaxonomyError(f"task folder {task_folder!r} has no task name after the modality")
    return modality, task


def normalise_name(name: str) -> str:
    """The look-up key of a name: lower case, letters and digits only (``"Kidney_Left"`` -> ``"kidneyleft"``)."""
    return _NOT_ALNUM.sub("", name.casefold())


def _side_variants(key: str) -> Iterator[str]:
    """``key`` and, when it starts or ends with a side, the other word order (``"lefthip"`` <-> ``"hipleft"``)."""
    yield key
    for side in _SIDES:
        if key.startswith(side) and len(key) > len(side):
            yield key[len(side):] + side
        elif key.endswith(side) and len(key) > len(side):
            yield side + key[: -len(side)]


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
    subregion_parent: dict[str, str] = field(default_factory=dict)  # subregion -> body part
    organ_parent: dict[str, str] = field(default_factory=dict)  # organ -> subregion
    synonyms: dict[str, str] = field(default_factory=dict)  # normalised name -> "level:node" or "neutral"
    source: str = ""
    synonyms_source: str = ""
    _task_rows: dict[str, int] = field(default_factory=dict, repr=False)
    _target_keys: dict[str, str] = field(default_factory=dict, repr=False)
    _logged: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self._task_rows = {name: i for i, name in enumerate(self.tasks)}
        self._target_keys = {normalise_name(name): name for name in self.targets}

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

    def place(self, task: str) -> tuple[str, str, str]:
        """Where a task name sits in the tree: ``(name looked up, "level:node" or "", match)``.

        1. The published rule first, so official names keep their official rows: trailing digits
           dropped, exact case (``"Liver2"`` -> ``"target:Liver"``, match ``"official"``).
        2. Otherwise the name ignoring case and every character but letters and digits, with its
           trailing digits first (``"rib_left_9"``, ``"VertebraeT9"`` are names of their own) and then
           without them, each also with a leading/trailing left/right moved to the other end: a tree
           target (match ``"name"``), then ``synonyms.json`` (match ``"synonym"``).
        3. Nothing: ``""``, match ``"none"`` (every level neutral).
        """
        target = _TRAILING_DIGITS.sub("", task)
        if target in self.targets:
            return target, f"target:{target}", "official"
        full = normalise_name(task)
        for key, name in ((full, task), (_TRAILING_DIGITS.sub("", full), target.rstrip("_- "))):
            for variant in _side_variants(key):
                if variant in self._target_keys:
                    return name, f"target:{self._target_keys[variant]}", "name"
                if variant in self.synonyms:
                    return name, self.synonyms[variant], "synonym"
        return target, "", "none"

    def _rows(self, node: str) -> tuple[int, int, int]:
        """Body part, subregion and organ rows of a ``"level:node"``; finer levels neutral."""
        level, _, name = node.partition(":")
        body_part = subregion = organ = None
        if level == "target":
            body_part, subregion, organ = self.targets[name]
        elif level == "organ":
            organ, subregion = name, self.organ_parent[name]
        elif level == "subregion":
            subregion = name
        elif level == "body_part":
            body_part = name
        if subregion is not None:
            body_part = self.subregion_parent[subregion]
        return (
            NEUTRAL_ROW if body_part is None else self.body_parts[body_part],
            NEUTRAL_ROW if subregion is None else self.subregions[subregion],
            NEUTRAL_ROW if organ is None else self.organs[organ],
        )

    def context(self, task_folder: str) -> Context:
        """Context rows of a ``Modality_Task`` folder name (see :meth:`place` for the look-up).

        - a target with a task row (officially, or by name or synonym): its own rows;
        - a target without a task row (e.g. StomachCancer): its ancestors and the spare task row
          ``unknown_task``;
        - a synonym of an organ, subregion or body part (e.g. ``RibLeft9`` -> subregion torso): the rows
          down to that level, :data:`NEUTRAL_ROW` below it, and ``unknown_task``;
        - a name found nowhere (e.g. ``NotAnOrgan``): body part, subregion and organ neutral, and
          ``unknown_task``.
        The rows a task folder got are logged once per folder name (a warning when nothing matched).
        An unknown modality raises :class:`TaxonomyError` listing the known ones.
        """
        alias, task = _split(task_folder)
        modality = self.canonical_modality(alias)
        name, node, match = self.place(task)
        level, _, node_name = node.partition(":")
        body_part, subregion, organ = self._rows(node)
        task_row = self._task_rows.get(node_name, self.unknown_task) if level == "target" else self.unknown_task
        ctx = Context(
            task_folder=task_folder, modality=modality, target=name, modal=self.modalities[modality],
            body_part=body_part, subregion=subregion, organ=organ, task=task_row,
            in_tree=NEUTRAL_ROW not in (body_part, subregion, organ), known_task=task_row != self.unknown_task,
            placed_as=node, match=match,
        )
        if task_folder not in self._logged:
            self._logged.add(task_folder)
            logger.log(logging.WARNING if match == "none" else logging.INFO, "%s", self.describe(ctx))
        return ctx

    def describe(self, ctx: Context) -> str:
        """One line saying which rows a task folder got and why, e.g.
        ``CT_Aorta: modality CT (row 2), body part vessel (3), subregion vessel (10), organ vessel (37),
        task Aorta (104)``."""
        level, _, node = ctx.placed_as.partition(":")
        why = {
            "official": "",
            "name": f" ({ctx.target!r} read as {node})",
            "synonym": f" ({ctx.target!r} is a synonym of {level.replace('_', ' ')} {node})" if node
            else f" ({ctx.target!r} is a known name without a place in the tree)",
            "none": f" ({ctx.target!r} matches no target of the tree and no synonym in {self.synonyms_source})",
        }[ctx.match]
        parts = [f"modality {ctx.modality} (row {ctx.modal})"]
        for label, row, table in (("body part", ctx.body_part, self.body_parts),
                                  ("subregion", ctx.subregion, self.subregions), ("organ", ctx.organ, self.organs)):
            parts.append(f"{label} neutral" if row == NEUTRAL_ROW else f"{label} {_name_of(table, row)} ({row})")
        if ctx.known_task:
            parts.append(f"task {self.tasks[ctx.task]} ({ctx.task})")
        elif level == "target":
            parts.append(f"task {node} has no row of its own (spare row {ctx.task})")
        else:
            parts.append(f"task unknown (spare row {ctx.task})")
        line = f"{ctx.task_folder}{why}: {', '.join(parts)}"
        if ctx.neutral_levels:
            line += "; neutral levels are embedded as zero"
        if ctx.match == "none":
            line += "; add the name to synonyms.json (or a target to taxonomy.json) to place it in the tree"
        return line


def _name_of(table: Mapping[str, int], row: int) -> str:
    return next(name for name, i in table.items() if i == row)


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


def parse_taxonomy(raw: Mapping, source: str = "<dict>", synonyms: Mapping | None = None,
                   synonyms_source: str = "<dict>") -> Taxonomy:
    """Validate the JSON structure of ``taxonomy.json`` (and of ``synonyms.json`` when given) and
    build a :class:`Taxonomy`."""
    if "unknown_target" in raw:
        raise TaxonomyError(
            f"{source}: 'unknown_target' is no longer used: a level a name does not determine is neutral "
            f"(row {NEUTRAL_ROW}, embedded as zero); remove it, and place names with synonyms.json"
        )
    try:
        version = str(raw["version"])
        modalities = _index_table(raw["modalities"], "modality", source)
        body_parts = _index_table(raw["body_parts"], "body part", source)
        subregions = _index_table(raw["subregions"], "subregion", source)
        organs = _index_table(raw["organs"], "organ", source)
        tasks = list(raw["tasks"])
        unknown_task = int(raw["unknown_task"])
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
    target_keys: dict[str, str] = {}
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
        other = target_keys.setdefault(normalise_name(name), name)
        if other != name:
            raise TaxonomyError(f"{source}: targets {other!r} and {name!r} differ only in case or separators")
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

    nodes = {"body_part": body_parts, "subregion": subregions, "organ": organs, "target": targets}
    table = _parse_synonyms(synonyms or {"sources": {}}, synonyms_source, nodes, target_keys)
    return Taxonomy(
        version=version, modalities=modalities, aliases=aliases, spellings=spellings, body_parts=body_parts,
        subregions=subregions, organs=organs, tasks=tasks, targets=targets, unknown_task=unknown_task,
        subregion_parent=sub_parent, organ_parent=organ_parent, synonyms=table, source=source,
        synonyms_source=synonyms_source,
    )


def _parse_synonyms(raw: Mapping, source: str, nodes: Mapping[str, Mapping], target_keys: Mapping[str, str]
                    ) -> dict[str, str]:
    """``synonyms.json`` -> ``{normalised name: "level:node" or "neutral"}``, every node checked."""
    try:
        sources = {name: dict(entry["names"]) for name, entry in raw["sources"].items()}
    except (KeyError, TypeError, AttributeError) as err:
        raise TaxonomyError(f"{source}: malformed synonyms ({err!r} missing or of the wrong type)") from err
    table: dict[str, str] = {}
    first: dict[str, str] = {}  # normalised name -> "source: name" that set it
    for source_name, names in sources.items():
        for name, node in names.items():
            where = f"{source_name}: {name!r}"
            key = normalise_name(name)
            if not key:
                raise TaxonomyError(f"{source}: {where} has no letter or digit")
            level, _, node_name = node.partition(":")
            if node != "neutral" and (level not in nodes or node_name not in nodes[level]):
                raise TaxonomyError(
                    f"{source}: {where} maps to {node!r}; expected 'neutral' or 'level:node' with level in "
                    f"{', '.join(_LEVELS)} and a node of taxonomy.json"
                )
            tree_name = target_keys.get(key)
            if tree_name is not None and node != f"target:{tree_name}":
                raise TaxonomyError(f"{source}: {where} maps to {node!r}, but the name is the tree's target "
                                    f"{tree_name!r}, which is looked up first")
            previous = table.setdefault(key, node)
            first.setdefault(key, where)
            if previous != node:
                raise TaxonomyError(f"{source}: {where} maps to {node!r}, but {first[key]} maps the same name "
                                    f"to {previous!r}")
    return table


def __getattr__(name: str) -> str:
    # TAXONOMY_VERSION is read from the packaged file on first use, not at import time.
    if name == "TAXONOMY_VERSION":
        return load_taxonomy().version
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_taxonomy(path: str | Path | None = None, synonyms: str | Path | None = None) -> Taxonomy:
    """Load and validate a taxonomy file and a synonyms file (the packaged ones by default; the
    packaged pair is loaded once per process).

    A new :class:`Taxonomy` is returned for an explicit ``path`` or ``synonyms`` (so its log-once
    state is fresh).
    """
    if path is None and synonyms is None:
        return _default_taxonomy()
    return _load(Path(path or DEFAULT_TAXONOMY), Path(synonyms or DEFAULT_SYNONYMS))


@lru_cache(maxsize=1)
def _default_taxonomy() -> Taxonomy:
    return _load(DEFAULT_TAXONOMY, DEFAULT_SYNONYMS)


def _read_json(path: Path, what: str) -> Mapping:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TaxonomyError(f"cannot read {what} file {path}: {err}") from err


def _load(path: Path, synonyms: Path) -> Taxonomy:
    return parse_taxonomy(_read_json(path, "taxonomy"), source=str(path),
                          synonyms=_read_json(synonyms, "synonyms"), synonyms_source=str(synonyms))
