"""Dataset folders as users lay them out: symbolic links, a download folder as the root, partial downloads."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_captions import make_captions, make_mimic
from test_data_busi import Busi
from test_data_chexpert import make_chexpert
from test_data_csv_splitfile import make_csv, make_splitfile_dataset, write_image
from test_data_fitzpatrick17k import Fitz
from test_data_ham10000 import Ham
from test_data_nih import make_nih, names_of
from test_data_rsna import Rsna
from test_data_smdg import Smdg
from medmnist_fixtures import write_medmnist
from typer.testing import CliRunner

from medpeft_ray.cli import app
from medpeft_ray.data import dataset_key, list_datasets, load_splits
from medpeft_ray.data.check import check_dataset
from medpeft_ray.data.layout import walk
from medpeft_ray.errors import DataError

SIZE = 16


def count(splits: Any) -> int:
    return len(splits.train) + len(splits.val) + len(splits.test)


# ----------------------------------------------------------------------------- symbolic links


def test_walk_follows_linked_folders_and_stops_at_a_link_cycle(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f.txt").write_text("x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "g.txt").write_text("y")
    (root / "a" / "b" / "up").symlink_to(root / "a")  # a cycle: b/up/b/up/...
    (root / "a" / "self").symlink_to(".")  # a cycle through a relative link
    (root / "linked").symlink_to(elsewhere)
    (root / "file-link.txt").symlink_to(elsewhere / "g.txt")
    (root / "broken.txt").symlink_to(tmp_path / "gone.txt")

    walked = {os.path.relpath(folder, root): files for folder, _, files in walk(root)}
    assert walked == {".": ["broken.txt", "file-link.txt"], "a": [], "a/b": ["f.txt"], "linked": ["g.txt"]}


def test_walk_lets_the_caller_prune(tmp_path: Path) -> None:
    for name in ("keep", ".hidden"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("")
    seen = []
    for folder, dirs, _ in walk(tmp_path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        seen.append(os.path.relpath(folder, tmp_path))
    assert seen == [".", "keep"]


def test_nih_finds_images_in_linked_folders_and_linked_files_despite_a_cycle(tmp_path: Path) -> None:
    data = make_nih(tmp_path / "local")
    shared = tmp_path / "shared"
    shared.mkdir()
    # on a cluster, images_002 is a link to the shared copy; one file of images_001 is a link too
    (data.root / "images_002").rename(shared / "images_002")
    (data.root / "images_002").symlink_to(shared / "images_002")
    one = next(p for p in sorted((data.root / "images_001" / "images").iterdir()))
    one.rename(shared / one.name)
    one.symlink_to(shared / one.name)
    (data.root / "images_001" / "images" / "loop").symlink_to(data.root)  # must not loop
    splits = load_splits("nih", data.root, SIZE, {}, 0)
    names = [n for s in (splits.train, splits.val, splits.test) for n in names_of(s, data)]
    assert sorted(names) == sorted(data.findings)


def test_ham10000_finds_images_in_a_linked_folder(tmp_path: Path) -> None:
    ham = Ham(tmp_path / "ham")
    part = ham.root / "HAM10000_images_part_2"
    part.rename(tmp_path / "part_2")
    part.symlink_to(tmp_path / "part_2")
    assert count(load_splits("ham10000", ham.root, SIZE, {}, 0)) == len(ham.level)


def test_a_changed_image_behind_a_link_changes_the_cache_key(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_image(root / "a" / "0.png", 10)
    write_image(tmp_path / "shared" / "1.png", 20)
    (root / "b").symlink_to(tmp_path / "shared")
    before = dataset_key("folder", root, SIZE, {}, 0)
    write_image(tmp_path / "shared" / "1.png", 200)
    os.utime(tmp_path / "shared" / "1.png", ns=(1, 1))  # a different mtime, whatever the clock's resolution
    assert dataset_key("folder", root, SIZE, {}, 0)["files"] != before["files"]


# ----------------------------------------------------------------------------- download folder as the root


def _nih(base: Path) -> tuple[Path, dict[str, Any]]:
    return make_nih(base).root, {}


def _chexpert(base: Path) -> tuple[Path, dict[str, Any]]:
    return make_chexpert(base).root, {}  # CSV paths start with CheXpert-v1.0-small/


def _rsna(base: Path) -> tuple[Path, dict[str, Any]]:
    return Rsna(base / "rsna-pneumonia-detection-challenge").root, {}


def _ham(base: Path) -> tuple[Path, dict[str, Any]]:
    return Ham(base / "HAM10000").root, {}


def _busi(base: Path) -> tuple[Path, dict[str, Any]]:
    return Busi(base / "Dataset_BUSI_with_GT").root, {}


def _folder(base: Path) -> tuple[Path, dict[str, Any]]:
    root = base / "my-images"
    for i in range(12):
        write_image(root / ("cat" if i % 2 else "dog") / f"{i}.png", 10 * i)
    return root, {}


def _csv(base: Path) -> tuple[Path, dict[str, Any]]:
    root = base / "table"
    rows = []
    for i in range(12):
        write_image(root / "img" / f"{i}.png", 10 * i)
        rows.append(f"img/{i}.png,p{i},{i % 2},{int(i < 4)}")
    make_csv(root, rows)
    return root, {"group_column": "patient"}


def _splitfile(base: Path) -> tuple[Path, dict[str, Any]]:
    root = base / "medpeft"
    make_splitfile_dataset(root)
    return root, {"images_dir": "images"}


BUILDERS: dict[str, Callable[[Path], tuple[Path, dict[str, Any]]]] = {
    "nih": _nih, "chexpert": _chexpert, "rsna": _rsna, "ham10000": _ham, "busi": _busi, "folder": _folder,
    "csv": _csv, "splitfile": _splitfile,
    "fitzpatrick17k": lambda base: (Fitz(base / "fitzpatrick17k").root, {}),
    "smdg": lambda base: (Smdg(base / "SMDG-19").root, {"suspects": "negative"}),
    "mimic_cxr": lambda base: (make_mimic(base).root, {}),
    "captions": lambda base: (make_captions(base), {"patient_column": "patient"}),
    "medmnist": lambda base: (write_medmnist(base / "medmnist", "dermamnist").parent, {"flag": "dermamnist"}),
}
#: the options a format cannot do without (MedMNIST: which set)
REQUIRED_OPTIONS: dict[str, dict[str, Any]] = {"medmnist": {"flag": "dermamnist"}}


def test_every_format_with_files_is_covered() -> None:
    assert set(BUILDERS) == set(list_datasets()) - {"synthetic"}


@pytest.mark.parametrize("fmt", sorted(BUILDERS))
def test_download_folder_or_dataset_folder_as_root(fmt: str, tmp_path: Path) -> None:
    download = tmp_path / "downloads" / "archive"
    folder, options = BUILDERS[fmt](download)
    (download / "__MACOSX" / folder.name).mkdir(parents=True)  # macOS zips carry a shadow copy of the tree
    (download / "README.txt").write_text("unpacked from the publisher's archive")
    direct = load_splits(fmt, folder, SIZE, options, 0)
    assert count(direct) > 0
    for root in (download, download.parent):  # the folder the archive unpacked into, and one above
        assert dataset_key(fmt, root, SIZE, options, 0)["root"] == str(folder.resolve())
        splits = load_splits(fmt, root, SIZE, options, 0)
        assert count(splits) == count(direct) and splits.class_names == direct.class_names
    report = check_dataset(fmt, download, options, image_size=SIZE, label_ratios=[1.0])
    assert report.root == str(folder.resolve()) and sum(report.images.values()) == count(direct)


@pytest.mark.parametrize("fmt", sorted(BUILDERS))
def test_a_root_without_the_dataset_is_one_line_naming_it_and_what_was_looked_for(fmt: str, tmp_path: Path) -> None:
    root = tmp_path / "somewhere"
    (root / "unrelated" / "deeper").mkdir(parents=True)
    (root / "notes.txt").write_text("no dataset here")
    with pytest.raises(DataError) as err:
        load_splits(fmt, root, SIZE, REQUIRED_OPTIONS.get(fmt, {}), 0)
    message = str(err.value)
    assert message.startswith(f"{root}: no {fmt} dataset found: looked for "), message
    assert "in it and in its sub-folders (2 levels down)" in message and "\n" not in message


@pytest.mark.parametrize(
    ("fmt", "looked_for"),
    [("nih", "Data_Entry_2017.csv"), ("chexpert", "train.csv, valid.csv"), ("busi", "benign/, malignant/, normal/"),
     ("rsna", "stage_2_train_labels.csv"), ("ham10000", "HAM10000_metadata.csv"), ("csv", "labels.csv"),
     ("splitfile", "train_list.txt, val_list.txt, test_list.txt"), ("folder", "class folders of .png/")],
)
def test_the_marker_named_in_the_error(fmt: str, looked_for: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"looked for {looked_for}"):
        load_splits(fmt, tmp_path, SIZE, {}, 0)


def test_two_dataset_folders_in_the_download_are_an_error_naming_both(tmp_path: Path) -> None:
    make_chexpert(tmp_path / "dl", folder="CheXpert-v1.0-small")
    make_chexpert(tmp_path / "dl", folder="CheXpert-v1.0")
    with pytest.raises(DataError) as err:
        load_splits("chexpert", tmp_path / "dl", SIZE, {}, 0)
    assert str(err.value) == (
        f"{tmp_path / 'dl'}: 2 folders hold a chexpert dataset (CheXpert-v1.0/, CheXpert-v1.0-small/); "
        "give one of them as dataset.root"
    )


def test_an_image_tree_given_as_root_is_not_searched_through(tmp_path: Path) -> None:
    """A root as wide as CheXpert's train/ (64k patient folders) fails at once instead of walking it."""
    from medpeft_ray.data.layout import SEARCH_WIDTH

    root = tmp_path / "train"
    for i in range(SEARCH_WIDTH + 1):
        (root / f"patient{i:05d}").mkdir(parents=True)
    make_chexpert(root / "patient00000")  # two levels down, but past a level too wide to search
    with pytest.raises(DataError, match=f"^{root}: no chexpert dataset found"):
        load_splits("chexpert", root, SIZE, {}, 0)


