"""Results on cloud storage, as clusters run: `--results s3://bucket/prefix` with a PostgreSQL leaderboard
(README's URL form, psycopg 3) that also holds the Optuna studies, from a pre-trained checkpoint every row records.

The bucket is served by moto's S3 server on 127.0.0.1, which the test starts. The CLI, Ray Tune,
Ray Train, the warm executors' checkpoints, the search manifest and the adapter export reach it
through the AWS environment variables (pyarrow reads ``AWS_ENDPOINT_URL``), by the same
``pyarrow.fs`` calls they make for a real bucket; nothing in the command line says it is not AWS.
The test reads the bucket back with boto3.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PG_ADDRESS, schema_tables, tiny_search

pytestmark = pytest.mark.ray

CLI = [sys.executable, "-m", "medpeft_ray.cli"]
PREFIX = "medpeft"


@pytest.fixture(scope="module")
def s3_endpoint() -> Any:
    """moto's S3 server on a free port of 127.0.0.1, for the tests of this module."""
    pytest.importorskip("boto3", reason="boto3 is not installed (pip install 'medpeft-ray[test]')")
    server_module = pytest.importorskip("moto.server", reason="moto's server is not installed (pip install 'moto[server]')")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request would bury a failure's report
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str) -> Bucket:
    return Bucket(s3_endpoint, f"medpeft-{uuid.uuid4().hex[:12]}")


class Bucket:
    """A fresh bucket on the test's server, the environment that points AWS clients at it, and reads of it."""

    def __init__(self, endpoint: str, name: str) -> None:
        import boto3

        self.name = name
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": endpoint}
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                                   aws_secret_access_key="testing")
        self.client.create_bucket(Bucket=name)

    @property
    def results(self) -> str:
        return f"s3://{self.name}/{PREFIX}"

    def keys(self, under: str = "") -> list[str]:
        """Every object's key under ``<prefix>/<under>``, relative to the prefix."""
        keys, token = [], None
        while True:
            page = self.client.list_objects_v2(Bucket=self.name, Prefix=f"{PREFIX}/{under}",
                                               **({"ContinuationToken": token} if token else {}))
            keys += [o["Key"].removeprefix(f"{PREFIX}/") for o in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return keys

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=f"{PREFIX}/{key}")["Body"].read()


@pytest.fixture
def pg_url(pg_schema: str) -> str:
    host, port = PG_ADDRESS
    return f"postgresql://postgres@{host}:{port}/test?options=-csearch_path%3D{pg_schema}"


