"""The packaged taxonomy reproduces every index of the published one, and resolves task folders."""
from __future__ import annotations

import copy
import json
import logging
import sys
from collections import Counter

import pytest

from medsegx.data.taxonomy import (
    DEFAULT_SYNONYMS,
    DEFAULT_TAXONOMY,
    NEUTRAL_ROW,
    UNKNOWN_TASK,
    TaxonomyError,
    load_taxonomy,
    parse_taxonomy,
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
    assert tax.context("CT_Liver2").target == "Liver"
    assert tax.context("CT_Liver2").organ_indices == tax.context("CT_Liver").organ_indices
    assert tax.context("CT_LeftKidney13").target == "LeftKidney"


def test_task_in_no_tree_is_neutral_and_warns_once_per_folder(fresh, caplog):
    """A name found nowhere gets neutral body part/subregion/organ (never a real row 0) and the spare task row."""
    with caplog.at_level(logging.INFO, logger="medsegx.data.taxonomy"):
        first = fresh.context("US_NotAnOrgan")
        again = fresh.context("US_NotAnOrgan")
        second = fresh.context("MRI_NotAnOrgan2")
    assert first.organ_indices == second.organ_indices == (NEUTRAL_ROW, NEUTRAL_ROW, NEUTRAL_ROW, UNKNOWN_TASK)
    assert first == again and first.match == "none" and first.target == "NotAnOrgan"
    assert first.neutral_levels == ("body_part", "subregion", "organ")
    assert first.modal == 8 and not first.in_tree and not first.known_task
    lines = [r for r in caplog.records if r.name == "medsegx.data.taxonomy"]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.WARNING]  # once per task folder
    message = lines[0].getMessage()
    assert message.startswith("US_NotAnOrgan ") and "'NotAnOrgan' matches no target" in message
    assert "body part neutral, subregion neutral, organ neutral, task unknown (spare row 111)" in message
    assert "synonyms.json" in message


def test_log_line_names_every_row(fresh, caplog):
    with caplog.at_level(logging.INFO, logger="medsegx.data.taxonomy"):
        fresh.context("CT_Aorta")
        fresh.context("CT_Aorta")
        fresh.context("CT_StomachCancer")
        fresh.context("CT_RibLeft9")
    lines = [r.getMessage() for r in caplog.records if r.name == "medsegx.data.taxonomy"]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "medsegx.data.taxonomy")
    assert lines == [
        "CT_Aorta: modality CT (row 2), body part vessel (3), subregion vessel (10), organ vessel (37), "
        "task Aorta (104)",
        "CT_StomachCancer: modality CT (row 2), body part body (1), subregion abdomen (4), organ stomach (23), "
        "task StomachCancer has no row of its own (spare row 111)",
        "CT_RibLeft9 ('RibLeft9' is a synonym of subregion torso): modality CT (row 2), body part skeleton (2), "
        "subregion torso (8), organ neutral, task unknown (spare row 111); neutral levels are embedded as zero",
    ]


def _rows(folder):
    ctx = load_taxonomy().context(folder)
    return ctx.organ_indices


def test_trailing_digits_that_are_part_of_a_name_are_kept():
    tax = load_taxonomy()
    rib = tax.context("CT_RibLeft9")
    assert rib.target == "RibLeft9" and rib.match == "synonym" and rib.placed_as == "subregion:torso"
    assert rib.organ_indices == (tax.body_parts["skeleton"], tax.subregions["torso"], NEUTRAL_ROW, UNKNOWN_TASK)
    vertebra = tax.context("CT_VertebraeT9")
    assert vertebra.target == "VertebraeT9" and vertebra.placed_as == "organ:thoracicspine"
    assert vertebra.organ_indices == (2, 8, tax.organs["thoracicspine"], UNKNOWN_TASK)
    assert _rows("CT_VertebraeC3")[2] == tax.organs["cervicalspine"]
    assert _rows("CT_vertebrae_L1")[2] == tax.organs["lumbarspine"]
    # a number no table knows falls back to the name without it
    assert tax.context("CT_VertebraeT13").placed_as == "organ:thoracicspine"
    assert tax.context("CT_RibLeft13").target == "RibLeft"
    # the published rule still holds for published names
    assert tax.context("CT_Liver2").target == "Liver" and tax.context("CT_Liver2").match == "official"