def test_a_linked_dataset_folder_counts_once(tmp_path: Path) -> None:
    data = make_chexpert(tmp_path / "dl")
    (tmp_path / "dl" / "latest").symlink_to(data.root)
    assert count(load_splits("chexpert", tmp_path / "dl", SIZE, {}, 0)) == len(data.values)


def test_a_dataset_folder_missing_a_file_stays_the_root_and_the_file_is_named(tmp_path: Path) -> None:
    data = make_chexpert(tmp_path / "dl")
    (data.root / "valid.csv").unlink()
    with pytest.raises(DataError, match="^" + str(data.root / "valid.csv") + ": file not found$"):
        load_splits("chexpert", tmp_path / "dl", SIZE, {}, 0)


# ----------------------------------------------------------------------------- partial downloads


def test_partial_nih_download_is_one_summary_not_a_line_per_file(tmp_path: Path) -> None:
    data = make_nih(tmp_path)  # images_001 .. images_003 (20 images each) and images_004 (1)
    for archive in ("images_002", "images_003"):
        shutil.rmtree(data.root / archive)
    total = len(data.findings)
    with pytest.raises(DataError) as err:
        load_splits("nih", data.root, SIZE, {}, 0)
    lines = str(err.value).splitlines()
    assert len(lines) == 3, lines
    head, found, advice = lines
    assert head.startswith(f"{data.root}: 40 of the {total} images listed in Data_Entry_2017.csv are missing, e.g. ")
    assert len(head.split("e.g. ")[1].split(", ")) == 3  # a few names, not all 40
    assert found == ("  the others were found in: images_001/images/ (20 found), images_004/images/ (1 found); "
                     "the missing ones are in none of these folders")
    assert advice == (f"  unpack the rest of the download into {data.root}, or set dataset.options.skip_unreadable: "
                      f"true to use the {total - 40} images present")

    splits = load_splits("nih", data.root, SIZE, {"skip_unreadable": True}, 0)
    assert count(splits) == total - 40 and len(splits.skipped) == 40
    assert splits.missing_summary == str(err.value)


