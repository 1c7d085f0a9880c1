"""Trainer configs: YAML + --set precedence, unknown keys with suggestions, --help covering every key."""

import pytest

from trainer.config import config_help, load_config, parse_cli, valid_keys
from trainer.stage1 import Stage1Config
from vans.errors import InputError
from trainer_fixtures import CONFIGS


def test_defaults_are_the_paper_settings():
    cfg = load_config(Stage1Config)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.rollout.group_size) == (8, 32.0, 8)
    assert (cfg.optim.lr, cfg.loss.beta, cfg.loss.clip_eps, cfg.run.steps, cfg.render.steps) == (5e-5, 0.004, 0.2, 800, 20)
    assert cfg.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\nrun:\n  steps: 5\n", encoding="utf-8")
    cfg = load_config(Stage1Config, path, ["run.steps=7", "lora.targets=[q_proj, v_proj]", "optim.lr=3e-4",
                                           "loss.loss_type=token"])
    assert cfg.run.steps == 7 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.loss.loss_type == "token"
    assert cfg.run.out_dir == "runs/stage1"  # a section given in the file keeps the stage's other defaults


@pytest.mark.parametrize("override, named, suggested", [
    ("optim.lrr=1", "optim.lrr", "optim.lr"),
    ("run.step=3", "run.step", "run.steps"),
    ("rollout.group=4", "rollout.group", "rollout.group_size"),
    ("lr=1", "lr", "optim.lr"),
])
def test_unknown_key_names_it_and_the_closest(override, named, suggested):
    with pytest.raises(InputError) as err:
        load_config(Stage1Config, None, [override])
    assert f"'{named}'" in str(err.value) and suggested in str(err.value)


@pytest.mark.parametrize("override, hint", [
    ("optim.lrr=1", "did you mean optim.lr?"),  # a leaf of the same section, never the section 'optim' itself
    ("optim.betaz=1", "did you mean optim.betas?"),
    ("optimm.lr=1", "did you mean optim?"),  # a misspelt section: the section
    ("optim.zzzz=1", "valid keys in optim: lr, weight_decay, betas, warmup, schedule, grad_clip"),
])
def test_unknown_key_hint_stays_in_its_section(override, hint):
    with pytest.raises(InputError) as err:
        load_config(Stage1Config, None, [override])
    assert f"; {hint} (see --help)" in str(err.value)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("render:\n  widht: 32\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"render\.widht.*render\.width"):
        load_config(Stage1Config, path)


def test_bad_values():
    with pytest.raises(InputError, match="run.steps"):
        load_config(Stage1Config, None, ["run.steps=many"])
    with pytest.raises(InputError, match="key=value"):
        load_config(Stage1Config, None, ["run.steps"])
    with pytest.raises(InputError, match="not found"):
        load_config(Stage1Config, "/nonexistent/c.yaml")


@pytest.mark.parametrize("name", ["stage1.yaml", "stage1_tiny.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(Stage1Config, CONFIGS / name)
    assert cfg.rollout.group_size >= 2


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        parse_cli(Stage1Config, ["--help"], "stage1", "x")
    text = capsys.readouterr().out
    leaves = [k for k in valid_keys(Stage1Config) if "." in k or k in ("models_dir", "vlm_checkpoint")]
    for key in leaves:
        assert key in text, key
    assert "--resume" in text and "--set" in text
    assert "LoRA rank" in config_help(Stage1Config)


def test_resume_flag_sets_run_resume():
    assert parse_cli(Stage1Config, ["--resume", "--set", "run.steps=2"], "p", "d").run.resume is True
