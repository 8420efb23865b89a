"""Bad input, as a table: each row is a command line, its exit code and its one-line message.

Every row checks that the message (stderr, after ``error:``) is one line naming the file, key,
option or URL -- the documented missing-files summary is one block whose first line names the
dataset folder --; that nothing got as far as a trial (no ``trial 1/`` or ``Ray cluster`` line, no
``tune/`` or ``searches/`` folder, Ray never connected); and, where a search meets a results folder
that already holds a leaderboard, that its two rows and a marker file are byte for byte as before.

Most rows run ``medpeft_ray.cli.main`` in this process (the real entry point, argv and all: a
subprocess costs seconds of imports each); the rows marked ``real`` run ``python -m medpeft_ray.cli``
in a subprocess, so that the table also holds for the program as users start it.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import cli_in_process, fill_results, leaderboard_row, tiny_search
from test_checkpoint_check import NOT_CHECKPOINTS, VIT
from test_data_csv_splitfile import write_image
from test_data_nih import make_nih
from test_empty_yaml import EMPTY_TEXTS
from test_empty_yaml import MESSAGE as EMPTY_MESSAGE

REPO = Path(__file__).resolve().parents[1]
MARKER = "notes.txt"
MARKER_TEXT = "results of an earlier search: keep\n"
pytestmark = pytest.mark.timeout(300)  # a row that hangs (a link cycle walked forever) fails instead


@dataclass(frozen=True)
class Row:
    """One bad input. ``{inputs}``, ``{results}`` and ``{port}`` in ``args``, ``message`` and ``names``
    stand for the shared input folder, this row's results folder and a TCP port nothing listens on."""

    id: str
    args: tuple[str, ...]
    code: int
    #: regex the whole message must match (its first line, for a block); for exit 0, searched in stdout
    message: str
    #: what the message names: the file, key, option or URL (its first line must contain it)
    names: str = ""
    #: the results folder the command meets: "filled" (two leaderboard rows and a marker file), the
    #: same on a "read-only" mount or a "full-disk", "file" (a file where the folder would be),
    #: "absent" (nothing there), or None (no results folder in play)
    results: str | None = None
    block: int = 1  # lines of the message: 1, or the missing-files summary's 3
    real: bool = False  # run in a subprocess


