"""The worker loop on two ranks (gloo, CPU): every DeepSpeed option, gathered metrics, resume.

Two processes run the same trial as a two-worker trial's workers would (their own process group,
each rank its shard of the data) for a list of DeepSpeed settings; the parent compares the
numbers. In fp32 the ZeRO stages, offloading and gradient accumulation change where state lives
and how the batch is split, not the arithmetic, so each must reproduce the plain run; and two
workers must reproduce one worker on the same global batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_search

# LoRA without dropout and no augmentation: two ranks then see exactly what one rank sees
BASE_TRAIN = {"epochs": 2, "batch_size": 8, "augment": "none", "lr": 3e-3}
CASES: dict[str, dict[str, Any]] = {
    "zero0": {},
    "zero1": {"deepspeed": {"zero_stage": 1}},
    "zero2": {"deepspeed": {"zero_stage": 2}},
    "zero3": {"deepspeed": {"zero_stage": 3}},
    "zero2_offload": {"deepspeed": {"zero_stage": 2, "offload_optimizer": "cpu"}},
    "zero3_offload_all": {"deepspeed": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"}},
    "accumulate2": {"deepspeed": {"gradient_accumulation_steps": 2}},
    "clip_tight": {"deepspeed": {"gradient_clipping": 1e-3}},
    "bf16": {"precision": "bf16"},
    "sgd_layer_decay": {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0, "layer_decay": 0.65, "lr": 3e-2},
}

pytestmark = pytest.mark.slow  # two-process DeepSpeed runs


def _trial(train: dict[str, Any]) -> Any:
    from medpeft_ray.config import validate_search_dict

    changes = {**BASE_TRAIN, **train}
    changes["deepspeed"] = {**changes.get("deepspeed", {})}
    search = validate_search_dict(
        tiny_search(
            method={"name": "lora", "options": {"rank": 2, "dropout": 0.0}},
            train=changes,
            resources={"workers_per_trial": 2, "cpus_per_worker": 1, "gpus_per_worker": 0},
        ),
        "tiny.yaml",
    )
    return search.trial_config(1.0, {})


def _rank_main(rank: int, world: int, port: int, out_dir: str, cache: str) -> None:
    """One rank: runs every case, then resumes the plain case from its merged epoch-1 checkpoint."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), MEDPEFT_CACHE=cache, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    import torch.distributed as dist

    from medpeft_ray.train.engine import WorkerContext
    from medpeft_ray.train.recipes import run_training

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = Path(out_dir)
    results: dict[str, list[dict[str, Any]]] = {}

    def runner(name: str) -> Any:
        results[name] = []

        def report(metrics: dict[str, Any], directory: Path | None) -> None:
            results[name].append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            if directory is not None:  # merge every rank's part, as Ray Train does in storage
                shutil.copytree(directory, out / name / f"epoch{metrics['epoch']}", dirs_exist_ok=True)

        return report

    for name, train in CASES.items():
        run_training(_trial(train), WorkerContext(rank, world, torch.device("cpu")), runner(name))
        dist.barrier()
    run_training(_trial({}), WorkerContext(rank, world, torch.device("cpu"), out / "zero0" / "epoch1"), runner("resumed"))
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("ranks")
    cache = str(tmp_path_factory.mktemp("cache"))
    mp.start_processes(_rank_main, args=(2, _free_port(), str(out), cache), nprocs=2, start_method="spawn", join=True)
    return json.loads((out / "rank0.json").read_text()), json.loads((out / "rank1.json").read_text()), out


def _numbers(reports: list[dict[str, Any]]) -> list[float]:
    """Training loss, validation loss and AUROC of every epoch, in one flat list."""
    return [r[key] for r in reports for key in ("train_loss", "val_loss", "val_auroc")]


def test_every_rank_reports_the_same_gathered_metrics(two_ranks: Any) -> None:
    rank0, rank1, _ = two_ranks
    for name in CASES:
        assert [r["epoch"] for r in rank0[name]] == [1, 2], name
        assert _numbers(rank0[name]) == _numbers(rank1[name]), name
        assert all(math.isfinite(v) for v in _numbers(rank0[name])), name
        assert rank0[name][0]["train_images"] == rank1[name][0]["train_images"]


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero2_offload", "zero3_offload_all", "accumulate2"])
def test_zero_stages_offload_and_accumulation_reproduce_the_plain_run(two_ranks: Any, name: str) -> None:
    rank0, _, _ = two_ranks
    assert _numbers(rank0[name]) == pytest.approx(_numbers(rank0["zero0"]), abs=1e-5)


def test_options_that_change_the_arithmetic_change_the_result(two_ranks: Any) -> None:
    rank0, _, _ = two_ranks
    plain = _numbers(rank0["zero0"])
    for name in ("clip_tight", "bf16", "sgd_layer_decay"):
        assert _numbers(rank0[name]) != pytest.approx(plain, abs=1e-6), name
    # bf16 rounds, it does not derail: the loss stays near the fp32 one
    assert rank0["bf16"][-1]["train_loss"] == pytest.approx(rank0["zero0"][-1]["train_loss"], abs=0.05)


def test_two_workers_match_one_worker_on_the_same_global_batch(two_ranks: Any) -> None:
    from medpeft_ray.train.engine import WorkerContext, ensure_process_group
    from medpeft_ray.train.recipes import run_training

    rank0, _, _ = two_ranks
    torch.set_num_threads(1)
    ensure_process_group("gloo")
    single: list[dict[str, Any]] = []
    run_training(_trial({}), WorkerContext(0, 1, torch.device("cpu")), lambda m, d: single.append(m))
    # the validation AUROC is computed on predictions gathered from both ranks (an average of
    # per-rank AUROCs would not equal the single worker's); losses agree up to summation order
    assert _numbers(rank0["zero0"]) == pytest.approx(_numbers(single), abs=1e-5)


def test_resume_from_a_two_rank_checkpoint_continues_exactly(two_ranks: Any) -> None:
    rank0, rank1, out = two_ranks
    # both ranks' DeepSpeed state lands in one checkpoint folder, beside rank 0's weights
    files = {p.name for p in (out / "zero3" / "epoch1").rglob("*") if p.is_file()}
    assert {"trainable.safetensors", "state.json"} <= files
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= files
    # epoch 2 after a resume from epoch 1 (weights, Adam moments, lr schedule) equals epoch 2 of the run
    assert [r["epoch"] for r in rank0["resumed"]] == [2]
    assert rank0["resumed"][0]["resumed_from_epoch"] == 1
    assert _numbers(rank0["resumed"]) == pytest.approx(_numbers(rank0["zero0"])[3:], abs=1e-6)
    assert _numbers(rank1["resumed"]) == _numbers(rank0["resumed"])
