"""The HTML report: its files and tables from known rows, a screenshot of it in headless Chromium,
and a report (plus best config and adapter export) from a real two-method, two-ratio search."""

from __future__ import annotations

import base64
import dataclasses
import io
import multiprocessing
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from conftest import leaderboard_row, tiny_search
from PIL import Image

from medpeft_ray.leaderboard import LeaderboardStore, TrialRecord
from medpeft_ray.leaderboard.report import make_figures, write_report
from medpeft_ray.leaderboard.report_html import render_html

FIGURES = ("metric_vs_ratio", "pareto", "progress", "learning_curves", "importance")
#: matplotlib's first two default colours (tab10 blue and orange): the first two methods' colour
TAB_BLUE, TAB_ORANGE = (31, 119, 180), (255, 127, 14)


def trial(
    trial_id: str, method: str, label_ratio: float, val_auroc: float | None, lr: float, **overrides: Any
) -> TrialRecord:
    values = dict(config={}, params={"lr": lr}, val_loss=None, best_epoch=2, epochs_run=3,
                  trainable_params={"lora": 20_000, "bitfit": 5_000}[method], total_params=5_500_000, wall_time_s=30.0)
    values = {**values, **overrides}
    if val_auroc is not None:  # a learning curve that peaks at the row's value, as long as the trial ran
        shape = [val_auroc - 0.06, val_auroc, val_auroc - 0.02][: values["epochs_run"]]
        values["details"] = {"curve": {"epoch": list(range(1, len(shape) + 1)), "val_auroc": shape}}
    return leaderboard_row(trial_id, method, label_ratio, val_auroc, **values)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LeaderboardStore]:
    store = LeaderboardStore(f"sqlite:///{tmp_path / 'leaderboard.db'}")
    rows = [
        trial("l1", "lora", 0.1, 0.70, 1e-4),
        trial("l2", "lora", 0.1, 0.75, 1e-3),
        trial("l3", "lora", 0.1, 0.78, 3e-3),
        trial("l4", "lora", 1.0, 0.85, 1e-4),
        trial("l5", "lora", 1.0, 0.88, 1e-3),
        trial("l6", "lora", 1.0, None, 5e-2, error="training loss is nan"),
        trial("b1", "bitfit", 0.1, 0.72, 1e-3),
        trial("b2", "bitfit", 0.1, 0.81, 1e-2),
        trial("b3", "bitfit", 0.1, 0.66, 1e-4),
        trial("b4", "bitfit", 1.0, 0.84, 1e-3),
        trial("b5", "bitfit", 1.0, 0.80, 1e-4, status="stopped", epochs_run=1),
    ]
    for row in rows:
        store.record(row)
    yield store
    store.engine.dispose()


def test_report_files_tables_and_no_network(store: LeaderboardStore, tmp_path: Path) -> None:
    index = write_report(store, ["lora-search", "bitfit-search"], tmp_path / "report")
    page = index.read_text()
    for name in FIGURES:
        png = (tmp_path / "report" / f"{name}.png").read_bytes()
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 150, name
        # the page embeds the same image, so index.html alone shows everything
        assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page, name
    # nothing is fetched from the network: no remote URL, script, stylesheet link or font import
    assert not re.search(r"https?://|<script|<link|@import|url\(", page)
    # comparison: at 0.1 bitfit 0.81 beats lora 0.78; at 1 lora 0.88 beats bitfit 0.84 -> both mean rank 1.5
    table = page[page.index('<table class="compare">') : page.index("</table>")]
    rows = re.findall(r"<tr>(.*?)</tr>", table)
    assert re.findall(r"<th[^>]*>(.*?)</th>", rows[0]) == ["method", "synthetic @ 0.1", "synthetic @ 1", "mean rank"]
    cells = {re.search(r'"name">(\w+)<', r).group(1): re.findall(r"<td[^>]*>([^<]*)", r)[1:] for r in rows[1:]}
    assert cells == {"bitfit": ["0.8100 ", "0.8400 ", "1.50"], "lora": ["0.7800 ", "0.8800 ", "1.50"]}
    assert '<td class="best">0.8100 <span class="rank">(1)</span></td>' in table
    assert '<td class="best">0.8800 <span class="rank">(1)</span></td>' in table
    assert '<td>0.7800 <span class="rank">(2)</span></td>' in table
    assert "11 trials (9 completed, 1 stopped, 1 failed)" in page
    assert "training loss is nan" in page and "lr=0.003" in page