def test_case_separators_and_word_order_are_tolerated():
    liver = _rows("CT_Liver")
    for name in ("liver", "LIVER", "liver_2", "Liver-3"):
        assert _rows(f"CT_{name}") == liver, name
    left_kidney = _rows("CT_LeftKidney")
    for name in ("left_kidney", "Left-Kidney", "kidney_left", "KidneyLeft", "kidney-left", "KIDNEY_LEFT"):
        assert _rows(f"CT_{name}") == left_kidney, name
    assert load_taxonomy().context("CT_left kidney").match == "name"
    assert _rows("CT_LeftGluteusMaximus") == _rows("CT_gluteus_maximus_left")


@pytest.mark.parametrize("synonym, official", [
    ("HeartAtriumLeft", "LeftAtrium"), ("HeartVentricleLeft", "LeftVentricle"),
    ("HeartVentricleRight", "RightVentricle"), ("HeartMyocardium", "LeftVentricularMyocardium"),
    ("HipLeft", "LeftHip"), ("HipRight", "RightHip"), ("InferiorVenaCava", "Postcava"),
    ("AdrenalGlandLeft", "LeftAdrenalGland"), ("ThyroidGland", "GlndThyroid"), ("UrinaryBladder", "Bladder"),
    ("SmallBowel", "Intestine"), ("ClaviculaLeft", "LeftCollarBone"), ("pulmonary_artery", "PulmonaryArtery"),
    ("CommonCarotidArteryRight", "CarotidArteryRight"), ("Task02_Heart", "LeftAtrium"),
    ("Task10_Colon", "ColonCancer"), ("PZ", "ProstatePeripheralZone"),
])
def test_close_synonyms_get_the_official_rows(synonym, official):
    ctx = load_taxonomy().context(f"MRI_{synonym}")
    assert ctx.organ_indices == load_taxonomy().context(f"MRI_{official}").organ_indices
    assert ctx.known_task and ctx.in_tree


def test_every_official_name_keeps_its_rows_and_is_matched_officially():
    tax = load_taxonomy()
    for target in tax.targets:
        ctx = tax.context(f"CT_{target}")
        assert ctx.match == "official" and ctx.target == target and ctx.in_tree
        assert ctx.task == (tax.tasks.index(target) if target in tax.tasks else UNKNOWN_TASK)
        assert tax.context(f"CT_{target}7").organ_indices == ctx.organ_indices


@pytest.fixture(scope="module")
def totalsegmentator_classes():
    from conftest import shared_path

    labels = json.loads(shared_path("data", "volumes", "labels.json").read_text(encoding="utf-8"))
    entry = labels["ct_abdomen_small_label.nii.gz"]
    names = {int(v): n for v, n in entry["labels"].items() if int(v) != 0}
    return names, {int(v) for v in entry["present"] if int(v) != 0}


