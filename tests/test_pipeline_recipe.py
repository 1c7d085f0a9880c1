"""The README's whole-pipeline recipe (base models → sft_vlm → sft_vdm → stage 1 → stage 2 → answer → eval),
run line by line as a newcomer pastes it (under a temporary folder instead of /tmp/vans_pipeline), and what
each step hands to the next checked: every step consumes the previous one's export by its real file name."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path



ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- pipeline-recipe:"
PREFIX = "/tmp/vans_pipeline"


def recipe_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text[text.index(MARKER):]
    block = block[block.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_recipe_names_each_previous_export_by_its_real_name():
    from trainer.stage1 import EXPORT_NAMES

    commands = recipe_commands()
    assert [c.split()[2] for c in commands] == ["vans", "trainer.data", "trainer.sft_vlm", "trainer.sft_vdm",
                                                 "trainer.stage1", "trainer.stage2", "vans", "vans"]
    joined = "\n".join(commands)
    for export in ("sft_vlm/export/vlm_sft_merged.safetensors", "sft_vdm/export/vdm_sft.safetensors",
                   f"stage1/export/{EXPORT_NAMES[1]}", "stage2/export/vdm.safetensors"):
        assert export in joined, export


def test_the_readme_pipeline_runs_and_hands_over(tmp_path):
    from safetensors import safe_open

    work = tmp_path / "p"
    for command in recipe_commands():
        argv = shlex.split(command.replace(PREFIX, str(work)))
        assert argv[0] == "python"
        run = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, f"{command}\n{run.stderr[-3000:]}"

    # stage 1 started from the VLM SFT export and recorded it; stage 2's anchor VLM is stage 1's export
    with safe_open(str(work / "stage1/export/vlm_lora.safetensors"), "pt") as f:
        meta = json.dumps(f.metadata())
    assert "vlm_sft_merged.safetensors" in meta
    stage2_config = (work / "stage2/config.yaml").read_text()
    assert "stage1/export/vlm_merged.safetensors" in stage2_config and "vdm_sft.safetensors" in stage2_config
    assert "vdm_sft.safetensors" in (work / "stage1/config.yaml").read_text()

    # stage 2 trained the SFT DiT: its merged export differs from the SFT export in some tensor, same keys
    import torch
    from safetensors.torch import load_file

    sft, final = load_file(str(work / "sft_vdm/export/vdm_sft.safetensors")), load_file(
        str(work / "stage2/export/vdm.safetensors"))
    assert set(sft) == set(final)
    assert any(not torch.equal(sft[k].float(), final[k].float()) for k in sft)

    # every row answered with a video, and the table scores them all
    records = [json.loads(line) for line in (work / "answers/results.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["status"] == "ok" and (work / "answers" / r["video"]).is_file()
                                     for r in records)
    row = json.loads((work / "eval/table.json").read_text())["splits"]["all"]["answers"]
    assert row["count"] == 4 and row["metrics"]["CLIP-V"] is not None and row["metrics"]["R-L"] is not None