def test_report_of_failed_trials_only_says_why_figures_are_missing(tmp_path: Path) -> None:
    store = LeaderboardStore(f"sqlite:///{tmp_path / 'leaderboard.db'}")
    store.record(trial("x", "lora", 0.1, None, 1e-3, error="out of memory"))
    page = write_report(store, ["lora-search"], tmp_path / "report").read_text()
    assert "No trial has a val_auroc yet." in page
    # and the calibration diagram, which needs the predictions these rows never kept
    assert page.count('<p class="missing">No figure:') == len(FIGURES) + 1
    assert "No figure: no trial has a val_auroc." in page
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["index.html"]
    store.engine.dispose()


# ----------------------------------------------------------------------------------------------
# In a browser
# ----------------------------------------------------------------------------------------------

WINDOW = (1400, 2000)


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(page: Path, target: Path) -> Image.Image:
    """A headless Chromium screenshot of ``page`` (file://, no network, a throw-away profile)."""
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (.ci/run installs one with apt-get where it can)")
    with tempfile.TemporaryDirectory(prefix="medpeft-chromium-") as profile:
        subprocess.run(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--screenshot={target}",
                f"--window-size={WINDOW[0]},{WINDOW[1]}",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            timeout=120,
            check=False,
        )
    assert target.is_file(), "chromium wrote no screenshot"
    return Image.open(target).convert("RGB")


def colour_share(image: Image.Image, colour: tuple[int, int, int], tolerance: int = 40) -> float:
    """The share of pixels within ``tolerance`` (per channel) of ``colour``."""
    pixels = np.asarray(image, dtype=np.int16)
    return float((np.abs(pixels - np.array(colour)) <= tolerance).all(axis=-1).mean())


def check_screenshot(image: Image.Image) -> None:
    assert image.size == WINDOW
    # not blank: a real share of the page is text, tables and plots
    dark = float((np.asarray(image.convert("L")) < 200).mean())
    assert dark > 0.01, f"only {dark:.1%} of the page is drawn"
    # the figures were decoded and drawn: the two methods' plot colours are on screen (a line
    # and a few markers are some hundreds of pixels of 2.8 million)
    for colour in (TAB_BLUE, TAB_ORANGE):
        assert colour_share(image, colour) > 1e-4, f"no figure in {colour} on the page"


def test_report_screenshot_in_headless_chromium(store: LeaderboardStore, tmp_path: Path) -> None:
    index = write_report(store, ["lora-search", "bitfit-search"], tmp_path / "report")
    check_screenshot(screenshot(index, tmp_path / "report.png"))


def test_learning_curves_drawn_in_headless_chromium(store: LeaderboardStore, tmp_path: Path) -> None:
    """The learning curves alone on the page: the methods' colours on screen come from that figure
    (the page's tables use neither), and the same page without it has neither colour."""
    frame = store.query()
    (curves,) = [f for f in make_figures(frame, "val_auroc") if f.name == "learning_curves"]
    assert curves.png is not None
    pages = {}
    for name, figure in (("curves", curves), ("without", dataclasses.replace(curves, png=None))):
        pages[name] = tmp_path / f"{name}.html"
        pages[name].write_text(render_html(frame, ["lora-search", "bitfit-search"], [figure], "val_auroc", store.label))
    check_screenshot(screenshot(pages["curves"], tmp_path / "curves.png"))
    without = screenshot(pages["without"], tmp_path / "without.png")
    assert max(colour_share(without, c) for c in (TAB_BLUE, TAB_ORANGE)) <= 1e-4


def test_blank_page_fails_the_screenshot_check(tmp_path: Path) -> None:
    page = tmp_path / "blank.html"
    page.write_text("<!DOCTYPE html><html><body></body></html>")
    with pytest.raises(AssertionError, match="of the page is drawn"):
        check_screenshot(screenshot(page, tmp_path / "blank.png"))


# ----------------------------------------------------------------------------------------------
# From a real search: two methods, two label ratios, one trial each
# ----------------------------------------------------------------------------------------------


