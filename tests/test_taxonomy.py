"""The packaged taxonomy reproduces every index of the published one, and resolves task folders."""
from __future__ import annotations

import copy
import json
import logging
import sys

import pytest

from medsegx.data.taxonomy import (
    DEFAULT_TAXONOMY,
    UNKNOWN_TASK,
    TaxonomyError,
    load_taxonomy,
    parse_taxonomy,
    split_task_folder,
)

CORRUPT = "MitrLeftVentricularMyocardium"
NO_TASK_ROW = ["StomachCancer", "FNH", "HCC", "ICC", "Hemangioma", "InterstitialThickening", "PulmonaryLibrosis"]


@pytest.fixture(scope="module")
def official(taxonomy_official):
    return json.loads(taxonomy_official.read_text(encoding="utf-8"))


@pytest.fixture()
def fresh():
    """A taxonomy with its own warn-once memory (the default one is shared by the process)."""
    return load_taxonomy(DEFAULT_TAXONOMY)


def test_schema_and_sizes():
    tax = load_taxonomy()
    assert tax.version
    assert tax is load_taxonomy()  # loaded once
    assert tax.num_modalities == 10
    assert tax.organ_level_sizes == (1, 5, 12, 39, 112)
    assert tax.unknown_task == UNKNOWN_TASK == len(tax.tasks) == 111
    raw = json.loads(DEFAULT_TAXONOMY.read_text(encoding="utf-8"))
    assert set(raw) >= {"version", "modalities", "body_parts", "subregions", "organs", "tasks", "targets"}
    assert CORRUPT not in {t["name"] for t in raw["targets"]}
    names = [t["name"] for t in raw["targets"]]
    assert len(names) == len(set(names)) == 118  # 111 tasks + the 7 tree members without a task row


def test_reproduces_every_official_index(official):
    tax = load_taxonomy()
    for alias, canonical in official["modality_aliases"].items():
        assert tax.canonical_modality(alias) == canonical
        assert tax.modality_index(alias) == official["modalities"][canonical]
    assert tax.modalities == official["modalities"]
    assert tax.body_parts == official["body_parts"]
    assert tax.subregions == official["subregions"]
    assert tax.organs == official["organs"]
    assert tax.tasks == official["tasks"]
    levels = [("body_part_members", "body_parts", 0), ("subregion_members", "subregions", 1),
              ("organ_members", "organs", 2)]
    checked = set()
    for members_key, index_key, level in levels:
        for parent, members in official[members_key].items():
            for member in members:
                if member == CORRUPT:
                    continue
                ctx = tax.context(f"CT_{member}")
                assert ctx.organ_indices[level] == official[index_key][parent], (member, parent)
                checked.add(member)
    for member in checked:
        ctx = tax.context(f"MRI_{member}")
        expected = official["tasks"].index(member) if member in official["tasks"] else UNKNOWN_TASK
        assert ctx.task == expected and ctx.in_tree
    assert len(checked) == 118


def test_by_hand():
    tax = load_taxonomy()
    assert tax.context("CT_Liver").organ_indices == (1, 4, 17, 59)
    assert tax.context("MRI_ProstatePeripheralZone").organ_indices == (1, 5, 27, 82)
    assert tax.context("Fundus_RetinalVessel").organ_indices == (3, 10, 37, 99)
    assert tax.context("Endoscope_Polyp").modal == 5
    assert tax.context("Dermoscopy_Skin").modality == "Dermos"
    assert tax.context("xray_LeftLung").modal == tax.context("Xray_LeftLung").modal == 9


@pytest.mark.parametrize("target", NO_TASK_ROW)
def test_tree_members_without_task_use_spare_row(target, official):
    ctx = load_taxonomy().context(f"CT_{target}")
    organ = next(name for name, members in official["organ_members"].items() if target in members)
    assert ctx.organ == official["organs"][organ]
    assert ctx.task == UNKNOWN_TASK and ctx.in_tree and not ctx.known_task


def test_trailing_digits_are_dropped():
    tax = load_taxonomy()
    assert split_task_folder("CT_Liver2") == ("CT", "Liver")
    assert tax.context("CT_Liver2").organ_indices == tax.context("CT_Liver").organ_indices
    assert tax.context("CT_LeftKidney13").target == "LeftKidney"


def test_task_in_no_tree_warns_once(fresh, caplog):
    with caplog.at_level(logging.WARNING, logger="medsegx.data.taxonomy"):
        first = fresh.context("US_FetalHead")
        second = fresh.context("US_FetalHead2")
    assert first.organ_indices == second.organ_indices == (0, 0, 0, UNKNOWN_TASK)
    assert first.modal == 8 and not first.in_tree and not first.known_task
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "FetalHead" in warnings[0].getMessage()


def test_unknown_modality_is_a_clear_error():
    with pytest.raises(TaxonomyError) as info:
        load_taxonomy().context("PET_Liver")
    message = str(info.value)
    assert "PET" in message and "Dermoscopy" in message and "MRI" in message


@pytest.mark.parametrize("folder", ["Liver", "CT_", "_Liver", "CT_12"])
def test_malformed_task_folder(folder):
    with pytest.raises(TaxonomyError):
        load_taxonomy().context(folder)


def test_fixture_contexts(tiny_parity_dir):
    """The 14 slices of the tiny parity fixture carry exactly our context indices."""
    sys.path.insert(0, str(tiny_parity_dir))
    try:
        from load_fixture import load_inputs
    finally:
        sys.path.remove(str(tiny_parity_dir))
    data, _, extra = load_inputs()
    tax = load_taxonomy()
    assert len(extra["task_names"]) == 14
    for k, folder in enumerate(extra["task_names"]):
        ctx = tax.context(folder)
        assert ctx.modal == int(data["modal"][k])
        assert list(ctx.organ_indices) == [int(level[k]) for level in data["organ"]], folder
        assert (not ctx.known_task) == bool(extra["task_idx_missing_in_official"][k])
    stomach = tax.context("CT_StomachCancer")
    assert [stomach.modal, *stomach.organ_indices] == [2, 1, 4, 23, 111]


def _raw():
    return json.loads(DEFAULT_TAXONOMY.read_text(encoding="utf-8"))


@pytest.mark.parametrize("breakage", ["gap", "duplicate", "wrong_ancestor", "task_without_target", "alias_clash",
                                      "unknown_task_moved"])
def test_inconsistent_file_is_rejected(breakage):
    raw = copy.deepcopy(_raw())
    if breakage == "gap":
        raw["organs"][3]["index"] = 99
    elif breakage == "duplicate":
        raw["body_parts"].append(dict(raw["body_parts"][0]))
    elif breakage == "wrong_ancestor":
        raw["targets"][0]["subregion"] = "abdomen"
    elif breakage == "task_without_target":
        raw["targets"] = raw["targets"][1:]
    elif breakage == "alias_clash":
        raw["modalities"][0]["aliases"].append("ct")
    elif breakage == "unknown_task_moved":
        raw["unknown_task"] = 112
    with pytest.raises(TaxonomyError):
        parse_taxonomy(raw)


def test_unreadable_file(tmp_path):
    bad = tmp_path / "taxonomy.json"
    bad.write_text("{not json")
    with pytest.raises(TaxonomyError, match="taxonomy.json"):
        load_taxonomy(bad)


def test_taxonomy_version_constant():
    from medsegx.data import taxonomy

    assert taxonomy.TAXONOMY_VERSION == load_taxonomy().version == "1.0"
    with pytest.raises(AttributeError):
        taxonomy.NOT_A_THING  # noqa: B018
