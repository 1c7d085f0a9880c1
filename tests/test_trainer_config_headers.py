"""The commands at the top of every shipped trainer config run as written, in order, on a fresh clone: each
path a command reads is a placeholder (/path/to/...), a repository file, or made by an earlier command of
that header; every stage-1 / stage-2 export a config names is a file that stage writes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from trainer.config import parse_cli
from trainer_fixtures import CONFIGS, REPO, demo_dataset  # noqa: F401

PLACEHOLDER = "/path/to/"
# settings that name a file or folder the run reads
READ_SETTINGS = ("models_dir", "data.path", "data.video_root", "data.cache_dir", "vlm_checkpoint", "dit", "vlm", "clip")


def header_commands(path: Path) -> list[list[str]]:
    """The ``#   python ...`` lines (with their ``\\`` continuations) before the first setting."""
    commands, current = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if current is not None:
            current += " " + text
        elif text.startswith("python "):
            current = text
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1]
        else:
            commands.append(shlex.split(current, comments=True))
            current = None
    assert current is None, f"{path.name}: a command ends with a line continuation"
    return commands


def stage_exports(module: str, cfg) -> list[str]:
    if module == "trainer.stage1":
        from trainer.stage1 import EXPORT_NAMES

        return list(EXPORT_NAMES)
    names = [cfg.export.merged_name]
    return ([cfg.export.lora_name] if cfg.model.train_mode == "lora" else []) + names


def simulate(path: Path, manifest_name: str) -> tuple[set[str], list]:
    """Run the header on paper: returns (every path its commands make, the stage configs they parse)."""
    from trainer.stage1 import Stage1Config
    from trainer.stage2 import Stage2Config

    made: set[str] = set()
    stages = []

    def readable(value: str, what: str) -> None:
        if value.startswith(PLACEHOLDER) or (REPO / value).exists() and not value.startswith("runs/"):
            return
        assert value.rstrip("/") in made, f"{path.name}: {what}={value} is read before any command of the header makes it"

    for argv in header_commands(path):
        assert argv[:2] == ["python", "-m"], argv
        module, args = argv[2], argv[3:]
        if module == "vans" and args[:2] == ["fixtures", "--out"] and len(args) == 3:
            made.add(args[2])
        elif module == "trainer.data" and args[0] == "--demo" and len(args) == 2:
            made.update({args[1], f"{args[1].rstrip('/')}/{manifest_name}"})
        elif module == "trainer.data" and args[0] == "--check":
            readable(args[1], "--check")
            if "--video-root" in args:
                readable(args[args.index("--video-root") + 1], "--video-root")
        elif module in ("trainer.stage1", "trainer.stage2"):
            cls = Stage1Config if module == "trainer.stage1" else Stage2Config
            assert args[0] == "--config" and (REPO / args[1]).is_file(), args
            cfg = parse_cli(cls, args, module, "")  # every --set key exists and its value has the right type
            given = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")
            assert given.get("models_dir") and given.get("data.path"), f"{path.name}: {module} without models_dir/data.path"
            for key in READ_SETTINGS:
                if key in given and given[key] not in ("auto", "none"):
                    readable(given[key], key)
            out = cfg.run.out_dir.rstrip("/")
            made.update({out, *(f"{out}/export/{name}" for name in stage_exports(module, cfg))})
            stages.append((module, cfg, args[1]))
        else:
            pytest.fail(f"{path.name}: unknown header command {' '.join(argv)}")
    return made, stages


CONFIG_FILES = sorted(p.name for p in CONFIGS.glob("stage[12]*.yaml"))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_header_commands_run_in_order_from_a_fresh_clone(name, demo_dataset):  # noqa: F811
    path = CONFIGS / name
    made, stages = simulate(path, demo_dataset.name)
    assert stages and stages[-1][2] == f"trainer/configs/{name}", f"{name}: the last command must run this file"
    if name.startswith(("stage1_tiny", "stage2_tiny")):  # runnable as is: no placeholder at all
        assert PLACEHOLDER not in path.read_text(encoding="utf-8")
    # the files the comments promise ("It writes runs/x/ (... export/a ...)") are the files that stage writes
    module, cfg, _ = stages[-1]
    text = path.read_text(encoding="utf-8")
    assert f"It writes {cfg.run.out_dir}/" in text
    promised = set(re.findall(r"(?<![\w/])export/[\w.]+\.safetensors", text))
    assert promised == {f"export/{n}" for n in stage_exports(module, cfg)}, name


def test_every_export_a_config_names_is_written_by_a_header(demo_dataset):  # noqa: F811
    made = set()
    for name in CONFIG_FILES:
        made |= simulate(CONFIGS / name, demo_dataset.name)[0]
    named = {(name, n) for name in CONFIG_FILES
             for n in re.findall(r"runs/[\w/.]+\.safetensors", (CONFIGS / name).read_text(encoding="utf-8"))}
    assert ("stage2.yaml", "runs/stage1/export/vlm_merged.safetensors") in named
    for name, path in named:
        assert path in made, f"{name} names {path}, which no config's commands write"