def _search(method: str, options: dict[str, Any], results: str, address: str) -> None:
    """One search of ``method`` at label ratios 0.5 and 1 (one 1-epoch trial each), as its own driver."""
    from medpeft_ray.config import validate_search_dict
    from medpeft_ray.search.runner import run_search

    raw = tiny_search(
        experiment=f"tiny-{method}",
        method={"name": method, "options": options},
        dataset={"label_ratios": [0.5, 1.0]},
        train={"epochs": 1},
        search={"num_samples": 1, "seed": 0, "scheduler": {"type": "none"}},
    )
    run_search(validate_search_dict(raw, f"tiny-{method}.yaml"), results=results, address=address)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_report_best_and_export_from_a_real_search(ray_session: None, tmp_path: Path) -> None:
    import ray
    import torch
    import yaml
    from safetensors.torch import load_file

    from medpeft_ray.config import TrialConfig
    from medpeft_ray.data import load_splits
    from medpeft_ray.train.export import export_adapter, write_best_yaml
    from medpeft_ray.leaderboard.views import cell_label
    from medpeft_ray.metrics import mean_auroc
    from medpeft_ray.models import build_backbone
    from medpeft_ray.models.normalisation import input_statistics
    from medpeft_ray.train.engine import Batches

    from medpeft_ray.search.pools import release_executors

    results = tmp_path / "results"
    address = ray.get_runtime_context().gcs_address
    release_executors()  # executors this process kept from earlier tests would hold the CPUs the two drivers need
    # two searches at once, each its own driver process on the same cluster, writing one store
    # (as two teammates' searches would); their trials' start-up overlaps
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        searches = [
            pool.submit(_search, method, options, str(results), address)
            for method, options in (("lora", {"rank": 2}), ("bitfit", {}))
        ]
        for search in searches:
            search.result()
    store = LeaderboardStore(f"sqlite:///{results / 'leaderboard.db'}", create=False)
    rows = store.query()
    assert len(rows) == 4 and set(rows["status"]) == {"completed"}, rows[["method", "status", "error"]]

    # the comparison table holds each (method, ratio)'s trial; with two methods a rank is 1, 2 or 1.5 (a tie)
    table = store.compare()
    value = {(row.method, row.label_ratio): row.val_auroc for row in rows.itertuples()}
    for method, other in (("lora", "bitfit"), ("bitfit", "lora")):
        ranks = []
        for ratio in (0.5, 1.0):
            assert table.loc[method, cell_label("synthetic", ratio)] == value[method, ratio]
            mine, theirs = value[method, ratio], value[other, ratio]
            ranks.append(1.0 if mine > theirs else 2.0 if mine < theirs else 1.5)
        assert table.loc[method, "mean_rank"] == sum(ranks) / 2

    # each search's manifest holds what it cost, in the forecast's terms, and the report shows both
    from dataclasses import asdict

    from medpeft_ray.search.manifest import SearchManifest

    manifests = [asdict(SearchManifest.load(str(results), name)) for name in ("tiny-lora", "tiny-bitfit")]
    for manifest in manifests:
        mine = rows[rows["experiment"] == manifest["experiment"]]
        assert manifest["actual"]["trials"] == len(mine) == 2
        assert manifest["actual"]["epochs"] == int(mine["epochs_run"].sum())
        busy = (mine["train_time_s"] + mine["startup_s"]).sum()
        assert manifest["actual"]["device_hours"] * 3600 == pytest.approx(busy) and busy > 0
    index = write_report(store, ["tiny-lora", "tiny-bitfit"], tmp_path / "report", costs=manifests)
    page = index.read_text()
    assert "Forecast and actual cost" in page and page.count("<td>tiny-") >= 2
    assert all((tmp_path / "report" / f"{name}.png").is_file()
               for name in ("metric_vs_ratio", "pareto", "progress", "learning_curves"))
    # each row's curve holds every epoch it ran, with the value its column keeps at the best epoch
    for row in rows.to_dict(orient="records"):
        curve = row["details"]["curve"]
        assert curve["epoch"] == list(range(1, row["epochs_run"] + 1)), curve
        assert curve["val_auroc"][row["best_epoch"] - 1] == pytest.approx(row["val_auroc"])
    if chromium() is not None:  # without a browser the rest of this test still runs
        check_screenshot(screenshot(index, tmp_path / "report.png"))

    # best.yaml is the trial's own config
    best = store.best(dataset="synthetic", label_ratio=1.0, method="lora").iloc[0].to_dict()
    path = write_best_yaml(best, tmp_path / "best.yaml")
    assert TrialConfig.model_validate(yaml.safe_load(path.read_text())).model_dump(mode="json") == best["config"]

    # the merged export of the real checkpoint scores the validation split as the trial did
    exported = export_adapter(best, tmp_path / "adapter")
    assert exported.peft and exported.merged and exported.num_classes == 3
    config = TrialConfig.model_validate(best["config"])
    model = build_backbone(config.model.backbone, 3, config.dataset.image_size)
    model.load_state_dict(load_file(str(tmp_path / "adapter" / "model.safetensors")), strict=True)
    ds = config.dataset
    splits = load_splits(ds.name, ds.root, ds.image_size, ds.options, ds.seed)
    stats = input_statistics(config.model)
    x, y = Batches(splits.val.images, splits.val.labels, torch.device("cpu"), stats.mean, stats.std).get(
        torch.arange(len(splits.val)), torch.float32, None
    )
    with torch.no_grad():
        scores = model.eval()(x).numpy()
    assert mean_auroc(y.numpy(), scores)[0] == pytest.approx(best["val_auroc"], abs=1e-4)
    store.engine.dispose()