def rows() -> list[Row]:
    space = ("search", "--space")
    res = ("--results", "{results}")
    # the starts of the messages test_checkpoint_check expects for files that are no checkpoint
    not_checkpoint = {name: expected for name, _, expected in NOT_CHECKPOINTS}
    table = [
        # --- the config -----------------------------------------------------------------------
        Row("config-wrong-key", (*space, "{inputs}/wrongkey.yaml", *res), 2,
            r"wrongkey\.yaml: train\.epochz: unknown key \(did you mean 'epochs'\?\); known: augment, batch_size, .*",
            "train.epochz", "filled", real=True),
        Row("config-wrong-value", ("validate", "--space", "{inputs}/wrongvalue.yaml"), 2,
            r"wrongvalue\.yaml: train\.epochs: must be >= 1 \(got -1\)", "train.epochs"),
        Row("config-wrong-type", ("validate", "--space", "{inputs}/wrongtype.yaml"), 2,
            r"wrongtype\.yaml: train\.batch_size: must be an integer \(got 'eight'\)", "train.batch_size"),
        Row("config-section-not-a-mapping", ("validate", "--space", "{inputs}/sectiontype.yaml"), 2,
            r"sectiontype\.yaml: train: must be a mapping \(got int\)", "sectiontype.yaml"),
        Row("config-not-a-mapping", ("validate", "--space", "{inputs}/list.yaml"), 2,
            r"list\.yaml: must be a mapping of sections, got list", "list.yaml"),
        Row("config-bad-yaml-syntax", ("validate", "--space", "{inputs}/badsyntax.yaml"), 2,
            r"badsyntax\.yaml: line 2: not valid YAML: expected ',' or '\}', but got ':'", "badsyntax.yaml"),
        Row("config-binary-file", ("validate", "--space", "{inputs}/binary.yaml"), 2,
            r"binary\.yaml: not a text file", "binary.yaml"),
        Row("config-comment-only", (*space, "{inputs}/comments.yaml", *res), 2,
            "comments\\.yaml: " + re.escape(EMPTY_MESSAGE), "comments.yaml", "filled"),
        Row("config-file-not-found", ("validate", "--space", "{inputs}/absent.yaml"), 2,
            r"{inputs}/absent\.yaml: file not found", "absent.yaml"),
        Row("config-unknown-method", ("validate", "--space", "{inputs}/unknownmethod.yaml"), 2,
            r"unknownmethod\.yaml: method\.name: unknown method 'lorax'; known: adapter_houlsby, .*, vpt_shallow",
            "method.name"),
        Row("config-method-not-for-backbone", ("validate", "--space", "{inputs}/notapply.yaml"), 2,
            r"notapply\.yaml: method\.name: 'vpt_deep' does not apply to resnet backbones like 'resnet18' "
            r"\(it applies to: vit\)", "method.name"),
        Row("config-unknown-distribution", ("validate", "--space", "{inputs}/baddist.yaml"), 2,
            r"baddist\.yaml: space\.lr\.type: must be one of float, int, categorical, got 'gaussian'", "space.lr.type"),
        Row("config-empty-range", ("validate", "--space", "{inputs}/badrange.yaml"), 2,
            r"badrange\.yaml: space\.lr\.high: must be >= low \(0\.01\)", "space.lr.high"),
        Row("config-unknown-backbone-validate", ("validate", "--space", "{inputs}/unknownbackbone.yaml"), 2,
            r"unknownbackbone\.yaml: model\.backbone: unknown timm model 'vit_tinyy_patch16_224' "
            r"\(did you mean 'vit_tiny_patch16_224'\?\)", "model.backbone"),
        Row("config-unknown-backbone-search", (*space, "{inputs}/unknownbackbone.yaml", *res), 2,
            r"unknownbackbone\.yaml: model\.backbone: unknown timm model 'vit_tinyy_patch16_224' "
            r"\(did you mean 'vit_tiny_patch16_224'\?\)", "model.backbone", "filled"),
        Row("config-unknown-dataset", ("validate", "--space", "{inputs}/unknowndataset.yaml"), 2,
            r"unknowndataset\.yaml: dataset\.name: unknown dataset 'mimic'; known: busi, .*, synthetic",
            "dataset.name"),
        # --- dataset folders and files ------------------------------------------------------------
        Row("data-root-missing", ("validate", "--space", "{inputs}/missingroot.yaml"), 2,
            r"missingroot\.yaml: dataset\.root: directory not found: {inputs}/nowhere", "dataset.root"),
        Row("data-root-missing-check", ("data", "check", "--dataset", "nih", "--root", "{inputs}/nowhere"), 2,
            r"{inputs}/nowhere: folder not found", "{inputs}/nowhere"),
        Row("data-root-without-dataset", (*space, "{inputs}/unrelated.yaml", *res), 2,
            r"{inputs}/unrelated: no nih dataset found: looked for Data_Entry_2017\.csv, train_val_list\.txt, "
            r"test_list\.txt in it and in its sub-folders \(2 levels down\)", "{inputs}/unrelated", "filled"),
        Row("data-partial-download", (*space, "{inputs}/partial.yaml", *res), 2,
            r"{inputs}/partial/nih: 20 of the 61 images listed in Data_Entry_2017\.csv are missing, e\.g\. "
            r"00000007_002\.png, 00000008_000\.png, 00000008_001\.png", "{inputs}/partial/nih", "filled", block=3),
        Row("data-corrupt-image", (*space, "{inputs}/corrupt.yaml", *res), 2,
            r"{inputs}/corrupt/dog/0\.png: unreadable image \(UnidentifiedImageError: cannot identify image file .*\)",
            "{inputs}/corrupt/dog/0.png", "filled"),
        # handled, not refused: the walk stops at a link back up the tree, every image counted once
        Row("data-link-cycle-handled", ("data", "check", "--space", "{inputs}/cycle.yaml"), 0,
            r"(?s)folder {inputs}/cycle: 2 classes \(multiclass\).*train \(17\).*val \(2\).*test \(5\).*\nusable\n$"),
        # --- checkpoints (model.checkpoint), checked before Ray --------------------------------------
        Row("checkpoint-missing", (*space, "{inputs}/ckpt-absent.yaml", *res), 2,
            r"ckpt-absent\.yaml: model\.checkpoint: file not found: {inputs}/absent\.pth", "model.checkpoint",
            "filled"),
        Row("checkpoint-random-bytes", (*space, "{inputs}/ckpt-random.yaml", *res), 2,
            r"{inputs}/random\.pth: " + re.escape(not_checkpoint["random.pth"]) + r".*\)", "{inputs}/random.pth",
            "filled"),
        Row("checkpoint-empty-file", (*space, "{inputs}/ckpt-empty.yaml", *res), 2,
            r"{inputs}/empty\.pth: " + re.escape(not_checkpoint["empty.pth"]) + ".*", "{inputs}/empty.pth", "filled"),
        Row("checkpoint-text-file", (*space, "{inputs}/ckpt-notes.yaml", *res), 2,
            r"{inputs}/notes\.pth: " + re.escape(not_checkpoint["notes.pth"]) + ".*", "{inputs}/notes.pth", "filled"),
        Row("checkpoint-resnet-on-vit", (*space, "{inputs}/ckpt-resnet.yaml", *res), 2,
            r"{inputs}/resnet\.pth: only 0 of 148 backbone tensors of vit_tiny_patch16_224 match \(missing e\.g\. "
            r"cls_token, pos_embed, patch_embed\.proj\.weight, \.\.\.; unexpected e\.g\. conv1\.weight, bn1\.weight, "
            r"bn1\.bias, \.\.\.\)", "{inputs}/resnet.pth", "filled"),
        Row("checkpoint-smaller-vit", (*space, "{inputs}/ckpt-smaller.yaml", *res), 2,
            r"{inputs}/vit_tiny\.pth: only 0 of 148 backbone tensors of vit_small_patch16_224 match \(shape differs "
            r"e\.g\. cls_token \(file 1x1x192, model 1x1x384\), pos_embed \(file 1x5x192, model 1x5x384\), .*\)",
            "{inputs}/vit_tiny.pth", "filled"),
        Row("checkpoint-pickled-object", (*space, "{inputs}/ckpt-pickled.yaml", *res), 2,
            r"{inputs}/pickled_object\.pth: " + re.escape(not_checkpoint["pickled_object.pth"]) + ".*",
            "{inputs}/pickled_object.pth", "filled"),
        # --- database URLs -------------------------------------------------------------------------
        Row("db-unparseable", ("leaderboard", "--db", "not a url"), 2,
            r"not a url: not a database URL \(e\.g\. sqlite:///path/leaderboard\.db or "
            r"postgresql://user:password@host/db\)", "not a url"),
        Row("db-unknown-dialect", ("leaderboard", "--db", "mongodb://u@db-host/medpeft"), 2,
            r"mongodb://u@db-host/medpeft: SQLAlchemy knows no database type 'mongodb' \(e\.g\. .*\)",
            "mongodb://u@db-host/medpeft"),
        Row("db-driver-not-installed", ("leaderboard", "--db", "mysql://u@db-host/medpeft"), 2,
            r"mysql://u@db-host/medpeft: the database driver 'MySQLdb' that mysql:// URLs use is not installed; "
            r"pip install mysqlclient", "mysql://u@db-host/medpeft", real=True),
        Row("db-postgres-closed-port", ("leaderboard", "--db", "postgresql://postgres@127.0.0.1:{port}/test"), 1,
            r"postgresql://postgres@127\.0\.0\.1:{port}/test: not a usable leaderboard database \(connection failed: "
            r".*Connection refused\)", "postgresql://postgres@127.0.0.1:{port}/test"),
        Row("db-postgres-closed-port-search",
            (*space, "{inputs}/ok.yaml", *res, "--db", "postgresql://postgres@127.0.0.1:{port}/test"), 1,
            r"postgresql://postgres@127\.0\.0\.1:{port}/test: not a usable leaderboard database \(connection failed: "
            r".*Connection refused\)", "postgresql://postgres@127.0.0.1:{port}/test", "filled"),
        # --- tracking (tests/test_tracking.py has the rest) ---------------------------------------------
        Row("tracking-mlflow-server-down", (*space, "{inputs}/tracked.yaml", *res), 1,
            r"tracking\.mlflow\.tracking_uri: http://127\.0\.0\.1:{port}: cannot be used \(Connection refused\)",
            "tracking.mlflow.tracking_uri", "filled"),
        # --- results folders -----------------------------------------------------------------------
        Row("results-is-a-file", (*space, "{inputs}/ok.yaml", *res), 2,
            r"{results}: not a folder; --results \(or MEDPEFT_RESULTS\) names the folder a search writes to",
            "{results}", "file", real=True),
        Row("results-read-only", (*space, "{inputs}/ok.yaml", *res), 1,
            r"{results}: the results folder cannot be written \((Read-only file system|Operation not permitted)\)",
            "{results}", "read-only"),
        Row("results-read-only-resume", ("search", "--resume", "tiny", *res), 1,
            r"{results}: no search named 'tiny' to resume \(no search has run with these results\)", "{results}",
            "read-only"),
        # reading a leaderboard on a read-only file system is not supported (SQLite's lock and WAL files)
        Row("results-read-only-leaderboard", ("leaderboard", *res), 1,
            r"{results}/leaderboard\.db(\.lock: (Read-only file system|Operation not permitted)|: not a usable "
            r"leaderboard database \(.*\))", "{results}/leaderboard.db", "read-only"),
        Row("results-full-disk", (*space, "{inputs}/ok.yaml", *res), 1,
            r"{results}: the results folder cannot be written \(No space left on device\)", "{results}", "full-disk"),
        Row("results-absent-leaderboard", ("leaderboard", *res), 1,
            r"{results}/leaderboard\.db: no leaderboard here yet \(run `medpeft-ray search` first\)",
            "{results}/leaderboard.db", "absent"),
        # --- command-line arguments ----------------------------------------------------------------
        Row("cli-unknown-option", ("search", "--bogus"), 2,
            r"No such option: --bogus.* \(see .*search --help\)", "--bogus", real=True),
        Row("cli-missing-space", ("search",), 2,
            r"give --space FILE for a new search, or --resume NAME to continue one \(not both\)", "--space"),
        Row("cli-space-and-resume", (*space, "{inputs}/ok.yaml", "--resume", "tiny", *res), 2,
            r"give --space FILE for a new search, or --resume NAME to continue one \(not both\)", "--resume", "filled"),
        Row("cli-resume-and-experiment", ("search", "--resume", "tiny", "--experiment", "other", *res), 2,
            r"--experiment names a new search; a resumed one keeps its name", "--experiment", "filled"),
        Row("cli-resume-unknown-experiment", ("search", "--resume", "nosuch", *res), 1,
            r"{results}: no search named 'nosuch' to resume \(no search has run with these results\)", "'nosuch'",
            "filled"),
        Row("cli-label-ratio-not-a-number", ("best", "--dataset", "synthetic", "--label-ratio", "abc", *res), 2,
            r"Invalid value for '--label-ratio': .* \(see .*best --help\)", "--label-ratio", "filled", real=True),
        Row("cli-label-ratio-not-a-number-leaderboard", ("leaderboard", "--label-ratio", "1/10", *res), 2,
            r"Invalid value for '--label-ratio': .* \(see .*leaderboard --help\)", "--label-ratio", "filled"),
        Row("cli-missing-required-option", ("best", "--dataset", "synthetic", *res), 2,
            r"Missing option '--label-ratio'\. \(see .*best --help\)", "--label-ratio", "filled"),
        Row("cli-unknown-format", ("leaderboard", "--format", "xml", *res), 2,
            r"Invalid value for '--format': .*'xml' is not one of 'table', 'json', 'csv', 'markdown'.*", "--format",
            "filled"),
        Row("cli-unknown-sort-column", ("leaderboard", "--sort", "bogus", *res), 2,
            r"cannot sort by 'bogus'; columns: .*", "'bogus'", "filled"),
        Row("cli-conflicting-views", ("leaderboard", "--compare", "methods", "--pareto", *res), 2,
            r"--compare, --pareto and --group-by are separate views; pick one", "--compare", "filled"),
        Row("cli-malformed-dataset-option", ("data", "check", "--dataset", "synthetic", "-o", "oops"), 2,
            r"--option 'oops': expected key=value", "--option"),
    ]
    assert len({row.id for row in table}) == len(table)
    return table


