"""Shared fixtures of the trainer tests (T2's stage-2 tests import them too).

    from trainer_fixtures import demo_models, demo_dataset, tiny_overrides  # noqa: F401  (pytest fixtures)

``demo_models``: the tiny random-weight model set in a ComfyUI models/ tree (once per session).
``demo_dataset``: 4 synthetic clip pairs + train.jsonl in a session folder.
``tiny_overrides(out_dir, models, data)``: the --set list that points stage1_tiny.yaml at them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vans import progress

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "trainer" / "configs"


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> Path:
    from vans.fixtures import write_demo_models

    return write_demo_models(tmp_path_factory.mktemp("trainer_models") / "models")


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    from trainer.data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("trainer_data"), count=4)


@pytest.fixture
def quiet():
    with progress.quiet():
        yield


def tiny_overrides(out_dir, models, data, *extra: str) -> list[str]:
    return [f"models_dir={models}", f"data.path={data}", f"run.out_dir={out_dir}", *extra]


# ----------------------------------------------------------------------------------------------------
# A toy policy for the generic runner (fast: a linear regression; every process runs it the same way)


class ToyPolicy:
    """Fits w·x ≈ x·w_true on fresh random x each step; ``reward/total`` = −loss. Knobs for tests:
    ``nan_at`` (steps whose gradient is NaN), ``oom_at`` (steps that raise CUDA OOM), ``sleep`` (s per step),
    ``silent_at`` (steps with no learning signal, as when every group has zero reward spread),
    ``error_at`` ((rank, step) pairs where ``step`` raises ValueError, as for a bad video; rank = $RANK)."""

    memory_settings = ("toy.batch",)

    def __init__(self, dim: int = 4, nan_at=(), oom_at=(), sleep: float = 0.0, silent_at=(), error_at=()):
        import torch

        torch.manual_seed(0)
        self.weight = torch.nn.Parameter(torch.zeros(dim))
        self.target = torch.arange(1.0, dim + 1)
        self.nan_at, self.oom_at, self.sleep = set(nan_at), set(oom_at), sleep
        self.silent_at = set(silent_at)
        self.error_at = {(int(r), int(s)) for r, s in error_at}
        self.batches: list[list[str]] = []

    def trainable_parameters(self):
        return [self.weight]

    def trainable_state_dict(self):
        return {"weight": self.weight.detach().clone()}

    def load_trainable_state_dict(self, sd):
        import torch

        with torch.no_grad():
            self.weight.copy_(sd["weight"])

    def step(self, batch, step):
        import os
        import time

        import torch

        if step in self.oom_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        rank = int(os.environ.get("RANK", "0"))
        if (rank, step) in self.error_at:
            raise ValueError(f"toy input video is unreadable on rank {rank} at step {step}")
        self.batches.append([s.id for s in batch])
        x = torch.randn(8 * len(batch), self.weight.numel())
        loss = ((x @ self.weight - x @ self.target) ** 2).mean()
        if step in self.nan_at:
            loss = loss * float("nan")
        if step in self.silent_at:
            loss = loss * 0.0
        loss.backward()
        if self.sleep:
            time.sleep(self.sleep)
        return {"reward/total": -float(loss.detach()), "loss": float(loss.detach()), "groups/total": len(batch)}

    def export(self, out_dir):
        from vans.checkpoints import save_state_dict

        return {"weights": str(save_state_dict(self.trainable_state_dict(), Path(out_dir) / "toy.safetensors"))}


def launch_two_processes(args: list[str], timeout: float, launcher: str = "accelerate"):
    """Run ``args`` (a script path or ``-m module`` plus its arguments) in 2 CPU processes.

    ``accelerate``: the command users type, ``accelerate launch --multi_gpu --num_processes 2`` (on a machine
    without GPUs accelerate starts the processes with gloo on the CPU); ``torchrun``: the plain PyTorch launcher.
    """
    import os
    import shutil
    import subprocess
    import sys

    found = shutil.which(launcher, path=os.path.dirname(sys.executable)) or shutil.which(launcher)
    if found is None:
        pytest.skip(f"{launcher} not installed")
    if launcher == "accelerate":
        cmd = [found, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    else:
        cmd = [found, "--standalone", "--nproc_per_node", "2", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def toy_samples(count: int = 6):
    from trainer.data import Sample

    return [Sample(id=f"s{i}", video="", question="q", think="", caption="c", gt_video="") for i in range(count)]


def toy_config(out_dir, *overrides: str):
    from trainer.config import load_config
    from trainer.stage1 import Stage1Config

    base = [f"run.out_dir={out_dir}", "run.steps=6", "run.save_every=2", "run.prompts_per_step=2", "run.device=cpu",
            "run.plot=false", "run.tensorboard=false", "optim.lr=0.05"]
    return load_config(Stage1Config, None, base + list(overrides))


def run_toy(out_dir, *overrides: str, policy: ToyPolicy | None = None):
    """Run the generic runner on the toy policy; returns (result, policy)."""
    from trainer.runner import run_training

    policy = policy or ToyPolicy()
    with progress.quiet():
        result = run_training(toy_config(out_dir, *overrides), policy, samples=toy_samples())
    return result, policy


if __name__ == "__main__":  # subprocess tests:
    # python tests/trainer_fixtures.py OUT_DIR [--sleep S] [--error-at RANK:STEP] [key=value ...]
    import sys

    sys.path.insert(0, str(REPO))
    args = sys.argv[1:]
    sleep, error_at = 0.0, []
    while args[1:2] and args[1] in ("--sleep", "--error-at"):
        if args[1] == "--sleep":
            sleep = float(args[2])
        else:
            error_at.append(tuple(args[2].split(":")))
        args = args[:1] + args[3:]
    import json
    import os

    result, toy = run_toy(args[0], *args[1:], policy=ToyPolicy(sleep=sleep, error_at=error_at))
    rank = int(os.environ.get("RANK", "0"))
    record = {"weight": toy.weight.tolist(), "batches": toy.batches}
    (Path(args[0]) / f"toy_rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")
    print(f"done {result.last_step} finished={result.finished}")