# ----------------------------------------------------------------------------------------------
# Generation searches: FID, and each method's samples under the same prompts
# ----------------------------------------------------------------------------------------------

PROMPTS = [f"Finding number {i} of the report text." for i in range(10)]  # 10: the figure shows the first 8


def generation_trial(
    trial_id: str, method: str, val_fid: float, checkpoint: Path | str | None, samples: bool = True,
    stand_in: bool = True, prompts: list[str] = PROMPTS, **overrides: Any
) -> TrialRecord:
    """A completed generation trial; ``samples``: its checkpoint folder holds a random samples.npy."""
    from medpeft_ray.samples import SAMPLES_FILE

    if samples and checkpoint is not None:
        Path(checkpoint).mkdir(parents=True, exist_ok=True)
        images = np.random.default_rng(len(trial_id) + int(val_fid)).integers(0, 256, (len(prompts), 16, 16))
        np.save(Path(checkpoint) / SAMPLES_FILE, images.astype(np.uint8))
    features = "stand-in random-conv 64" if stand_in else "inception-v3 pool3"
    values: dict[str, Any] = dict(
        experiment="generation-search", backbone="unet_tiny", status="completed", val_fid=val_fid, val_loss=0.5,
        params={"lr": 1e-4}, trainable_params={"lora": 20_000, "bitfit": 5_000, "full": 800_000}[method],
        total_params=800_000, checkpoint=None if checkpoint is None else str(checkpoint),
        details={"prompts": prompts, "fid_features": features, "fid_stand_in": stand_in},
    )
    return leaderboard_row(trial_id, method, 1.0, None, **{**values, **overrides})


def generation_store(tmp_path: Path, *rows: TrialRecord) -> LeaderboardStore:
    store = LeaderboardStore(f"sqlite:///{tmp_path / 'leaderboard.db'}")
    for row in rows:
        store.record(row)
    return store


