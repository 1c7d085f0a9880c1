"""Node definitions, checked without ComfyUI (a recording stand-in replaces ``comfy_api``).

The committed golden file ``tests/node_schema.json`` pins every node id, input name, type, order and
default: a rename or reorder breaks saved workflows and API prompts (widget values are positional),
so it must be a deliberate change. ``tests/comfyui/test_server.py`` checks the same file against a
real ComfyUI's ``/object_info``. Regenerate after an intended change with
``VANS_UPDATE_NODE_SCHEMA=1 python -m pytest tests/test_nodes_definitions.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest

from nodes_stub import PACK_ROOT, stubbed_pack

GOLDEN = Path(__file__).with_name("node_schema.json")
PACK = "vans_pack_definitions"
EXPECTED_IDS = {
    "VANSLoadVLM", "VANSNextEventCaption", "VANSContextConditioning", "VANSLoadCLIP", "VANSClipVideoScore",
    "VANSClipTextScore", "VANSRougeL", "VANSBleu", "VANSFormatReward", "VANSStage1Reward", "VANSStage2Reward",
    "VANSBestOfN",
}


@pytest.fixture(scope="module")
def pack():
    with stubbed_pack(PACK) as module:
        import importlib

        nodes = importlib.import_module(f"{PACK}.nodes")
        yield nodes


@pytest.fixture(scope="module")
def schemas(pack):
    classes, broken = pack.node_classes()
    assert broken == []
    return {cls.define_schema().node_id: cls.define_schema() for cls in classes}


def snapshot(schema) -> dict:
    """The golden-file view of one node: inputs per section in order with type and default, outputs."""
    entry = {"required": [], "optional": []}
    for spec in schema.inputs:
        section = "optional" if spec.optional else "required"
        entry[section].append([spec.id, spec.io_type, spec.options.get("default")])
    entry["outputs"] = [[o.display_name, o.io_type, bool(o.is_output_list)] for o in schema.outputs]
    entry["is_input_list"] = bool(schema.is_input_list)
    entry["output_node"] = bool(schema.is_output_node)
    return entry


def format_golden(data: dict) -> str:
    """JSON with one line per input/output, so a diff of the golden file reads as a list of changes."""
    nodes = []
    for node_id, entry in data.items():
        fields = []
        for key, value in entry.items():
            if isinstance(value, list) and value:
                rows = ",\n".join("   " + json.dumps(row, ensure_ascii=False) for row in value)
                fields.append(f"  {json.dumps(key)}: [\n{rows}\n  ]")
            else:
                fields.append(f"  {json.dumps(key)}: {json.dumps(value)}")
        nodes.append(f" {json.dumps(node_id)}: {{\n" + ",\n".join(fields) + "\n }")
    return "{\n" + ",\n".join(nodes) + "\n}\n"


def test_every_node_is_defined_once_with_the_prefix(schemas):
    assert set(schemas) == EXPECTED_IDS
    for node_id, schema in schemas.items():
        assert re.fullmatch(r"VANS[A-Z][A-Za-z0-9]+", node_id), node_id
        assert schema.display_name.startswith("VANS "), node_id
        assert schema.category.startswith("VANS"), node_id
        assert schema.description, node_id


def test_every_input_and_output_is_named_and_explained(schemas):
    for node_id, schema in schemas.items():
        for spec in schema.inputs:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", spec.id), (node_id, spec.id)
            assert spec.tooltip and len(spec.tooltip) > 10, (node_id, spec.id)
        for out in schema.outputs:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", out.display_name), (node_id, out.display_name)
            assert out.tooltip, (node_id, out.display_name)
        ids = [s.id for s in schema.inputs]
        assert len(ids) == len(set(ids)), node_id


def test_number_defaults_respect_their_bounds_and_steps(schemas):
    for node_id, schema in schemas.items():
        for spec in schema.inputs:
            opts = spec.options
            if spec.io_type not in ("INT", "FLOAT") or "default" not in opts:
                continue
            default = opts["default"]
            assert opts.get("min", default) <= default <= opts.get("max", default), (node_id, spec.id)
            if spec.io_type == "INT" and opts.get("step", 1) > 1:
                assert (default - opts.get("min", 0)) % opts["step"] == 0 or spec.id == "length", (node_id, spec.id)


def test_static_combo_defaults_are_among_the_options(schemas):
    for node_id, schema in schemas.items():
        for spec in schema.inputs:
            if spec.io_type == "COMBO" and spec.options.get("default") is not None:
                assert spec.options["default"] in spec.options["options"], (node_id, spec.id)


def test_execute_takes_exactly_the_declared_inputs(pack, schemas):
    classes, _ = pack.node_classes()
    for cls in classes:
        schema = cls.define_schema()
        params = list(inspect.signature(cls.execute).parameters)
        assert sorted(params) == sorted(s.id for s in schema.inputs), schema.node_id
        for spec in schema.inputs:  # an unconnected optional input is absent from the call
            if spec.optional:
                assert inspect.signature(cls.execute).parameters[spec.id].default is None, (schema.node_id, spec.id)


def test_schema_matches_the_committed_golden_file(schemas):
    current = {node_id: snapshot(schema) for node_id, schema in sorted(schemas.items())}
    if os.environ.get("VANS_UPDATE_NODE_SCHEMA") == "1":
        GOLDEN.write_text(format_golden(current), encoding="utf-8")
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    for node_id in golden:
        assert node_id in current, f"node {node_id} was removed or renamed: saved workflows would break"
        assert current[node_id] == golden[node_id], (
            f"inputs/outputs of {node_id} changed; saved workflows and API prompts depend on names and order. "
            "If intended, regenerate tests/node_schema.json (see this file's docstring)"
        )
    assert set(current) == set(golden), "a new node: add it to tests/node_schema.json (see this file's docstring)"


def test_top_level_init_is_inert_outside_comfyui():
    source = (PACK_ROOT / "__init__.py").read_text(encoding="utf-8")
    assert "NODE_CLASS_MAPPINGS" not in source.replace("``NODE_CLASS_MAPPINGS``", "")
    before = set(sys.modules)
    import importlib.util

    spec = importlib.util.spec_from_file_location("vans_pack_inert", PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert inspect.iscoroutinefunction(module.comfy_entrypoint)
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")
    new = set(sys.modules) - before
    assert not any(name.startswith(("comfy", "vans_pack_inert.", "folder_paths")) for name in new), new


def test_missing_optional_package_disables_only_its_nodes(pack):
    classes, _ = pack.node_classes()
    usable, missing = pack.split_available(classes, installed=lambda name: name != "transformers")
    kept = {c.define_schema().node_id for c in usable}
    assert missing == {"transformers": ["VANSLoadVLM", "VANSNextEventCaption"]}
    assert kept == EXPECTED_IDS - {"VANSLoadVLM", "VANSNextEventCaption"}
    message = pack.disabled_message(missing, [])
    assert "\n" not in message and "'transformers'" in message and "VANSLoadVLM" in message
    assert pack.disabled_message({}, []) is None


def test_extension_logs_one_line_for_everything_left_out(pack, monkeypatch, caplog):
    absent = {"open_clip", "rouge_score"}
    monkeypatch.setattr(pack, "is_installed", lambda name: name not in absent)
    monkeypatch.setattr(pack.split_available, "__defaults__", (pack.is_installed,))
    with caplog.at_level(logging.WARNING, logger="vans"):
        nodes = asyncio.run(pack.VansExtension().get_node_list())
    ids = {c.define_schema().node_id for c in nodes}
    assert ids == EXPECTED_IDS - {"VANSLoadCLIP", "VANSClipVideoScore", "VANSClipTextScore", "VANSRougeL",
                                  "VANSStage1Reward"}
    records = [r for r in caplog.records if r.name == "vans"]
    assert len(records) == 1
    assert "'open_clip_torch'" in records[0].getMessage() and "'rouge-score'" in records[0].getMessage()


def test_extension_is_silent_when_everything_is_installed(pack, caplog):
    with caplog.at_level(logging.DEBUG, logger="vans"):
        nodes = asyncio.run(pack.VansExtension().get_node_list())
    assert {c.define_schema().node_id for c in nodes} == EXPECTED_IDS
    assert [r for r in caplog.records if r.name == "vans" and r.levelno >= logging.WARNING] == []


def test_is_installed_sees_blocked_and_absent_modules(pack, monkeypatch):
    assert pack.is_installed("json")
    assert not pack.is_installed("surely_not_a_module_vans_test")
    monkeypatch.setitem(sys.modules, "blocked_module_vans_test", None)
    assert not pack.is_installed("blocked_module_vans_test")


def test_registration_adds_the_model_folders_without_dropping_configured_ones(tmp_path):
    configured = str(tmp_path / "elsewhere" / "LLM")
    roots = {"LLM": [configured]}
    with stubbed_pack("vans_pack_folders", roots=roots):
        import importlib

        host = importlib.import_module("vans_pack_folders.nodes.host")
        host.register_model_folders()
    assert roots["LLM"][0] == configured and len(roots["LLM"]) == 2
    assert roots["reward_models"][0].endswith("reward_models")