def _env(bucket: Bucket, **extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", **bucket.env, **extra}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def _rows(store: Any) -> list[dict]:
    return store.query().to_dict(orient="records")


def _index(bucket: Bucket, key: str) -> list[dict]:
    try:
        return json.loads(bucket.read(key))["checkpoints"]
    except Exception:  # noqa: BLE001  (not there yet)
        return []


def _checkpointed_epochs(bucket: Bucket, run_part: str) -> list[int]:
    """Epochs in the trial records' checkpoints (``trial_record.json``, written once every rank's part of an
    epoch is in the bucket) of the trials whose folder name contains ``run_part``."""
    return [entry["epoch"] for key in bucket.keys("train/") if run_part in key and key.endswith("/trial_record.json")
            for entry in _index(bucket, key)]


def _local_litter(tmp_path: Path) -> list[str]:
    """What the commands left in their working folder besides the test's own files: results meant
    for the bucket that went to a local folder instead (``./medpeft-results``, an ``s3:`` folder)."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in ("tiny.yaml", "mae.pth", "cache", "export"))


@pytest.mark.timeout(600)
def test_a_search_keeps_its_results_in_the_bucket_and_exports_its_best_adapter_from_there(
        bucket: Bucket, pg_url: str, pg_schema: str, tmp_path: Path) -> None:
    import optuna
    import torch
    from safetensors.torch import load_file

    from medpeft_ray.leaderboard import LeaderboardStore, optuna_storage
    from medpeft_ray.models import build_backbone

    epochs = 3
    weights = tmp_path / "mae.pth"  # an MAE-style file: {"model": ..., "args": Namespace}
    torch.save({"model": build_backbone("vit_tiny_patch16_224", 1000, 32).state_dict(),
                "args": argparse.Namespace(model="mae_vit_tiny")}, weights)
    config = tiny_search(model={"checkpoint": str(weights)}, train={"epochs": epochs, "checkpoints_to_keep": 1},
                         search={"num_samples": 2, "seed": 0})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    env = _env(bucket)

    search = _run(["search", "--space", "tiny.yaml", "--results", bucket.results, "--db", pg_url], tmp_path, env)
    assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
    assert f"results in {bucket.results}" in search.stdout
    assert "tiny: 2 trials" in search.stdout

    store = LeaderboardStore(pg_url, create=False)
    rows = _rows(store)
    store.engine.dispose()
    assert len(rows) == 2 and all(r["status"] == "completed" and r["epochs_run"] == epochs for r in rows), rows
    # every row names the pre-trained weights it started from, by path and content
    assert {r["checkpoint_file"] for r in rows} == {str(weights)}
    assert {r["checkpoint_sha256"] for r in rows} == {hashlib.sha256(weights.read_bytes()).hexdigest()}
    # the study's Optuna history is in the same database, beside the leaderboard
    storage = optuna_storage(pg_url)
    names = [name for name in optuna.get_all_study_names(storage) if name.startswith("tiny-ratio1-")]
    assert len(names) == 1, names
    finished = [t for t in optuna.load_study(study_name=names[0], storage=storage).trials
                if t.state == optuna.trial.TrialState.COMPLETE]
    # the study told of each of the two trials: the same sampled points the leaderboard rows hold
    assert sorted(t.params["lr"] for t in finished) == sorted(r["params"]["lr"] for r in rows)
    assert {"medpeft_trials", "medpeft_schema", "studies", "trials"} <= schema_tables(pg_url, pg_schema)
    keys = bucket.keys()
    for row in rows:
        # the row names the best epoch's checkpoint in the bucket, where the trial's executor wrote it
        trial = f"train/tiny-ratio1-{row['trial_id']}"
        assert row["checkpoint"] == f"{bucket.results}/{trial}/checkpoint_{row['best_epoch']:06d}", row["checkpoint"]
        index = json.loads(bucket.read(f"{trial}/trial_record.json"))["checkpoints"]
        kept = {entry["epoch"] for entry in index}
        # checkpoints_to_keep 1: the best epoch stays; the latest, kept while the trial could resume, and
        # the others were deleted from the bucket
        assert kept == {row["best_epoch"]}, index
        stored = {int(k.split("/checkpoint_")[1][:6]) for k in keys if k.startswith(f"{trial}/checkpoint_")}
        assert stored == kept, sorted(k for k in keys if k.startswith(trial))
        for epoch in kept:
            assert f"{trial}/checkpoint_{epoch:06d}/trainable.safetensors" in keys
        # Tune's state of the study, and the trial's results, went to the bucket too
        assert any(k.startswith(f"tune/tiny-ratio1/run_trial-tiny-ratio1_{row['trial_id']}") and k.endswith("/result.json")
                   for k in keys)
    assert any(k.startswith("tune/tiny-ratio1/experiment_state-") for k in keys), keys
    manifest = json.loads(bucket.read("searches/tiny.json"))
    assert manifest["finished"] and manifest["studies_done"] == [1.0]
    assert _local_litter(tmp_path) == []

    best = _run(["best", "--dataset", "synthetic", "--label-ratio", "1", "--db", pg_url,
                 "--export-adapter", "export"], tmp_path, env)
    assert best.returncode == 0, best.stderr[-3000:]
    (winner,) = [r for r in rows if f"trial {r['trial_id']})" in best.stderr]
    assert winner["val_auroc"] == max(r["val_auroc"] for r in rows)
    out = tmp_path / "export"
    assert {"trainable.safetensors", "state.json", "peft", "config.yaml", "model.safetensors", "export.json"} <= {
        p.name for p in out.iterdir()}
    # the very bytes of the best epoch's checkpoint in the bucket, and no more of it than the export uses
    remote = winner["checkpoint"].removeprefix(f"{bucket.results}/")
    assert (out / "trainable.safetensors").read_bytes() == bucket.read(f"{remote}/trainable.safetensors")
    assert not (out / "deepspeed").exists()
    weights = load_file(str(out / "trainable.safetensors"))
    assert sum(t.numel() for t in weights.values()) == winner["trainable_params"]
    exported = json.loads((out / "export.json").read_text())
    assert exported["source"] == winner["checkpoint"] and exported["merged"] and exported["peft"]
    assert _local_litter(tmp_path) == []


@pytest.mark.timeout(600)
def test_a_killed_search_on_s3_resumes_from_the_bucket(bucket: Bucket, pg_url: str, tmp_path: Path) -> None:
    from medpeft_ray.leaderboard import LeaderboardStore

    epochs = 8  # about half a second each: room to kill the driver between the trial's first and last
    config = tiny_search(dataset={"label_ratios": [0.5, 1.0]}, train={"epochs": epochs},
                         search={"num_samples": 1, "max_concurrent": 1, "seed": 0})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    store = LeaderboardStore(pg_url)  # the search finds the tables made; the test reads rows while it runs
    # Tune writes its experiment state (to the bucket) every second instead of every ten or so
    env = _env(bucket, TUNE_GLOBAL_CHECKPOINT_S="1")
    driver = subprocess.Popen([*CLI, "search", "--space", "tiny.yaml", "--results", bucket.results, "--db", pg_url],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        # wait until the first study is done and the second one's trial has an epoch in the bucket
        deadline = time.time() + 400
        while not (store.count() == 1 and _checkpointed_epochs(bucket, "ratio1-")):
            assert driver.poll() is None, driver.stdout.read()[-3000:] if driver.stdout else ""
            assert time.time() < deadline, "the second study checkpointed no epoch within 400 s"
            time.sleep(0.2)
        killed_at = time.time()
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started, without warning
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    at_kill = _checkpointed_epochs(bucket, "ratio1-")
    assert max(at_kill) < epochs, f"the driver was killed only after the trial's last epoch ({at_kill}): too slow to test"
    before = {r["trial_id"]: r["created_at"] for r in _rows(store)}
    assert len(before) == 1
    assert json.loads(bucket.read("searches/tiny.json"))["studies_done"] == [0.5]

    # the manifest, Tune's state and the checkpoints are read back from the bucket: nothing local
    resumed = _run(["search", "--resume", "tiny", "--results", bucket.results, "--db", pg_url], tmp_path, env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming the interrupted study" in resumed.stdout, resumed.stdout[-3000:]
    assert "tiny: 2 trials" in resumed.stdout, resumed.stdout[-3000:]

    rows = _rows(store)
    store.engine.dispose()
    assert sorted(r["label_ratio"] for r in rows) == [0.5, 1.0]  # as many rows as without the kill
    assert all(r["status"] == "completed" and r["epochs_run"] == epochs for r in rows), rows
    assert all(r["created_at"] == before[r["trial_id"]] for r in rows if r["trial_id"] in before)
    # the interrupted trial went on from its last checkpoint in the bucket instead of starting over
    (interrupted,) = [r for r in rows if r["trial_id"] not in before]
    (result_key,) = [k for k in bucket.keys("tune/tiny-ratio1/")
                     if f"_{interrupted['trial_id']}_" in k and k.endswith("/result.json")]
    reported = [json.loads(line) for line in bucket.read(result_key).decode().splitlines() if line.strip()]
    # Tune's results span the whole trial, each epoch once, counted in epochs
    assert [(r["epoch"], r["training_iteration"]) for r in reported] == [(e, e) for e in range(1, epochs + 1)]
    # the epochs in the bucket at the kill were trained once, before it (the killed Ray's executor
    # may have written a later one before its processes noticed and ended; the resumed run went on
    # from the latest in the bucket's record)
    record = json.loads(bucket.read(f"train/tiny-ratio1-{interrupted['trial_id']}/trial_record.json"))
    assert [m["epoch"] for m in record["epochs"]] == list(range(1, epochs + 1))
    assert all(m["worker_started_at"] < killed_at for m in record["epochs"][: max(at_kill)]), (at_kill, record)
    assert interrupted["details"]["curve"]["epoch"] == list(range(1, epochs + 1))
    assert interrupted["checkpoint"].startswith(f"{bucket.results}/train/tiny-ratio1-{interrupted['trial_id']}/")
    assert json.loads(bucket.read("searches/tiny.json"))["finished"]
    assert _local_litter(tmp_path) == []
    # a finished search has nothing left to resume, as the bucket's manifest says
    again = _run(["search", "--resume", "tiny", "--results", bucket.results, "--db", pg_url], tmp_path, env)
    assert again.returncode == 1 and "finished" in again.stderr, again.stderr