def section(page: str, title: str) -> str:
    """The page from the heading ``title`` to the next heading."""
    start = page.index(f"<h2>{title}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start : end if end >= 0 else None]


def test_generation_report_shows_each_methods_samples_under_the_prompts(tmp_path: Path) -> None:
    from medpeft_ray.samples import SAMPLE_SEED

    runs = tmp_path / "runs"
    store = generation_store(
        tmp_path,
        generation_trial("g-lora-1", "lora", 31.5, runs / "l1"),
        generation_trial("g-lora-2", "lora", 40.0, runs / "l2"),  # lora's worse trial: not shown
        generation_trial("g-full", "full", 28.25, runs / "f"),
        generation_trial("g-bitfit", "bitfit", 35.0, runs / "b", samples=False),  # its samples.npy is missing
    )
    index = write_report(store, ["generation-search"], tmp_path / "report", metric="val_fid")
    page = index.read_text()
    png = (tmp_path / "report" / "samples.png").read_bytes()
    with Image.open(io.BytesIO(png)) as image:
        # 8 columns of prompts and 2 rows of methods: wider than high
        assert image.format == "PNG" and image.width >= 800 and 250 <= image.height < image.width
        grey = np.asarray(image.convert("L"))
    assert grey.std() > 20  # the random samples were drawn, not a blank page
    samples = section(page, "Samples per method")
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in samples
    # rows: each method with samples, best first, with its FID in the metric's digits
    assert "full (FID 28.25, trial generation-search / g-full), lora (FID 31.50, trial generation-search / g-lora-1)" \
        in samples
    assert "g-lora-2" not in samples
    # columns: the first 8 prompts, each with its seed; the seeds and the stand-in extractor in the caption
    for i, prompt in enumerate(PROMPTS[:8]):
        assert f"seed {SAMPLE_SEED + i}: “{prompt}”" in samples
    assert PROMPTS[8] not in page
    assert "the first 8 of the 10 fixed validation prompts" in samples
    assert f"(seeds {SAMPLE_SEED}–{SAMPLE_SEED + 7})" in samples
    assert "stand-in feature extractor (stand-in random-conv 64), not Inception" in samples
    # the method without samples: one line, and the report is written anyway
    notes = re.findall(r'<p class="missing">([^<]*)</p>', samples)
    assert notes == [f"bitfit (synthetic @ 1, trial generation-search / g-bitfit): no samples shown: "
                     f"{runs / 'b' / 'samples.npy'} is missing."]
    # FID everywhere with its label and digits; the stand-in said beside the tables too
    assert "metric: FID (stand-in feature extractor, not Inception)" in page
    for title in ("Methods compared", "Best configuration per study"):
        assert '<p class="warn">FID was computed with a stand-in feature extractor' in section(page, title)
    assert "<th>FID</th>" in page and ">28.25 <" in page and "<td>35.00</td>" in page
    # nothing of classification: no AUROC, no per-class values, no subgroups
    assert "auroc" not in page.lower() and "Worst-group gap" not in page
    store.engine.dispose()


def test_generation_report_with_inception_fid_and_unreadable_samples(tmp_path: Path) -> None:
    report = tmp_path / "report"
    report.mkdir()
    (report / "samples.png").write_bytes(b"an earlier report's figure")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "samples.npy").write_bytes(b"not a numpy file")
    store = generation_store(
        tmp_path,
        generation_trial("g-lora", "lora", 30.0, broken, samples=False, stand_in=False),
        generation_trial("g-full", "full", 20.0, "s3://bucket/results/g-full/checkpoint_000002", samples=False,
                         stand_in=False),
        generation_trial("g-bitfit", "bitfit", 25.0, None, stand_in=False),
    )
    page = write_report(store, ["generation-search"], report, metric="val_fid").read_text()
    samples = section(page, "Samples per method")
    assert "No figure: no method&#x27;s best trial has readable samples." in samples
    notes = re.findall(r'<p class="missing">([^<]*)</p>', samples)[1:]
    assert len(notes) == 3
    assert notes[0].startswith("full (synthetic @ 1, trial generation-search / g-full): no samples shown: its "
                               "checkpoint is in cloud storage (s3://bucket/results/g-full/checkpoint_000002)")
    assert notes[1] == ("bitfit (synthetic @ 1, trial generation-search / g-bitfit): no samples shown: "
                        "no checkpoint recorded.")
    assert notes[2] == (f"lora (synthetic @ 1, trial generation-search / g-lora): no samples shown: "
                        f"cannot read {broken / 'samples.npy'} (not a .npy file).")
    assert not (report / "samples.png").exists()  # the earlier report's figure is gone
    assert "stand-in" not in page and 'class="warn"' not in page  # Inception features: no stand-in warning
    # a better bitfit trial with samples: bitfit's row is drawn, the others' notes stay
    store.record(generation_trial("g-bitfit-2", "bitfit", 24.0, tmp_path / "b2", stand_in=False))
    page = write_report(store, ["generation-search"], report, metric="val_fid").read_text()
    samples = section(page, "Samples per method")
    assert (report / "samples.png").is_file() and "rows bitfit (FID 24.00, trial generation-search / g-bitfit-2)." \
        in samples
    assert len(re.findall(r'<p class="missing">', samples)) == 2
    assert "FID features: inception-v3 pool3." in samples and "stand-in" not in page
    store.engine.dispose()


def test_classification_report_has_no_samples_section(store: LeaderboardStore, tmp_path: Path) -> None:
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "samples.png").write_bytes(b"stale")
    page = write_report(store, ["lora-search", "bitfit-search"], tmp_path / "report").read_text()
    text = re.sub(r"base64,[^\"]*", "", page)
    assert "Samples per method" not in text and "FID" not in text and 'class="warn"' not in text
    assert not (tmp_path / "report" / "samples.png").exists()