def test_partial_chexpert_download_names_absent_and_incomplete_folders(tmp_path: Path) -> None:
    data = make_chexpert(tmp_path / "dl")
    train = sum(1 for p in data.split.values() if p == "train")
    shutil.rmtree(data.root / "train")
    gone = next(p for p, s in data.split.items() if s == "valid")
    data.path_of(gone).unlink()
    with pytest.raises(DataError) as err:
        load_splits("chexpert", tmp_path / "dl", SIZE, {}, 0)
    lines = str(err.value).splitlines()
    total, valid = len(data.values), len(data.values) - train
    assert lines[0].startswith(f"{data.root}: {train + 1} of the {total} images listed are missing, e.g. train/")
    assert lines[1:3] == [
        f"  absent folders: train/ ({train} listed)", f"  folders with some missing: valid/ (1 of {valid} missing)"
    ]
    assert lines[3].startswith("  unpack the rest of the download into")


def test_a_folder_that_holds_none_of_its_listed_images(tmp_path: Path) -> None:
    rsna = Rsna(tmp_path / "rsna")
    for file in rsna.images.iterdir():
        file.unlink()
    with pytest.raises(DataError) as err:
        load_splits("rsna", rsna.root, SIZE, {}, 0)
    empty = f"  folders with none of their listed images: stage_2_train_images/ ({len(rsna.truth)} listed)"
    assert empty in str(err.value)
    assert "use the 0 images present" in str(err.value)


