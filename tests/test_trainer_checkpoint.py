"""Checkpoints and the generic runner on a toy policy: atomic saves, exact resume, kill -9, NaN, OOM."""

import json
import re
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainer.checkpoint import latest_checkpoint, list_checkpoints, load_training_state, save_training_state
from trainer.metrics import read_metrics
from trainer.runner import make_optimizer
from trainer.config import OptimConfig
from vans.errors import InputError
from trainer_fixtures import REPO, ToyPolicy, run_toy


def _metric_rows(out_dir):
    return [{k: v for k, v in r.items() if not k.startswith(("time", "mem/"))} for r in read_metrics(out_dir)]


def test_save_load_roundtrip_restores_everything(tmp_path):
    p = torch.nn.Parameter(torch.randn(3))
    opt, sched = make_optimizer([p], OptimConfig(lr=0.1, warmup=3), 10)
    p.grad = torch.ones(3)
    opt.step()
    sched.step()
    torch.manual_seed(123)
    path = save_training_state(tmp_path, 1, trainable={"p": p.detach()}, optimizer=opt, scheduler=sched,
                               data_state={"position": 4}, extra={"note": "x"})
    expected_draw = torch.rand(2)
    opt2, sched2 = make_optimizer([torch.nn.Parameter(torch.zeros(3))], OptimConfig(lr=0.1, warmup=3), 10)
    torch.manual_seed(999)
    trainable, data_state, extra = load_training_state(path, opt2, sched2)
    assert torch.equal(torch.rand(2), expected_draw)  # RNG restored
    assert torch.equal(trainable["p"], p.detach()) and data_state == {"position": 4}
    assert extra == {"note": "x", "step": 1}
    assert sched2.last_epoch == 1 and opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_partial_checkpoint_is_ignored_and_old_ones_pruned(tmp_path):
    for step in (1, 2, 3, 4):
        save_training_state(tmp_path, step, trainable={"w": torch.zeros(1)}, optimizer=None, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    (tmp_path / ".tmp-step_00000005-1").mkdir()  # a save killed half-way
    torch.save({}, tmp_path / ".tmp-step_00000005-1" / "optimizer.pt")
    (tmp_path / "step_00000006").mkdir()  # an incomplete folder under a final name is not trusted either
    assert latest_checkpoint(tmp_path).name == "step_00000004"


def test_resume_equals_uninterrupted_run(tmp_path):
    full, toy_full = run_toy(tmp_path / "full")
    part, _ = run_toy(tmp_path / "resumed", "run.stop_at=3")  # stops after step 3 (checkpoint at 3)
    assert not part.finished and part.last_step == 3 and not (tmp_path / "resumed" / "export").exists()
    rest, toy_rest = run_toy(tmp_path / "resumed", "run.resume=true")
    assert rest.first_step == 4 and rest.finished
    assert _metric_rows(tmp_path / "full") == _metric_rows(tmp_path / "resumed")
    assert torch.equal(toy_full.weight, toy_rest.weight)
    assert toy_full.batches[3:] == toy_rest.batches  # the same data position after the resume
    assert (tmp_path / "resumed" / "export" / "toy.safetensors").is_file()


def test_resume_refuses_another_number_of_processes(tmp_path, caplog):
    run_toy(tmp_path, "run.stop_at=2")
    state = latest_checkpoint(tmp_path / "checkpoints") / "state.json"
    saved = json.loads(state.read_text())
    assert saved["extra"]["world_size"] == 1
    saved["extra"]["world_size"] = 2  # as if saved by a 2-process run
    state.write_text(json.dumps(saved))
    with pytest.raises(InputError, match=r"saved with 2 processes and this run has 1.*run\.allow_world_size_change"):
        run_toy(tmp_path, "run.resume=true")
    with caplog.at_level("WARNING", logger="vans.trainer"):
        result, _ = run_toy(tmp_path, "run.resume=true", "run.allow_world_size_change=true")
    assert result.first_step == 3 and result.finished
    assert any("saved with 2 processes" in r.getMessage() for r in caplog.records)


def test_refuses_to_overwrite_without_resume(tmp_path):
    run_toy(tmp_path, "run.steps=2")
    with pytest.raises(InputError, match="--resume"):
        run_toy(tmp_path, "run.steps=2")


def test_nan_gradient_skips_the_update(tmp_path):
    _, toy = run_toy(tmp_path, "run.steps=3", policy=ToyPolicy(nan_at={2}))
    rows = read_metrics(tmp_path)
    assert [r["count/skipped_updates"] for r in rows] == [0, 1, 0]
    assert torch.isfinite(toy.weight).all()


def test_a_step_without_learning_signal_leaves_the_weights_alone(tmp_path):
    """All groups skipped (zero spread / NaN): AdamW's momentum must not move the weights anyway."""
    seen = []

    class Recording(ToyPolicy):
        def step(self, batch, step):
            seen.append(self.weight.detach().clone())
            return super().step(batch, step)

    _, toy = run_toy(tmp_path, "run.steps=4", policy=Recording(silent_at={3}))
    rows = read_metrics(tmp_path)
    assert [r["count/no_signal_updates"] for r in rows] == [0, 0, 1, 0]
    assert torch.equal(seen[2], seen[3])  # step 3 changed nothing
    assert not torch.equal(seen[1], seen[2]) and not torch.equal(seen[3], toy.weight)


def test_out_of_memory_names_the_settings(tmp_path):
    with pytest.raises(InputError, match=r"out of memory at step 2.*toy\.batch.*run\.prompts_per_step"):
        run_toy(tmp_path, "run.steps=3", policy=ToyPolicy(oom_at={2}))


def test_data_is_visited_in_epochs(tmp_path):
    _, toy = run_toy(tmp_path, "run.steps=6")  # 6 samples, 2 per step: 2 epochs
    first, second = sum(toy.batches[:3], []), sum(toy.batches[3:], [])
    assert sorted(first) == sorted(second) == [f"s{i}" for i in range(6)] and first != second


def test_kill_9_mid_run_then_resume(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "tests" / "trainer_fixtures.py"), str(out), "--sleep", "0.05",
           "run.steps=400", "run.save_every=1", "run.keep_last=2"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(read_metrics(out)) < 5:
        time.sleep(0.05)
    time.sleep(0.13)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = latest_checkpoint(out / "checkpoints")
    assert latest is not None, "no checkpoint survived"
    trainable, _, extra = load_training_state(latest, restore_rng=False)
    done = len(read_metrics(out))
    assert extra["step"] >= done - 1  # save_every=1: at most one step lost
    resumed = subprocess.run(cmd[:3] + ["run.steps=" + str(extra["step"] + 2), "run.resume=true"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == list(range(1, extra["step"] + 3))
    assert json.loads((out / "toy_rank0.json").read_text())["batches"]  # the resumed process trained


def test_resume_with_other_settings_says_which(tmp_path, caplog):
    run_toy(tmp_path, "run.stop_at=2")
    with caplog.at_level("WARNING", logger="vans.trainer"):
        result, _ = run_toy(tmp_path, "run.resume=true", "optim.lr=0.5")
    assert result.finished
    warnings = [r.getMessage() for r in caplog.records if "differ from the saved run" in r.getMessage()]
    assert len(warnings) == 1 and "optim.lr" in warnings[0] and "run.resume" not in warnings[0]
    caplog.clear()
    run_toy(tmp_path / "again", "run.stop_at=2")
    with caplog.at_level("WARNING", logger="vans.trainer"):
        run_toy(tmp_path / "again", "run.resume=true")  # only the resume keys changed: no warning
    assert not any("differ from the saved run" in r.getMessage() for r in caplog.records)


def _summary_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vans.trainer"]


def test_every_run_ends_with_a_summary_of_steps_rewards_time_and_files(tmp_path, caplog):
    with caplog.at_level("INFO", logger="vans.trainer"):
        part, _ = run_toy(tmp_path, "run.stop_at=3")
    lines = _summary_lines(caplog)
    stop = next(i for i, line in enumerate(lines) if line.startswith("training stopped"))
    assert re.fullmatch(r"training stopped after step 3 of 6, \d+\.\d s; continue with --resume", lines[stop])
    caplog.clear()
    with caplog.at_level("INFO", logger="vans.trainer"):
        done, _ = run_toy(tmp_path, "run.resume=true")
    lines = _summary_lines(caplog)
    end = next(i for i, line in enumerate(lines) if line.startswith("training finished"))
    assert re.fullmatch(r"training finished: steps 4-6 of 6, resumed after step 3, \d+\.\d s", lines[end])
    rows = read_metrics(tmp_path)  # first -> last over the whole run, read from metrics.jsonl
    first, last = rows[0]["reward/total"], rows[-1]["reward/total"]
    assert lines[end + 1] == f"  reward/total: {first:.4g} (step 1) -> {last:.4g} (step 6)"
    assert lines[end + 2:] == [f"  metrics: {tmp_path / 'metrics.jsonl'}", f"  checkpoints: {tmp_path / 'checkpoints'}",
                               f"  export weights: {done.exports['weights']}"]
    assert (tmp_path / "export" / "toy.safetensors").samefile(done.exports["weights"])


def test_a_supervised_policy_summarises_its_loss_and_validation(tmp_path, caplog):
    class Supervised(ToyPolicy):
        name = "sft"

        def step(self, batch, step):
            out = super().step(batch, step)
            return {"loss": out["loss"], "val/loss": 2 * out["loss"]}

    with caplog.at_level("INFO", logger="vans.trainer"):
        run_toy(tmp_path, policy=Supervised())
    lines = _summary_lines(caplog)
    rows = read_metrics(tmp_path)
    assert any(re.fullmatch(r"step 6/6 loss \S+ val/loss \S+ grad_norm \S+ time/step_s \S+", line) for line in lines)
    end = next(i for i, line in enumerate(lines) if line.startswith("sft finished: steps 1-6 of 6, "))
    assert lines[end + 1:end + 3] == [f"  loss: {rows[0]['loss']:.4g} (step 1) -> {rows[-1]['loss']:.4g} (step 6)",
                                      f"  val/loss: {rows[0]['val/loss']:.4g} (step 1) -> "
                                      f"{rows[-1]['val/loss']:.4g} (step 6)"]


def test_one_log_format_for_every_stage():
    import logging

    from trainer.runner import LogFormatter

    def record(level, text):
        return logging.LogRecord("vans.trainer", level, __file__, 1, text, None, None)

    assert LogFormatter().format(record(logging.INFO, "step 1/6 reward/total 0.9")) == "step 1/6 reward/total 0.9"
    assert LogFormatter().format(record(logging.WARNING, "a group was skipped")) == "warning: a group was skipped"
    assert LogFormatter("[rank 1] ").format(record(logging.ERROR, "rank 1 failed")) == "[rank 1] error: rank 1 failed"


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_both_stage_commands_set_up_the_shared_log_format(stage, monkeypatch, capsys):
    import importlib

    import trainer.runner

    module = importlib.import_module(f"trainer.{stage}")
    calls = []
    monkeypatch.setattr(trainer.runner, "setup_logging", lambda: calls.append(stage))
    monkeypatch.setattr(module, "setup_logging", lambda: calls.append(stage), raising=False)
    assert module.main(["--set", "optim.lrr=1"]) == 2
    assert calls == [stage]
    assert capsys.readouterr().err.strip().startswith("error: unknown config key 'optim.lrr'; did you mean optim.lr?")