# body part, subregion, organ, task of TotalSegmentator classes, by hand from the tree (docs/DATA.md).
N, U = NEUTRAL_ROW, UNKNOWN_TASK
TOTALSEGMENTATOR_BY_HAND = {
    "liver": (1, 4, 17, 59), "spleen": (1, 4, 20, 64), "kidney_left": (1, 4, 21, 65),
    "kidney_right": (1, 4, 21, 66), "aorta": (3, 10, 37, 104), "inferior_vena_cava": (3, 10, 37, 109),
    "pancreas": (1, 4, 19, 62), "stomach": (1, 4, 23, 70), "gallbladder": (1, 4, 18, 61),
    "esophagus": (1, 3, 14, 41), "heart": (1, 3, 15, 42), "duodenum": (1, 4, 24, 71), "colon": (1, 4, 24, 72),
    "small_bowel": (1, 4, 24, 75), "urinary_bladder": (1, 5, 25, 78), "prostate": (1, 5, 27, 80),
    "adrenal_gland_left": (1, 4, 22, 68), "adrenal_gland_right": (1, 4, 22, 69), "sacrum": (2, 8, 33, 92),
    "lung_upper_lobe_left": (1, 3, 12, U), "lung_lower_lobe_right": (1, 3, 12, U),
    "lung_middle_lobe_right": (1, 3, 12, U), "trachea": (1, 3, 13, U), "kidney_cyst_left": (1, 4, 21, U),
    "vertebrae_T9": (2, 8, 30, U), "vertebrae_L1": (2, 8, 31, U), "vertebrae_C3": (2, 7, 29, U),
    "vertebrae_S1": (2, 8, 33, U), "rib_left_9": (2, 8, N, U), "rib_right_12": (2, 8, N, U),
    "costal_cartilages": (2, 8, N, U), "sternum": (2, 8, N, U), "clavicula_left": (2, 8, 32, 87),
    "hip_right": (2, 9, 34, 94), "humerus_left": (2, 9, N, U), "portal_vein_and_splenic_vein": (3, 10, 37, U),
    "common_carotid_artery_right": (3, 10, 37, 100), "brain": (0, 0, 0, U), "skull": (2, 6, N, U),
    "gluteus_maximus_left": (1, 5, N, U), "autochthon_right": (1, N, N, U), "iliopsoas_left": (1, N, N, U),
    "spinal_cord": (N, N, N, U),
}


def test_every_totalsegmentator_class_resolves(totalsegmentator_classes):
    """All 117 classes of TotalSegmentator's 'total' task are placed, written as in the file or in CamelCase."""
    names, _ = totalsegmentator_classes
    assert len(names) == 117
    tax = load_taxonomy()
    for name in names.values():
        ctx = tax.context(f"CT_{name}")
        assert ctx.match == "synonym" or (ctx.match == "name" and ctx.in_tree), name
        camel = tax.context("CT_" + "".join(part[:1].upper() + part[1:] for part in name.split("_")))
        assert camel.organ_indices == ctx.organ_indices, name
        # levels are known from the top down: a neutral level has only neutral levels below it
        rows = ctx.organ_indices[:3]
        assert all(rows[i + 1] == NEUTRAL_ROW for i in range(2) if rows[i] == NEUTRAL_ROW), name
        if name != "spinal_cord":  # the one class deliberately left neutral (the tree has no spinal cord)
            assert ctx.body_part != NEUTRAL_ROW, name
    for name, rows in TOTALSEGMENTATOR_BY_HAND.items():
        assert _rows(f"CT_{name}") == rows, name


def test_labels_of_the_shared_ct_are_placed(totalsegmentator_classes):
    """The 41 labels of ../shared's CT: 14 tasks of the tree, the rest placed as deep as the tree allows."""
    names, present = totalsegmentator_classes
    assert len(present) == 41
    tax = load_taxonomy()
    placed = {names[v]: tax.context(f"CT_{names[v]}") for v in present}
    levels = Counter(ctx.placed_as.partition(":")[0] for ctx in placed.values())
    assert levels == {"target": 14, "organ": 9, "subregion": 13, "body_part": 4, "neutral": 1}
    assert all(ctx.known_task for ctx in placed.values() if ctx.placed_as.startswith("target:"))
    assert [n for n, ctx in placed.items() if ctx.placed_as == "neutral"] == ["spinal_cord"]


