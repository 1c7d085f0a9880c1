"""Data parallel over 2 CPU processes (torchrun + accelerate's gloo process group), generic runner and stage 1."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from trainer.metrics import read_metrics
from trainer_fixtures import CONFIGS, REPO, demo_dataset, demo_models, run_toy  # noqa: F401

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")


def launch(args, timeout):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


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


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_stage1_two_processes(tmp_path, demo_models, demo_dataset):
    out = tmp_path / "s1"
    done = launch(["-m", "trainer.stage1", "--config", str(CONFIGS / "stage1_tiny.yaml"),
                   "--set", f"models_dir={demo_models}", "--set", f"data.path={demo_dataset}",
                   "--set", f"run.out_dir={out}", "--set", "run.steps=2", "--set", "export.merged=false"], timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["groups/total"] == 2 for r in rows)  # one group per process, counts summed
    assert (out / "export" / "vlm_lora.safetensors").is_file()
