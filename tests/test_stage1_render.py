"""Stage 1's render economy (``render.scope``, ``render.reuse``, fewer steps, CFG off) on the tiny random-weight
models, CPU: each saving either changes nothing in the videos (scope, reuse) or is counted exactly in DiT calls
and rows (the generator's counters), so the benchmark's figures rest on checked mechanics."""

import dataclasses

import pytest
import torch

from trainer.config import load_config
from trainer.data import load_samples
from trainer.runner import setup_runtime
from trainer.stage1 import Stage1Config, Stage1Policy, _render_chunks
from vans import progress
from vans.errors import InputError
from trainer_fixtures import CONFIGS, demo_dataset, demo_models, tiny_overrides  # noqa: F401

STEPS, G = 3, 4


@pytest.fixture(scope="module")
def policy(tmp_path_factory, demo_models, demo_dataset):
    cfg = load_config(Stage1Config, CONFIGS / "stage1_tiny.yaml", tiny_overrides(
        tmp_path_factory.mktemp("render"), demo_models, demo_dataset, f"render.steps={STEPS}", "render.guidance=5.0",
        f"rollout.group_size={G}", f"render.batch={G}"))
    return Stage1Policy(cfg, setup_runtime(cfg.run))


def _render(policy, groups, **changes):
    policy.set_render(dataclasses.replace(policy.cfg.render, **changes))
    gen = policy.generator
    calls, rows = gen.dit_calls, gen.dit_rows
    with progress.quiet():
        videos = policy.render(groups, step=3)
    return videos, gen.dit_calls - calls, gen.dit_rows - rows


def _groups(demo_dataset, captions):
    samples = load_samples(demo_dataset).samples
    return [(samples[i], list(c)) for i, c in enumerate(captions)]


def _close(a, b):
    return all(torch.allclose(x, y, atol=1e-5) for ga, gb in zip(a, b) for x, y in zip(ga, gb))


CAPTIONS = (["a dog runs", "a cat sits", "rain falls", "a car stops"],
            ["two birds", "a boat", "snow on a roof", "a man waves"])


def test_one_batch_per_step_renders_the_same_videos_in_fewer_calls(policy, demo_dataset):
    groups = _groups(demo_dataset, CAPTIONS)
    by_prompt, calls_p, rows_p = _render(policy, groups, scope="prompt", reuse=False, batch=G)
    by_step, calls_s, rows_s = _render(policy, groups, scope="step", reuse=False, batch=2 * G)
    assert _close(by_prompt, by_step)  # each row keeps its own prompt's context and noise
    assert not torch.allclose(by_prompt[0][0], by_prompt[1][0], atol=1e-3)  # and the prompts do differ
    assert (calls_p, rows_p) == (2 * STEPS, 2 * STEPS * 2 * G)  # per prompt and step: one CFG batch of 2G rows
    assert (calls_s, rows_s) == (STEPS, rows_p)  # half the calls, the same rows
    # a batch smaller than a group still splits within the group under scope=prompt, across groups under step
    assert _render_chunks([(0,), (0,), (0,), (1,), (1,)], 2, by_group=True) == [[0, 1], [2], [3, 4]]
    assert _render_chunks([(0,), (0,), (0,), (1,), (1,)], 2, by_group=False) == [[0, 1], [2, 3], [4]]


def test_reuse_is_exact_and_saves_the_counted_rows(policy, demo_dataset):
    captions = (["a dog runs", "a cat sits", "a dog runs", "a dog runs"],)
    groups = _groups(demo_dataset, captions)
    full, _, rows_full = _render(policy, groups, scope="prompt", reuse=False, same_noise=True)
    reused, _, rows_reused = _render(policy, groups, scope="prompt", reuse=True, same_noise=True)
    assert _close(full, reused)
    assert torch.equal(reused[0][0], reused[0][2]) and torch.equal(reused[0][0], reused[0][3])
    assert rows_full == STEPS * 2 * G
    distinct = 2  # rendered once each; step 0's unconditional prediction is one row for the group
    assert rows_reused == STEPS * 2 * distinct - (distinct - 1)
    # with independent noise per caption a repeated caption is a different render: nothing is shared
    _, _, rows_independent = _render(policy, groups, scope="prompt", reuse=True, same_noise=False)
    assert rows_independent == rows_full