def test_other_schemes_by_hand():
    tax = load_taxonomy()
    amos = ["spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver", "stomach", "arota",
            "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder"]
    btcv = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
            "inferior vena cava", "pancreas", "right adrenal gland", "left adrenal gland"]
    for name in amos + btcv:  # every organ label of AMOS and BTCV with a task of the tree
        assert tax.place(name)[1].startswith("target:"), name
    assert tax.place("arota")[1] == tax.place("aorta")[1] == "target:Aorta"
    assert tax.place("postcava")[1] == tax.place("IVC")[1] == "target:Postcava"
    assert tax.place("prostate/uterus")[1] == "subregion:pelvis"
    assert tax.place("portal vein and splenic vein")[1] == "organ:vessel"
    msd = {"Task01_BrainTumour": "BrainWholeTumor", "Task02_Heart": "LeftAtrium", "Task03_Liver": "Liver",
           "Task04_Hippocampus": "Hippocampus", "Task05_Prostate": "Prostate", "Task06_Lung": "LungCancer",
           "Task07_Pancreas": "Pancreas", "Task09_Spleen": "Spleen", "Task10_Colon": "ColonCancer"}
    for name, target in msd.items():
        assert tax.place(name)[1] == f"target:{target}", name
    assert tax.place("Task08_HepaticVessel")[1] == "organ:vessel"
    assert tax.place("Lung")[1] == "organ:lung"  # the lungs, not Task06's tumours
    assert tax.place("FetalHead")[1] == "subregion:head"


def test_synonyms_file_places_every_entry_where_it_says():
    """Each name of synonyms.json is reachable through the look-up (no entry shadowed by another)."""
    tax = load_taxonomy()
    raw = json.loads(DEFAULT_SYNONYMS.read_text(encoding="utf-8"))
    counts = {source: len(entry["names"]) for source, entry in raw["sources"].items()}
    assert counts["TotalSegmentator"] == 117
    for entry in raw["sources"].values():
        for name, node in entry["names"].items():
            assert tax.place(name)[1] == node, name


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
                                      "unknown_task_moved", "placeholder_rows"])
def test_inconsistent_file_is_rejected(breakage):
    raw = copy.deepcopy(_raw())
    if breakage == "placeholder_rows":  # version 1.0's stand-in rows for names in no tree
        raw["unknown_target"] = {"body_part": 0, "subregion": 0, "organ": 0}
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


@pytest.mark.parametrize("names, message", [
    ({"Kidney": "organ:kidneys"}, "expected 'neutral' or 'level:node'"),
    ({"Kidney": "region:abdomen"}, "expected 'neutral' or 'level:node'"),
    ({"Rib9": "subregion:torso", "rib_9": "subregion:limb"}, "maps the same name"),
    ({"left_kidney": "target:RightKidney"}, "the tree's target 'LeftKidney'"),
    ({"_-": "organ:kidney"}, "no letter or digit"),
])
def test_inconsistent_synonyms_are_rejected(names, message):
    with pytest.raises(TaxonomyError, match=message):
        parse_taxonomy(_raw(), synonyms={"sources": {"test": {"names": names}}})
    with pytest.raises(TaxonomyError, match="malformed synonyms"):
        parse_taxonomy(_raw(), synonyms={"names": names})


def test_synonyms_are_optional_for_parse():
    tax = parse_taxonomy(_raw())
    assert tax.context("CT_Lungs").match == "none"  # no synonyms given: nothing but the tree
    assert tax.context("CT_kidney_left").organ_indices == (1, 4, 21, 65)  # read as LeftKidney


def test_unreadable_file(tmp_path):
    bad = tmp_path / "taxonomy.json"
    bad.write_text("{not json")
    with pytest.raises(TaxonomyError, match="taxonomy.json"):
        load_taxonomy(bad)
    with pytest.raises(TaxonomyError, match="synonyms file"):
        load_taxonomy(synonyms=bad)


def test_taxonomy_version_constant():
    from medsegx.data import taxonomy

    assert taxonomy.TAXONOMY_VERSION == load_taxonomy().version == "1.1"
    with pytest.raises(AttributeError):
        taxonomy.NOT_A_THING  # noqa: B018
