"""Data parallel over 2 CPU processes (gloo), generic runner (torchrun) and stage 1 (accelerate launch)."""

import json
import os
import shutil
import sys

import pytest

from trainer.metrics import read_metrics
from trainer.runner import reduce_metric_values
from trainer_fixtures import (CONFIGS, REPO, demo_dataset, demo_models,  # noqa: F401
                              launch_two_processes, run_toy)

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")


def launch(args, timeout):
    return launch_two_processes(args, timeout, launcher="torchrun")


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_two_processes_split_the_prompts_and_stay_in_sync(tmp_path):
    out = tmp_path / "ddp"
    done = launch([str(REPO / "tests" / "trainer_fixtures.py"), str(out)], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((out / f"toy_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weight"] == ranks[1]["weight"]  # gradients all-reduced: identical updates
    _, single = run_toy(tmp_path / "single")
    for step, (a, b) in enumerate(zip(ranks[0]["batches"], ranks[1]["batches"])):
        assert len(a) == len(b) == 1 and sorted(a + b) == sorted(single.batches[step])  # a split of the same prompts
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(r["groups/total"] == 2 for r in rows)


def test_stage1_two_processes_with_accelerate_launch(tmp_path, demo_models, demo_dataset):
    out = tmp_path / "s1"
    done = launch_two_processes(["-m", "trainer.stage1", "--config", str(CONFIGS / "stage1_tiny.yaml"),
                   "--set", f"models_dir={demo_models}", "--set", f"data.path={demo_dataset}",
                   "--set", f"run.out_dir={out}", "--set", "run.steps=2", "--set", "export.merged=false"], timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["groups/total"] == 2 for r in rows)  # one group per process, counts summed
    assert (out / "export" / "vlm_lora.safetensors").is_file()


def test_metrics_are_reduced_by_kind():
    """Per-rank dicts as all_gather_object returns them: sums, once-only counts, extremes, means."""
    ranks = [{"count/groups": 1.0, "groups/total": 1, "count/skipped_updates": 1, "count/no_signal_updates": 0,
              "ratio_min": 0.9, "ratio_max": 1.1, "logprob_diff_max": 0.5, "adv/advantage_abs_max": 2.0,
              "adv/abs_max": 1.5, "logp_mismatch": 0.01, "mem/peak_mb": 10.0, "kl": 0.2, "loss": float("nan"),
              "note": "text"},
             {"count/groups": 1.0, "groups/total": 1, "count/skipped_updates": 1, "count/no_signal_updates": 0,
              "ratio_min": 0.7, "ratio_max": 1.05, "logprob_diff_max": 0.9, "adv/advantage_abs_max": 3.0,
              "adv/abs_max": 1.0, "logp_mismatch": 0.03, "mem/peak_mb": 30.0, "kl": 0.4, "loss": 2.0}]
    out = reduce_metric_values(ranks)
    assert out["count/groups"] == 2 and out["groups/total"] == 2  # one group per process, summed
    # decided once after the gradient all-reduce: one skipped update is one, not one per process
    assert out["count/skipped_updates"] == 1 and out["count/no_signal_updates"] == 0
    assert out["ratio_min"] == 0.7 and out["ratio_max"] == 1.1 and out["logprob_diff_max"] == 0.9
    assert out["adv/advantage_abs_max"] == 3.0 and out["adv/abs_max"] == 1.5 and out["logp_mismatch"] == 0.03
    assert out["mem/peak_mb"] == 30.0 and out["kl"] == pytest.approx(0.3) and out["loss"] == 2.0
    assert "note" not in out


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_an_error_on_one_process_stops_both(tmp_path):
    """policy.step raises on rank 1 at step 2: rank 0 must not wait forever in the gradient all-reduce."""
    out = tmp_path / "ddp"
    done = launch([str(REPO / "tests" / "trainer_fixtures.py"), str(out), "--error-at", "1:2"], timeout=120)
    assert done.returncode != 0
    assert "toy input video is unreadable on rank 1 at step 2" in done.stderr  # the failed rank's own error
    assert "rank 1 failed at step 2: see its log" in done.stderr  # rank 0 names it
    assert [r["step"] for r in read_metrics(out)] == [1]
