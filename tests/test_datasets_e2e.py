"""Every dataset format, in its published layout (tiny), through `data check`, the search's pre-flight
step, and, for the formats that cover the ways images are listed and decoded (a label table, DICOM,
folders) and those that record subgroup attributes (skin type, fundus collection), a real Ray search."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from conftest import tiny_search
from medmnist_fixtures import write_medmnist
from PIL import Image
from test_captions import make_captions, make_mimic
from test_data_busi import Busi
from test_data_chexpert import make_chexpert
from test_data_csv_splitfile import make_splitfile_dataset
from test_data_fitzpatrick17k import Fitz
from test_data_ham10000 import Ham
from test_data_nih import make_nih
from test_data_rsna import Rsna
from test_data_smdg import Smdg

from medpeft_ray.config import validate_search_dict
from medpeft_ray.data.check import check_dataset
from medpeft_ray.data.registry import get_dataset
from medpeft_ray.leaderboard import LeaderboardStore
from medpeft_ray.schema import parse_section



def _folder(base: Path) -> Path:
    root = base / "folder"
    for c, cls in enumerate(("normal", "pneumonia")):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.full((24, 24), 20 * c + 9 * i, np.uint8)).save(root / cls / f"{i}.png")
    (root / "normal" / "corrupt.png").write_bytes(b"not an image")  # skipped and counted, see FORMATS
    return root


def _csv(base: Path) -> Path:
    root = base / "csv"
    (root / "img").mkdir(parents=True)
    rows = ["path,patient,effusion,nodule"]
    for i in range(24):
        Image.fromarray(np.full((24, 24), 10 * i, np.uint8)).save(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,p{i // 2},{i % 2},{(i // 3) % 2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _splitfile(base: Path) -> Path:
    make_splitfile_dataset(base / "medpeft")
    return base / "medpeft"


#: format -> (build a tiny dataset under a folder, dataset options)
FORMATS: dict[str, tuple[Callable[[Path], Path], dict[str, Any]]] = {
    "nih": (lambda base: make_nih(base).root, {}),
    "chexpert": (lambda base: make_chexpert(base).root, {}),
    "rsna": (lambda base: Rsna(base / "rsna").root, {}),
    "ham10000": (lambda base: Ham(base / "ham").root, {}),
    "busi": (lambda base: Busi(base / "busi").root, {}),
    "fitzpatrick17k": (lambda base: Fitz(base / "fitzpatrick17k").root, {}),
    # the folder holding <flag>[_<size>].npz: a colour multi-class set at 28 px, decoded at 32
    "medmnist": (lambda base: write_medmnist(base / "medmnist", "dermamnist").parent, {"flag": "dermamnist"}),
    "smdg": (lambda base: Smdg(base / "smdg").root, {"suspects": "negative"}),
    "folder": (_folder, {"skip_unreadable": True}),
    "csv": (_csv, {"group_column": "patient"}),
    "mimic_cxr": (lambda base: make_mimic(base).root, {}),
    # image-text pairs without label columns: zero classes
    "captions": (make_captions, {"patient_column": "patient"}),
    "splitfile": (
        _splitfile,
        {"images_dir": "images", "ratio_files": {0.5: "train_50.txt"}, "group_pattern": r"(\d+)_\d+\.png$"},
    ),
}


#: formats also run through a real search (the others stop after the pre-flight step, which loads
#: their splits through the same code a trial uses)
SEARCHED = ("nih", "rsna", "folder", "fitzpatrick17k", "smdg")
#: the subgroup attributes a searched format's leaderboard row reports values for
SUBGROUPS = {"fitzpatrick17k": {"skin_type", "source"}, "smdg": {"source", "sex", "eye"}}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.ray] if n in SEARCHED else []) for n in sorted(FORMATS)])
def test_format_checks_and_searches(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from medpeft_ray.search.preflight import preflight
    from medpeft_ray.search.runner import run_search

    build, options = FORMATS[name]
    root = build(tmp_path)

    report = check_dataset(name, root, options, image_size=32, label_ratios=[0.5, 1.0])
    assert report.usable, report.problems
    assert report.images["train"] > 0 and report.images["val"] > 0

    config = validate_search_dict(
        tiny_search(
            experiment=f"e2e-{name}",
            dataset={"name": name, "root": str(root), "label_ratios": [0.5], "image_size": 32, "options": options},
            train={"epochs": 1, "batch_size": 8, "augment": "flip"},
            search={"num_samples": 1, "seed": 0, "scheduler": {"type": "none"}},
        ),
        f"{name}.yaml",
    )
    facts = preflight(config)
    assert facts["images"]["train"] == report.images["train"] and len(facts["skipped"]) == len(report.unreadable)
    if name not in SEARCHED:
        return
    request.getfixturevalue("ray_session")
    result = run_search(config, results=tmp_path / "results")
    rows = LeaderboardStore(result.db_url).query().to_dict(orient="records")
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["status"] == "completed", row["error"]
    assert row["dataset"] == name and row["label_ratio"] == 0.5
    assert row["config"]["dataset"]["root"] == str(root.resolve())
    assert 0 < row["trainable_params"] < row["total_params"]
    # skipped unreadable files are counted in the row (the folder dataset holds one corrupt file)
    assert row["skipped_images"] == (1 if name == "folder" else 0)
    assert len(report.unreadable) == row["skipped_images"]
    if name in SUBGROUPS:
        assert SUBGROUPS[name] <= set((row["details"] or {}).get("subgroups", {})), row["details"]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_classes_a_format_fixes_are_those_its_files_give(name: str, tmp_path: Path) -> None:
    """What ``methods --space`` sizes a head by before the dataset is there (``DatasetSpec.fixed_classes``)."""
    build, options = FORMATS[name]
    report = check_dataset(name, build(tmp_path), options, image_size=32, label_ratios=[1.0])
    spec = get_dataset(name)
    fixed = spec.fixed_classes(parse_section(spec.options, options, "dataset.options"))
    assert fixed is None or list(fixed) == list(report.class_names), (fixed, report.class_names)


def _hues(base: Path, per_class: int = 40) -> Path:
    """Two classes of flat images whose colours differ in hue only: the same grey levels in both."""
    root = base / "hues"
    rng = np.random.default_rng(0)
    colours = {"a": np.array([180.0, 90.0, 120.0]), "b": np.array([60.0, 150.0, 105.0])}
    luminance = np.array([0.299, 0.587, 0.114])
    colours["b"] *= (colours["a"] @ luminance) / (colours["b"] @ luminance)
    for cls, colour in colours.items():
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(colour * rng.uniform(0.6, 1.0) + rng.normal(0, 4, (24, 24, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8), mode="RGB").save(root / cls / f"{i}.png")
    return root


@pytest.mark.ray
def test_colour_is_learned_in_colour_and_grey_stays_one_channel(tmp_path: Path, ray_session: None) -> None:
    """A colour dataset whose classes differ in hue alone: decoded in colour (detected), a real search
    tells them apart; decoded grey, they look alike. A grey dataset keeps one channel in the cache."""
    from medpeft_ray.data import load_splits
    from medpeft_ray.search.runner import run_search

    root = _hues(tmp_path)
    colour = load_splits("folder", root, 16, {}, 0)
    grey = load_splits("folder", root, 16, {"colour": "grey"}, 0)
    assert colour.channels == 3 and colour.train.images.shape[1:] == (16, 16, 3)
    assert grey.channels == 1 and grey.train.images.ndim == 3
    # in grey the two classes' brightness ranges are the same: nothing to learn from
    by_class = [grey.train.images[grey.train.labels[:, k] == 1].mean(axis=(1, 2)) for k in range(2)]
    assert abs(np.median(by_class[0]) - np.median(by_class[1])) < 6
    # a radiograph-like grey dataset stays one channel (not tripled) in memory and in the cache
    assert load_splits("folder", _folder(tmp_path), 16, {"skip_unreadable": True}, 0).train.images.ndim == 3

    values = {}
    for mode in ("auto", "grey"):
        config = validate_search_dict(tiny_search(
            experiment=f"hues-{mode}",
            dataset={"name": "folder", "root": str(root), "label_ratios": [1.0], "image_size": 16,
                     "options": {"colour": mode}},
            train={"epochs": 4, "batch_size": 8, "augment": "none", "lr": 1e-2},
            space={}, search={"num_samples": 1, "seed": 0, "scheduler": {"type": "none"}},
        ), f"hues-{mode}.yaml")
        result = run_search(config, results=tmp_path / f"results-{mode}")
        (row,) = LeaderboardStore(result.db_url).query().to_dict(orient="records")
        assert row["status"] == "completed", row["error"]
        values[mode] = row["val_auroc"]
    assert values["auto"] >= 0.95 and values["grey"] <= 0.8, values
    print(f"\nval_auroc decoded in colour {values['auto']:.3f}, decoded grey {values['grey']:.3f}")
