"""A real search whose leaderboard and Optuna studies live in PostgreSQL (the shared-leaderboard path
users run on clusters), from a pre-trained checkpoint that every row records."""

from __future__ import annotations

import argparse
import hashlib
import uuid
from pathlib import Path

import pytest
from conftest import PG_ADDRESS, schema_tables, tiny_search

pytestmark = pytest.mark.ray


@pytest.mark.timeout(600)
def test_search_with_leaderboard_and_studies_in_postgresql(ray_session: None, pg_schema: str, tmp_path: Path) -> None:
    import optuna
    import torch

    from medpeft_ray.config import validate_search_dict
    from medpeft_ray.leaderboard import LeaderboardStore, optuna_storage
    from medpeft_ray.models import build_backbone
    from medpeft_ray.search.runner import run_search

    host, port = PG_ADDRESS
    # README's URL form (psycopg 3); `options` keeps this test's tables in its own schema
    url = f"postgresql://postgres@{host}:{port}/test?options=-csearch_path%3D{pg_schema}"
    weights = tmp_path / "mae.pth"
    torch.save({"model": build_backbone("vit_tiny_patch16_224", 1000, 32).state_dict(),
                "args": argparse.Namespace(model="mae_vit_tiny")}, weights)
    experiment = f"pg-{uuid.uuid4().hex[:8]}"
    raw = tiny_search(experiment=experiment, model={"checkpoint": str(weights)}, train={"epochs": 1})
    config = validate_search_dict(raw, "tiny.yaml")

    result = run_search(config, results=tmp_path / "results", db_url=url)

    assert result.db_url == url
    assert not (tmp_path / "results" / "leaderboard.db").exists()  # nothing went to SQLite
    store = LeaderboardStore(url, create=False)
    rows = store.query(experiment=experiment)
    assert len(rows) == 2, rows[["trial_id", "status", "error"]]
    assert set(rows["status"]) == {"completed"}, rows[["status", "error"]]
    assert rows["val_auroc"].between(0.0, 1.0).all() and (rows["epochs_run"] == 1).all()
    assert set(rows["checkpoint_file"]) == {str(weights)}
    assert set(rows["checkpoint_sha256"]) == {hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert len({t.record.trial_id for t in result.trials}) == 2
    store.engine.dispose()

    storage = optuna_storage(url)
    names = [name for name in optuna.get_all_study_names(storage) if name.startswith(f"{experiment}-ratio1-")]
    assert len(names) == 1, names
    study = optuna.load_study(study_name=names[0], storage=storage)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 2 and sorted(t.values[0] for t in finished) == sorted(rows["val_auroc"])
    assert {"medpeft_trials", "medpeft_schema", "studies", "trials"} <= schema_tables(url, pg_schema)