ROWS = rows()


def test_the_table_is_big_enough_and_mostly_in_process() -> None:
    assert len(ROWS) >= 30
    assert 0 < sum(row.real for row in ROWS) <= 6


# ----------------------------------------------------------------------------------------------
# The inputs, written once for the module
# ----------------------------------------------------------------------------------------------


def _write_yaml(path: Path, config: Any) -> None:
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, closed_port: int) -> Path:
    import timm
    import torch

    from medpeft_ray.models import build_backbone

    base = tmp_path_factory.mktemp("inputs")
    configs: dict[str, Any] = {
        "ok": tiny_search(),
        "wrongkey": tiny_search(train={"epochz": 3}),
        "wrongvalue": tiny_search(train={"epochs": -1}),
        "wrongtype": tiny_search(train={"batch_size": "eight"}),
        "sectiontype": {**tiny_search(), "train": 5},
        "list": "- dataset\n- model\n",
        "badsyntax": "dataset: {name: synthetic\nmodel: [\n",
        "comments": EMPTY_TEXTS["comments"],
        "unknownmethod": tiny_search(method={"name": "lorax", "options": {}}),
        "notapply": tiny_search(model={"backbone": "resnet18"}, method={"name": "vpt_deep", "options": {}}),
        "baddist": tiny_search(space={"lr": {"type": "gaussian", "low": 1e-3, "high": 1e-2}}),
        "badrange": tiny_search(space={"lr": {"type": "float", "low": 1e-2, "high": 1e-3}}),
        "unknownbackbone": tiny_search(model={"backbone": "vit_tinyy_patch16_224"}),
        "unknowndataset": tiny_search(dataset={"name": "mimic"}),
        "missingroot": tiny_search(dataset={"name": "nih", "root": str(base / "nowhere"), "options": {}}),
        "tracked": {**tiny_search(), "tracking": {"mlflow": {"tracking_uri": f"http://127.0.0.1:{closed_port}"}}},
    }
    (base / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01 not text")

    # dataset folders: one without any dataset, a partial NIH download, a corrupt image, a link cycle
    (base / "unrelated" / "downloads" / "deeper").mkdir(parents=True)
    (base / "unrelated" / "README.txt").write_text("no dataset here")
    partial = make_nih(base / "partial")
    shutil.rmtree(partial.root / "images_002")  # one of the archives was never unpacked
    for name in ("corrupt", "cycle"):
        for i in range(24):
            write_image(base / name / ("cat" if i % 2 else "dog") / f"{i}.png", 10 * i)
    (base / "corrupt" / "dog" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (base / "cycle" / "cat" / "up").symlink_to(base / "cycle")
    (base / "cycle" / "dog" / "here").symlink_to(".")
    for name, root in (("unrelated", base / "unrelated"), ("partial", partial.root)):
        configs[name] = tiny_search(dataset={"name": "nih", "root": str(root), "options": {}})
    for name in ("corrupt", "cycle"):
        configs[name] = tiny_search(dataset={"name": "folder", "root": str(base / name), "options": {}})

    # checkpoints: the files test_checkpoint_check refuses, a ResNet's weights, a smaller ViT's
    for name, write, _ in NOT_CHECKPOINTS:
        write(base / name)
    torch.save(timm.create_model("resnet18").state_dict(), base / "resnet.pth")
    torch.save(build_backbone(VIT, num_classes=3, image_size=32).state_dict(), base / "vit_tiny.pth")
    for name, file, backbone in [("absent", "absent.pth", VIT), ("random", "random.pth", VIT),
                                 ("empty", "empty.pth", VIT), ("notes", "notes.pth", VIT),
                                 ("pickled", "pickled_object.pth", VIT), ("resnet", "resnet.pth", VIT),
                                 ("smaller", "vit_tiny.pth", "vit_small_patch16_224")]:
        configs[f"ckpt-{name}"] = tiny_search(model={"backbone": backbone, "checkpoint": str(base / file)})
    for name, config in configs.items():
        _write_yaml(base / f"{name}.yaml", config)
    return base


@pytest.fixture(scope="module")
def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# Results folders: filled with two leaderboard rows and a marker file, then made read-only or full
# ----------------------------------------------------------------------------------------------


def _fill(results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    fill_results(results, leaderboard_row("t1", "lora", 1.0, 0.81, experiment="earlier"),
                 leaderboard_row("t2", "lora", 1.0, 0.74, experiment="earlier"))
    (results / MARKER).write_text(MARKER_TEXT)


def _sh(*command: str) -> bool:
    return subprocess.run(command, capture_output=True, check=False).returncode == 0


def _unmount(path: Path) -> None:
    if not _sh("umount", str(path)):
        _sh("umount", "-l", str(path))  # still open in this process (an SQLite handle): detach it


@pytest.fixture
def results(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    kind = request.param
    path = tmp_path / "results"
    if kind == "file":
        path.write_text(MARKER_TEXT)
        yield path
    elif kind in (None, "absent"):
        yield path
    elif kind == "filled":
        _fill(path)
        yield path
    elif kind == "read-only":
        # Tests run as root, whom chmod does not stop. What does is real: a read-only bind mount of
        # the filled folder (EROFS, as a results folder on a read-only share), else the immutable
        # attribute (chattr +i: EPERM, even for root); where neither is permitted the row skips.
        _fill(path)
        if _sh("mount", "--bind", str(path), str(path)):
            if _sh("mount", "-o", "remount,bind,ro", str(path)):
                yield path
                _unmount(path)
                return
            _unmount(path)
        if shutil.which("chattr") and _sh("chattr", "+i", str(path)):
            try:
                yield path
            finally:
                _sh("chattr", "-i", str(path))
            return
        pytest.skip("neither a read-only bind mount nor chattr +i is permitted here, and root ignores chmod")
    elif kind == "full-disk":
        # A real full disk: the filled folder on a 512 KiB tmpfs, then a file that takes the rest.
        path.mkdir()
        if not _sh("mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(path)):
            pytest.skip("mounting a small tmpfs (to fill it) is not permitted here")
        try:
            _fill(path)
            with open(path / "filler", "wb", buffering=0) as filler:  # unbuffered: no write left for close()
                try:
                    while True:
                        filler.write(bytes(4096))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
            yield path
        finally:
            _unmount(path)
    else:
        raise AssertionError(kind)


def _snapshot(results: Path) -> dict[str, Any]:
    """What must survive a failed command: the leaderboard file's bytes and rows, the marker file."""
    if results.is_file():
        return {"file": results.read_bytes()}
    if not results.exists():
        return {"exists": False}
    db = results / "leaderboard.db"
    # immutable=1: read without the lock and WAL files SQLite would create (a read-only or full folder)
    conn = sqlite3.connect(f"file:{db}?immutable=1", uri=True)
    try:
        trials = conn.execute("SELECT experiment, trial_id, val_auroc FROM medpeft_trials ORDER BY trial_id").fetchall()
    finally:
        conn.close()
    return {"db": db.read_bytes(), "trials": trials, "marker": (results / MARKER).read_text(),
            "names": sorted(p.name for p in results.iterdir())}


# ----------------------------------------------------------------------------------------------
# Running a row
# ----------------------------------------------------------------------------------------------


def _in_process(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    from medpeft_ray.search import ray_session

    def no_ray(address: Any) -> None:  # a row that gets this far fails here, loudly
        raise AssertionError("the command connected to Ray before failing")

    monkeypatch.setattr(ray_session, "connect", no_ray)
    run = cli_in_process(args, monkeypatch, capsys)
    return run.returncode, run.stdout, run.stderr


def _subprocess(args: list[str], cwd: Path) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MEDPEFT_DB", "MEDPEFT_RESULTS", "MEDPEFT_WORKER_LOGS")}
    # this checkout's package, whichever one is installed
    env.update(HF_HUB_OFFLINE="1", MEDPEFT_CACHE=str(cwd / "cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "medpeft_ray.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def _params() -> list[Any]:
    params = []
    for row in ROWS:
        marks = []
        if row.id == "db-driver-not-installed" and importlib.util.find_spec("MySQLdb") is not None:
            marks.append(pytest.mark.skip(reason="MySQLdb (mysqlclient) is installed here: mysql:// has its driver"))
        if row.real:
            marks.append(pytest.mark.slow)  # a real CLI process: its imports cost seconds
        params.append(pytest.param(row, row.results, id=row.id, marks=marks))
    return params


@pytest.mark.parametrize(("row", "results"), _params(), indirect=["results"])
def test_bad_input(row: Row, results: Path, inputs: Path, closed_port: int, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("MEDPEFT_DB", "MEDPEFT_RESULTS", "MEDPEFT_WORKER_LOGS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # a default ./medpeft-results would land here, and is checked below

    def fill_in(text: str, escape: bool = False) -> str:
        values = {"{inputs}": str(inputs), "{results}": str(results), "{port}": str(closed_port)}
        for placeholder, value in values.items():
            text = text.replace(placeholder, re.escape(value) if escape else value)
        return text

    args = [fill_in(a) for a in row.args]
    before = _snapshot(results) if row.results else None
    code, out, err = _subprocess(args, tmp_path) if row.real else _in_process(args, monkeypatch, capsys)
    shown = f"$ medpeft-ray {' '.join(args)}\n-> exit {code}\nstdout:\n{out}\nstderr:\n{err}"

    assert code == row.code, shown
    assert "Traceback" not in out + err, shown
    if row.code == 0:  # handled, not refused
        assert re.search(fill_in(row.message, escape=True), out), shown
        assert err == "", shown
    else:
        # (a) one line naming the file or key (or one block, the first line naming the dataset folder)
        assert err.startswith("error: "), shown
        lines = err.removeprefix("error: ").rstrip("\n").split("\n")
        assert len(lines) == row.block, shown
        assert all(line.startswith("  ") for line in lines[1:]), shown  # the block's lines under its first
        assert re.fullmatch(fill_in(row.message, escape=True), lines[0]), shown
        assert row.names and fill_in(row.names) in lines[0], shown
        assert out == "", shown
    # (b) before any trial: no trial line, no Ray, nothing of a search in the results folder
    # (an in-process row that reached Ray failed at ray_session.connect, replaced by no_ray above)
    assert not re.search(r"^trial 1/|Ray cluster", out, re.MULTILINE), shown
    assert not (tmp_path / "medpeft-results").exists(), "wrote to the default results folder"
    if results.is_dir():
        assert not (results / "tune").exists() and not (results / "searches").exists(), shown
    # (c) results already written are intact
    if row.results:
        after = _snapshot(results)
        if row.results in ("filled", "read-only", "full-disk"):
            assert before is not None and len(before["trials"]) == 2
            # the leaderboard file may have gained SQLite's -wal/-shm beside it, and nothing else
            after["names"] = [n for n in after["names"] if not n.endswith(("-wal", "-shm"))]
        assert after == before, shown


def test_a_study_saved_by_a_version_laid_out_otherwise_is_refused_in_one_line(tmp_path: Path) -> None:
    """Tune pickles a study's searcher and callbacks by module path; a resume under a version whose
    modules moved says so in one line naming the study, instead of an unpickling traceback."""
    import types

    from ray import tune
    from ray.tune.search import Searcher

    from medpeft_ray.errors import MedpeftError
    from medpeft_ray.search.runner import _restore_tuner

    moved = types.ModuleType("medpeft_ray.search.moved_away")

    class Gate(Searcher):
        def suggest(self, trial_id: str) -> None:
            return None

    Gate.__module__, Gate.__qualname__, moved.Gate = moved.__name__, "Gate", Gate

    def trainable(config: dict) -> dict:
        return {"x": 1}

    sys.modules[moved.__name__] = moved
    try:  # a real Tuner writes its real saved state (tuner.pkl), naming the searcher's module
        tune.Tuner(trainable, tune_config=tune.TuneConfig(search_alg=Gate(metric="x", mode="max"), num_samples=1),
                   run_config=tune.RunConfig(name="study", storage_path=str(tmp_path)))
    finally:
        del sys.modules[moved.__name__]
    with pytest.raises(MedpeftError) as refused:
        _restore_tuner(str(tmp_path / "study"), trainable)
    assert str(refused.value) == (
        f"{tmp_path / 'study'}: the study's saved state was written by another version of medpeft-ray (No module "
        "named 'medpeft_ray.search.moved_away'); finish the search with that version (its rows and checkpoints are kept)")