def test_fewer_steps_and_cfg_off_cut_the_rows_as_counted(policy, demo_dataset):
    groups = _groups(demo_dataset, CAPTIONS[:1])
    _, calls, rows = _render(policy, groups, scope="prompt", reuse=False, steps=1, guidance=1.0)
    assert (calls, rows) == (1, G)
    videos, calls, rows = _render(policy, groups, scope="prompt", reuse=False, steps=2, guidance=5.0)
    assert (calls, rows) == (2, 2 * 2 * G) and videos[0][0].shape[-1] == 3


def test_render_scope_is_checked(tmp_path, demo_models, demo_dataset):
    cfg = load_config(Stage1Config, CONFIGS / "stage1_tiny.yaml",
                      tiny_overrides(tmp_path, demo_models, demo_dataset, "render.scope=everything"))
    with pytest.raises(InputError, match="render.scope='everything'.*prompt, step"):
        Stage1Policy(cfg, setup_runtime(cfg.run))


def test_the_benchmarked_fast_setting_is_the_shipped_config():
    from vans.bench_render import SETTINGS, TODAY

    fast = load_config(Stage1Config, CONFIGS / "stage1_fast.yaml", []).render
    today = load_config(Stage1Config, CONFIGS / "stage1.yaml", []).render
    assert {k: getattr(fast, k) for k in TODAY} == {**TODAY, **SETTINGS["fast: stage1_fast.yaml"]}
    assert {k: getattr(today, k) for k in TODAY if k != "reuse"} == {k: v for k, v in TODAY.items() if k != "reuse"}


def test_spearman_matches_a_hand_computation():
    from vans.bench_render import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get their average rank: ranks (1.5, 1.5, 3) vs (1, 2, 3), deviations (-.5, -.5, 1) and (-1, 0, 1):
    # covariance 1.5, variances 1.5 and 2
    assert spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(1.5 / (1.5 * 2.0) ** 0.5)
    assert spearman([1, 1, 1], [1, 2, 3]) != spearman([1, 1, 1], [1, 2, 3])  # no order: NaN


def test_fast_render_run_resumes_equal_to_the_uninterrupted_run(tmp_path, demo_models, demo_dataset):
    from trainer.metrics import read_metrics
    from trainer.runner import run_training

    fast = ("render.scope=step", "render.batch=3", "render.reuse=true", "render.guidance=5.0", "render.steps=2",
            "run.steps=2", "run.save_every=1", "run.prompts_per_step=2")

    def run(out, *extra):
        cfg = load_config(Stage1Config, CONFIGS / "stage1_tiny.yaml",
                          tiny_overrides(out, demo_models, demo_dataset, *fast, *extra))
        runtime = setup_runtime(cfg.run)
        with progress.quiet():
            return run_training(cfg, Stage1Policy(cfg, runtime), runtime=runtime)

    run(tmp_path / "full")
    assert run(tmp_path / "resumed", "run.stop_at=1").last_step == 1
    assert run(tmp_path / "resumed", "run.resume=true").first_step == 2

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith(("time", "mem/"))} for r in rows]

    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert strip(full) == strip(resumed) and len(full) == 2
    # 2 prompts x G 4 = 8 captions (fewer if repeated) in batches of 3 across the prompts, 2 denoising steps: at most
    # 3 batches per step, where batches within each prompt would take 2 per prompt (8 calls)
    assert all(0 < r["render/dit_calls"] <= 2 * 3 for r in full)


def test_render_economy_benchmark_counts_and_ranks_on_the_same_captions(tmp_path):
    from vans.bench_render import bench_render_economy, summary

    settings = {"today": {}, "CFG off": {"guidance": 1.0}, "today again": {}}
    threads = torch.get_num_threads()
    with progress.quiet():
        result = bench_render_economy(tmp_path, seeds=(0,), steps=1, settings=settings, log=lambda _: None)
    assert torch.get_num_threads() == threads  # it runs on one thread and gives the tests after it theirs back
    today, off, again = (result["settings"][k] for k in settings)
    assert off["rows_ratio"] == 2.0 and off["calls_ratio"] == 1.0  # one row per caption and step instead of two
    # the same setting on the same captions and noise ranks them exactly as the first row
    assert again["spearman_clip_v"] == 1.0 and again["top1"] == 1.0 and again["rows_ratio"] == 1.0
    assert today["groups"] + today["no_order"] == 4  # 4 prompts, one step
    assert "CFG off" in summary(result)