def test_many_folders_are_cut_short(tmp_path: Path) -> None:
    root = tmp_path / "table"
    rows = [f"p{i}/x.png,p{i},1,0" for i in range(8)]
    make_csv(root, rows)
    with pytest.raises(DataError) as err:
        load_splits("csv", root, SIZE, {"group_column": "patient"}, 0)
    assert "  absent folders: p0/ (1 listed), p1/ (1 listed), p2/ (1 listed) and 5 more" in str(err.value)


def test_data_check_prints_the_summary_block_not_every_missing_file(tmp_path: Path) -> None:
    data = make_nih(tmp_path)
    shutil.rmtree(data.root / "images_002")
    result = CliRunner().invoke(app, ["data", "check", "--dataset", "nih", "--root", str(data.root)])
    assert result.exit_code == 1, result.output
    assert "missing: " + str(data.root) + ": 20 of the " in result.output
    assert not any(line.startswith("unreadable:") for line in result.output.splitlines())  # no line per file
    assert "20 listed image file(s) missing: a search stops before its first trial" in result.output
    report = check_dataset("nih", data.root, {"skip_unreadable": True}, image_size=SIZE)
    assert report.usable and report.missing.startswith(f"{data.root}: 20 of the ")
    assert len(report.unreadable) == 20  # every file is still listed (--format json)


def test_search_stops_with_the_block_and_exit_2_before_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    from conftest import tiny_search

    from medpeft_ray.search import ray_session

    data = make_nih(tmp_path)
    shutil.rmtree(data.root / "images_003")
    monkeypatch.setattr(ray_session, "connect", lambda address: pytest.fail("Ray started"))
    space = tmp_path / "nih.yaml"
    space.write_text(yaml.safe_dump(tiny_search(dataset={"name": "nih", "root": str(data.root), "options": {}})))
    result = CliRunner().invoke(app, ["search", "--space", str(space), "--results", str(tmp_path / "results")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0] == (f"error: {data.root}: 20 of the {len(data.findings)} images listed in Data_Entry_2017.csv "
                        "are missing, e.g. " + lines[0].split("e.g. ")[1])
    assert len(lines) == 3 and lines[2].startswith("  unpack the rest of the download")
