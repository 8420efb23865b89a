"""Leaderboard views, checked by hand: the methods comparison, Pareto front, best per group,
search progress, hyperparameter importance, and their empty and bad-argument cases."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pytest
from conftest import leaderboard_row

from medpeft_ray.errors import MedpeftError, UsageError
from medpeft_ray.leaderboard import LeaderboardStore, TrialRecord, views


def trial(trial_id: str, method: str, label_ratio: float, val_auroc: float | None, **overrides: Any) -> TrialRecord:
    return leaderboard_row(trial_id, method, label_ratio, val_auroc, **{"epochs_run": 2, **overrides})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LeaderboardStore]:
    store = LeaderboardStore(f"sqlite:///{tmp_path / 'leaderboard.db'}")
    yield store
    store.engine.dispose()


def fill(store: LeaderboardStore, *records: TrialRecord) -> LeaderboardStore:
    for record in records:
        store.record(record)
    return store


# ----------------------------------------------------------------------------------------------
# The comparison table
# ----------------------------------------------------------------------------------------------


def two_method_two_ratio_search(store: LeaderboardStore) -> LeaderboardStore:
    """lora and bitfit at label ratios 0.1 and 1, several trials per cell, one failed, one stopped."""
    return fill(
        store,
        trial("l1", "lora", 0.1, 0.70),
        trial("l2", "lora", 0.1, 0.74),
        trial("l3", "lora", 0.1, 0.76, status="stopped", epochs_run=1),  # ASHA-stopped trials still count
        trial("l4", "lora", 1.0, 0.83),
        trial("l5", "lora", 1.0, None, error="diverged"),
        trial("b1", "bitfit", 0.1, 0.72),
        trial("b2", "bitfit", 0.1, 0.69),
        trial("b3", "bitfit", 1.0, 0.81),
        trial("b4", "bitfit", 1.0, 0.83),  # ties lora's best at 1.0
    )


def test_compare_two_methods_two_ratios_by_hand(store: LeaderboardStore) -> None:
    table = two_method_two_ratio_search(store).compare()
    # best per cell: lora 0.76 (stopped l3) and 0.83; bitfit 0.72 and 0.83
    # ranks: at 0.1 lora 1, bitfit 2; at 1.0 a tie, both (1 + 2) / 2 = 1.5
    # mean ranks: lora (1 + 1.5) / 2 = 1.25, bitfit (2 + 1.5) / 2 = 1.75
    assert table.index.name == "method"
    assert list(table.index) == ["lora", "bitfit"]
    assert list(table.columns) == ["synthetic @ 0.1", "synthetic @ 1", "mean_rank"]
    assert table.loc["lora", "synthetic @ 0.1"] == 0.76
    assert table.loc["lora", "synthetic @ 1"] == 0.83
    assert table.loc["bitfit", "synthetic @ 0.1"] == 0.72
    assert table.loc["bitfit", "synthetic @ 1"] == 0.83
    assert table.loc["lora", "mean_rank"] == 1.25
    assert table.loc["bitfit", "mean_rank"] == 1.75


def test_compare_by_val_loss_ranks_lowest_first(store: LeaderboardStore) -> None:
    table = two_method_two_ratio_search(store).compare(metric="val_loss")
    # val_loss = 1 - val_auroc, so the best (lowest) loss per cell is 1 - the best AUROC
    assert table.loc["lora", "synthetic @ 0.1"] == pytest.approx(0.24)
    assert table.loc["bitfit", "synthetic @ 0.1"] == pytest.approx(0.28)
    assert list(table.index) == ["lora", "bitfit"]
    assert table.loc["lora", "mean_rank"] == pytest.approx(1.25)


def test_compare_with_missing_cells_and_three_methods(store: LeaderboardStore) -> None:
    two_method_two_ratio_search(store)
    fill(
        store,
        trial("f1", "full", 0.1, 0.78),  # full only ran at 0.1, where it wins
        trial("n1", "lora", 0.1, 0.65, dataset="nih"),
        trial("n2", "bitfit", 0.1, 0.65, dataset="nih"),  # a tie
        trial("n3", "lora", 1.0, 0.90, dataset="nih"),
        trial("n4", "bitfit", 1.0, None, dataset="nih"),  # bitfit failed: no cell
    )
    table = store.compare()
    assert list(table.columns) == ["nih @ 0.1", "nih @ 1", "synthetic @ 0.1", "synthetic @ 1", "mean_rank"]
    # full: synthetic@0.1 rank 1 -> 1.0
    # lora: nih@0.1 1.5, nih@1 1, synthetic@0.1 2, synthetic@1 1.5 -> 6 / 4 = 1.5
    # bitfit: nih@0.1 1.5, synthetic@0.1 3, synthetic@1 1.5 -> 6 / 3 = 2.0
    assert list(table.index) == ["full", "lora", "bitfit"]
    assert list(table["mean_rank"]) == [1.0, 1.5, 2.0]
    assert math.isnan(table.loc["bitfit", "nih @ 1"]) and math.isnan(table.loc["full", "nih @ 0.1"])
    assert table.loc["lora", "nih @ 1"] == 0.90
    # filters narrow the table like any query
    only_nih = store.compare(dataset="nih")
    assert list(only_nih.columns) == ["nih @ 0.1", "nih @ 1", "mean_rank"]
    assert list(only_nih.index) == ["lora", "bitfit"]
    assert list(only_nih["mean_rank"]) == [1.25, 1.5]


def test_compare_backbones(store: LeaderboardStore) -> None:
    fill(store, trial("a", "lora", 1.0, 0.8), trial("b", "lora", 1.0, 0.9, backbone="resnet50"))
    table = store.compare(by="backbone")
    assert table.index.name == "backbone"
    assert list(table.index) == ["resnet50", "vit_tiny_patch16_224"]
    assert list(table["synthetic @ 1"]) == [0.9, 0.8]


def test_compare_empty_and_bad_arguments(store: LeaderboardStore) -> None:
    assert store.compare().empty
    fill(store, trial("x", "lora", 1.0, None))
    table = store.compare()
    assert table.empty and list(table.columns) == ["mean_rank"]
    with pytest.raises(UsageError, match="cannot rank trials by 'trainable_params'"):
        store.compare(metric="trainable_params")
    with pytest.raises(UsageError, match="cannot compare by 'dataset'"):
        store.compare(by="dataset")


MAE, MRM = "a1" * 32, "b2" * 32  # two pre-trained checkpoints' SHA-256


def test_compare_tells_checkpoints_apart(store: LeaderboardStore) -> None:
    fill(
        store,
        trial("m1", "lora", 0.1, 0.70, checkpoint_file="/w/mae.pth", checkpoint_sha256=MAE),
        trial("m2", "lora", 0.1, 0.80, checkpoint_file="/w/mrm.pth", checkpoint_sha256=MRM),
        trial("m3", "bitfit", 0.1, 0.75, checkpoint_file="/w/mrm.pth", checkpoint_sha256=MRM),
        trial("old", "lora", 0.1, 0.60),  # recorded before checkpoints were (schema version 2): unknown
    )
    table = store.compare()
    assert list(table.index) == ["lora [b2b2b2b2]", "bitfit [b2b2b2b2]", "lora [a1a1a1a1]", "lora [-]"]
    assert list(table["synthetic @ 0.1"]) == [0.80, 0.75, 0.70, 0.60]
    assert list(table["mean_rank"]) == [1.0, 2.0, 3.0, 4.0]
    # one checkpoint per dataset: rows are methods, as before
    assert list(store.compare(method="bitfit").index) == ["bitfit"]
    best = store.best_per_group(["method", "checkpoint_sha256"])
    assert list(zip(best["method"], best["checkpoint_sha256"].fillna("-"))) == [
        ("lora", MRM), ("bitfit", MRM), ("lora", MAE), ("lora", "-")]


def test_one_checkpoint_per_dataset_keeps_plain_rows(store: LeaderboardStore) -> None:
    fill(
        store,
        trial("a", "lora", 0.1, 0.70, checkpoint_sha256=MAE),
        trial("b", "lora", 0.1, 0.80, dataset="nih", checkpoint_sha256=MRM),
    )
    assert not views.several_checkpoints(store.query())
    assert list(store.compare().index) == ["lora"]


# ----------------------------------------------------------------------------------------------
# Pareto front, best per group, best
# ----------------------------------------------------------------------------------------------


def test_pareto_front_by_hand(store: LeaderboardStore) -> None:
    fill(
        store,
        trial("A", "lora", 0.1, 0.70, trainable_params=100),
        trial("B", "lora", 0.1, 0.74, trainable_params=100),  # beats A at the same cost
        trial("C", "full", 0.1, 0.74, trainable_params=200),  # as good as B, costlier: beaten
        trial("D", "lora", 0.1, 0.80, trainable_params=300),
        trial("E", "bitfit", 0.1, 0.60, trainable_params=50),  # cheapest: on the front
        trial("F", "full", 0.1, 0.80, trainable_params=300),  # identical to D: neither beats the other
        trial("G", "lora", 0.1, 0.95, trainable_params=None),  # no parameter count: not placed
        trial("H", "full", 0.1, 0.79, trainable_params=400),
        trial("I", "lora", 1.0, 0.50, trainable_params=10_000),  # alone in its (dataset, ratio)
        trial("J", "lora", 0.1, None, trainable_params=10),  # failed: not placed
    )
    front = store.pareto()
    assert list(front["trial_id"]) == ["E", "B", "D", "F", "I"]
    assert list(store.pareto(label_ratio=0.1)["trial_id"]) == ["E", "B", "D", "F"]
    # by loss (1 - AUROC) the same trials form the front
    assert list(store.pareto(metric="val_loss")["trial_id"]) == ["E", "B", "D", "F", "I"]


def test_best_per_group_and_best(store: LeaderboardStore) -> None:
    two_method_two_ratio_search(store)
    per_method = store.best_per_group(["method"])
    assert list(zip(per_method["method"], per_method["trial_id"])) == [("lora", "l4"), ("bitfit", "b4")]
    per_study = store.best_per_group(["method", "label_ratio"])
    assert {(r.method, r.label_ratio): r.trial_id for r in per_study.itertuples()} == {
        ("lora", 0.1): "l3",
        ("lora", 1.0): "l4",
        ("bitfit", 0.1): "b1",
        ("bitfit", 1.0): "b4",
    }
    assert list(store.best_per_group(["method"], metric="val_loss")["trial_id"]) == ["l4", "b4"]
    with pytest.raises(UsageError, match="cannot group by 'lr'"):
        store.best_per_group(["lr"])

    best = store.best(dataset="synthetic", label_ratio=1.0)
    assert isinstance(best, pd.DataFrame) and len(best) == 1
    assert best.iloc[0]["trial_id"] == "l4"  # tie with b4 at 0.83: the first recorded wins
    assert store.best(dataset="synthetic", label_ratio=0.1, method="bitfit").iloc[0]["trial_id"] == "b1"


def test_best_without_a_match_says_what_there_is(store: LeaderboardStore) -> None:
    with pytest.raises(MedpeftError) as info:
        store.best(dataset="nih", label_ratio=0.01)
    assert str(info.value) == (
        "no trial with a val_auroc in the trials matching dataset 'nih', label ratio 0.01; "
        "the leaderboard is empty (run `medpeft-ray search` first)"
    )
    two_method_two_ratio_search(store)
    with pytest.raises(MedpeftError) as info:
        store.best(dataset="synthetic", label_ratio=0.5, method="lora")
    assert str(info.value) == (
        "no trial with a val_auroc in the trials matching dataset 'synthetic', label ratio 0.5, "
        "method 'lora'; the leaderboard has synthetic at label ratios 0.1, 1 (bitfit, lora)"
    )
    fill(store, trial("z", "full", 0.5, None))
    with pytest.raises(MedpeftError) as info:
        store.best(dataset="synthetic", label_ratio=0.5)
    assert (
        str(info.value)
        == "no trial with a val_auroc in the trials matching dataset 'synthetic', label ratio 0.5 (1 failed)"
    )


# ----------------------------------------------------------------------------------------------
# Progress and importance
# ----------------------------------------------------------------------------------------------


def test_progress_by_hand(store: LeaderboardStore) -> None:
    fill(
        store,
        trial("p1", "lora", 0.1, 0.70, wall_time_s=10.0, epochs_run=2),
        trial("q1", "lora", 1.0, 0.90, wall_time_s=5.0, epochs_run=1),
        trial("p2", "lora", 0.1, 0.60, wall_time_s=20.0, epochs_run=1),
        trial("p3", "lora", 0.1, None, wall_time_s=None, epochs_run=None),
        trial("p4", "lora", 0.1, 0.80, wall_time_s=30.0, epochs_run=2),
    )
    steps = store.progress()
    low = steps[steps["label_ratio"] == 0.1]
    assert list(low["trial_id"]) == ["p1", "p2", "p3", "p4"]
    assert list(low["trial"]) == [1, 2, 3, 4]
    assert list(low["compute_s"]) == [10.0, 30.0, 30.0, 60.0]
    assert list(low["epochs"]) == [2, 3, 3, 5]
    assert list(low["best_so_far"]) == [0.70, 0.70, 0.70, 0.80]
    high = steps[steps["label_ratio"] == 1.0]
    assert list(high["best_so_far"]) == [0.90] and list(high["compute_s"]) == [5.0]
    assert list(store.progress(metric="val_loss")[lambda f: f["label_ratio"] == 0.1]["best_so_far"]) == pytest.approx(
        [0.30, 0.30, 0.30, 0.20]
    )


def test_importance_by_hand(store: LeaderboardStore) -> None:
    # lr rises with the metric (Spearman 1); targets splits the trials (a: worse, b: better);
    # rank is constant (left out); dropout appears in two trials only (left out)
    fill(
        store,
        trial("i1", "lora", 1.0, 0.60, params={"lr": 1e-4, "targets": "a", "rank": 8}),
        trial("i2", "lora", 1.0, 0.70, params={"lr": 3e-4, "targets": "a", "rank": 8, "dropout": 0.1}),
        trial("i3", "lora", 1.0, 0.80, params={"lr": 1e-3, "targets": "b", "rank": 8, "dropout": 0.2}),
        trial("i4", "lora", 1.0, 0.90, params={"lr": 3e-3, "targets": "b", "rank": 8}),
        # another label ratio where lr works the other way round, with a different metric level
        trial("j1", "lora", 0.1, 0.55, params={"lr": 1e-2}),
        trial("j2", "lora", 0.1, 0.50, params={"lr": 2e-2}),
        trial("k1", "bitfit", 1.0, 0.8, params={"lr": 1e-3}),
    )
    table = store.importance(label_ratio=1.0)
    assert list(table["parameter"]) == ["lr", "targets"]
    lr, targets = table.iloc[0], table.iloc[1]
    assert lr["kind"] == "numeric" and lr["spearman"] == pytest.approx(1.0) and lr["association"] == pytest.approx(1.0)
    # ranks .25 .5 | .75 1: means .375 and .875 around .625 -> eta = sqrt(4 * .25^2 / .3125) = sqrt(0.8)
    assert targets["kind"] == "categorical" and targets["association"] == pytest.approx(math.sqrt(0.8))
    assert math.isnan(targets["spearman"]) and targets["trials"] == 4
    # pooled over both ratios, ranks are taken within each ratio: lr's scores
    # (0.25, .5, .75, 1 at ratio 1; 1, .5 at ratio 0.1) against lr's overall order
    pooled = store.importance().set_index("parameter")
    x = pd.Series([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 2e-2]).rank()
    y = pd.Series([0.25, 0.5, 0.75, 1.0, 1.0, 0.5]).rank()
    assert pooled.loc["lr", "spearman"] == pytest.approx(x.corr(y))
    assert "bitfit" not in set(store.importance()["method"])  # one trial is too few


def test_views_of_an_empty_store(store: LeaderboardStore) -> None:
    assert store.pareto().empty
    assert store.best_per_group(["method"]).empty
    assert store.progress().empty and "best_so_far" in store.progress().columns
    assert store.importance().empty and "association" in store.importance().columns
    with pytest.raises(TypeError, match="unknown filter"):
        store.pareto(lr=0.1)


def test_markdown_table_escapes_pipes() -> None:
    frame = pd.DataFrame({"method": ["lora", "a|b"], "value": ["0.8", "x\ny"]})
    assert views.markdown_table(frame) == ("| method | value |\n|---|---|\n| lora | 0.8 |\n| a\\|b | x y |")
    assert views.markdown_table(frame.set_index("method"), index=True).splitlines()[0] == "| method | value |"
