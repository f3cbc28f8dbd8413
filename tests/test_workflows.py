"""The example workflows in workflows/: valid UI-format graphs of known nodes with valid links and widget values.

Core nodes are checked against the `/object_info` of ComfyUI 0.3.64 (the node types the workflows use, in
tests/fixtures/comfyui/),
our nodes against their own INPUT_TYPES; the loader's model list comes from a model folder made for the test.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import CORE_NODE_SPEC, ROOT, load_pack
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
NOTE_TYPES = {"Note", "MarkdownNote"}  # frontend-only nodes: no backend class, one text widget
SEED_CONTROL = {"fixed", "increment", "decrement", "randomize"}
# Widgets the frontend adds after a backend input; their values are stored but never sent.
UPLOAD_EXTRAS = {"image_upload": 1, "audio_upload": 2, "video_upload": 1}
MODEL_FILES = ("emocast.safetensors", "net.pth", "vae/", "clip/", "wav2vec2/", "face_analysis/", "config.json",
               "huggingface.co/Jmaomao/EmoCAST")


def _object_info(cls: type) -> dict:
    """What /object_info reports for one of our V1 node classes (the fields the checks use)."""
    spec = cls.INPUT_TYPES()
    return {"input": {k: spec[k] for k in ("required", "optional") if k in spec},
            "input_order": {k: list(spec[k]) for k in ("required", "optional") if k in spec},
            "output": list(cls.RETURN_TYPES), "output_name": list(cls.RETURN_NAMES),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}


@pytest.fixture(scope="module")
def node_specs(tmp_path_factory):
    core = json.loads(CORE_NODE_SPEC.read_text())
    pack = load_pack()
    adapter = sys.modules["emocast_pack.nodes.comfy_adapter"]
    models = tmp_path_factory.mktemp("workflow_models")
    (models / "vae").mkdir()
    (models / "emocast.safetensors").write_bytes(b"")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(adapter.MODELS_DIR_ENV, str(models))
        ours = {name: _object_info(cls) for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
    assert not set(ours) & set(core), "a node id of ours clashes with a core node"
    return {**core, **ours}


def _inputs(info: dict) -> list[tuple[str, object, dict]]:
    out = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            kind, *rest = info["input"][section][name]
            out.append((name, kind, rest[0] if rest else {}))
    return out


def _is_widget(kind: object, options: dict) -> bool:
    return (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")) \
        and not options.get("forceInput")


def _check_value(where: str, kind: object, options: dict, value: object) -> None:
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options", [])
        if any(options.get(k) for k in UPLOAD_EXTRAS):  # a file picker: any file the user uploads
            assert isinstance(value, str) and value, f"{where}: needs a file name, got {value!r}"
        else:
            assert value in choices, f"{where}: {value!r} is not one of {choices}"
        return
    if kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a boolean"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a string"
    else:
        number = int if kind == "INT" else (int, float)
        assert isinstance(value, number) and not isinstance(value, bool), f"{where}: {value!r} is not {kind}"
        assert options.get("min", -float("inf")) <= value <= options.get("max", float("inf")), \
            f"{where}: {value} outside [{options.get('min')}, {options.get('max')}]"


def _check_widgets(node: dict, info: dict) -> None:
    values = list(node.get("widgets_values") or [])
    where = f"node {node['id']} ({node['type']})"
    for name, kind, options in _inputs(info):
        if not _is_widget(kind, options):
            continue
        assert values, f"{where}: no widget value for {name}"
        _check_value(f"{where}.{name}", kind, options, values.pop(0))
        if name in ("seed", "noise_seed") or options.get("control_after_generate"):
            control = values.pop(0)
            assert control in SEED_CONTROL, f"{where}.{name}: control_after_generate {control!r}"
        for key, extra in UPLOAD_EXTRAS.items():
            if options.get(key):
                del values[:extra]
    assert values == [], f"{where}: {len(values)} widget value(s) left over: {values}"


def _socket_type(kind: object) -> str:
    return "COMBO" if isinstance(kind, list) else str(kind)


def test_there_are_example_workflows():
    names = {p.name for p in WORKFLOWS}
    assert {"emocast_basic.json", "emocast_emotion_timeline.json", "emocast_long_audio_low_memory.json"} <= names
    assert not (ROOT / "workflows" / ".gitkeep").exists()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_a_valid_graph(path, node_specs):
    data = json.loads(path.read_text())
    for key in ("last_node_id", "last_link_id", "nodes", "links", "version"):
        assert key in data, f"{path.name}: no {key!r} (not a UI-format workflow?)"
    nodes = {n["id"]: n for n in data["nodes"]}
    assert len(nodes) == len(data["nodes"]), "duplicate node ids"
    assert data["last_node_id"] >= max(nodes)
    assert data["last_link_id"] >= max((link[0] for link in data["links"]), default=0)
    notes = [n for n in data["nodes"] if n["type"] in NOTE_TYPES]
    note_text = "\n".join(v for n in notes for v in n["widgets_values"])
    for name in MODEL_FILES:
        assert name in note_text, f"{path.name}: the model note does not mention {name}"

    types_used = set()
    for node in data["nodes"]:
        for key in ("id", "type", "pos", "size", "inputs", "outputs", "widgets_values", "mode", "order"):
            assert key in node, f"{path.name}: node {node.get('id')} has no {key!r}"
        if node["type"] in NOTE_TYPES:
            continue
        assert node["type"] in node_specs, f"{path.name}: unknown node type {node['type']}"
        info = node_specs[node["type"]]
        types_used.add(node["type"])
        _check_widgets(node, info)
        declared = {name: (kind, options) for name, kind, options in _inputs(info)}
        for slot in node["inputs"]:
            assert slot["name"] in declared, f"{node['type']} has no input {slot['name']!r}"
            kind, options = declared[slot["name"]]
            assert slot["type"] == _socket_type(kind), f"{node['type']}.{slot['name']}: type {slot['type']}"
            if _is_widget(kind, options):
                assert slot.get("widget", {}).get("name") == slot["name"], "a widget socket needs its widget tag"
        linked = {slot["name"] for slot in node["inputs"] if slot.get("link") is not None}
        for name in info["input_order"].get("required", []):
            kind, options = declared[name]
            if not _is_widget(kind, options):
                assert name in linked, f"{path.name}: {node['type']} node {node['id']}: required {name} unlinked"
        assert [o["type"] for o in node["outputs"]] == info["output"], f"{node['type']} outputs"
    assert types_used & {"SaveVideo"}, "the graph needs an output node that writes the video"
    assert {"EmoCASTLoader", "EmoCASTFace", "EmoCASTEmotion", "EmoCASTAudio", "EmoCASTSampler"} <= types_used

    for link_id, origin, origin_slot, target, target_slot, link_type in data["links"]:
        source, sink = nodes[origin], nodes[target]
        out_type = node_specs[source["type"]]["output"][origin_slot]
        in_slot = sink["inputs"][target_slot]
        in_kind, _ = {n: (k, o) for n, k, o in _inputs(node_specs[sink["type"]])}[in_slot["name"]]
        assert out_type == _socket_type(in_kind) == link_type, \
            f"link {link_id}: {source['type']} {out_type} -> {sink['type']}.{in_slot['name']} {in_kind}"
        assert in_slot["link"] == link_id
        assert link_id in (source["outputs"][origin_slot]["links"] or [])
    for node in data["nodes"]:  # every link a node mentions exists
        mentioned = {s["link"] for s in node["inputs"] if s.get("link") is not None}
        mentioned |= {i for o in node["outputs"] for i in (o.get("links") or [])}
        assert mentioned <= {link[0] for link in data["links"]}


def test_low_memory_workflow_uses_the_low_memory_settings():
    data = json.loads((ROOT / "workflows" / "emocast_long_audio_low_memory.json").read_text())
    by_type = {n["type"]: n for n in data["nodes"]}
    model, precision, device, offload, *_shared = by_type["EmoCASTLoader"]["widgets_values"]
    assert precision == "auto" and offload is True
    assert by_type["EmoCASTSampler"]["widgets_values"][-1] == 1  # decode_batch
    assert "EmoCASTUnloadModels" in by_type


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_loader_precision_is_auto(path):
    """auto: fp16 on a GPU, fp32 on the CPU (a forced fp16 would crawl there)."""
    loaders = [n for n in json.loads(path.read_text())["nodes"] if n["type"] == "EmoCASTLoader"]
    assert loaders and all(n["widgets_values"][1] == "auto" for n in loaders)


TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar this far above its pos


def _box(node: dict) -> tuple[float, float, float, float]:
    """A node's on-screen box (left, top, right, bottom) from its saved pos and size, title bar included."""
    (x, y), (width, height) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + width, y + height


def _overlaps(data: dict) -> list[str]:
    boxes = [(f"{n['id']} ({n['type']})", _box(n)) for n in data["nodes"]]
    return [f"{a} and {b}" for i, (a, (l1, t1, r1, b1)) in enumerate(boxes) for b, (l2, t2, r2, b2) in boxes[i + 1:]
            if l1 < r2 and l2 < r1 and t1 < b2 and t2 < b1]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_two_nodes_overlap(path):
    assert _overlaps(json.loads(path.read_text())) == []


def test_the_overlap_check_sees_the_title_bar():
    def node(id_, x, y, w=100, h=100):
        return {"id": id_, "type": "T", "pos": [x, y], "size": [w, h]}

    assert _overlaps({"nodes": [node(1, 0, 0), node(2, 0, 130)]}) == []  # the title bar of 2 starts at 100
    assert _overlaps({"nodes": [node(1, 0, 0), node(2, 0, 125)]}) == ["1 (T) and 2 (T)"]
    assert _overlaps({"nodes": [node(1, 0, 0), node(2, 50, 50)]}) == ["1 (T) and 2 (T)"]
    assert _overlaps({"nodes": [node(1, 0, 0), node(2, 100, 0)]}) == []  # touching edges are fine


def test_the_checks_catch_a_broken_workflow(node_specs, tmp_path):
    """The validator itself: a wrong widget value, an out-of-range number and a mistyped link all fail."""
    basic = json.loads((ROOT / "workflows" / "emocast_basic.json").read_text())

    def broken(edit) -> Path:
        data = json.loads(json.dumps(basic))
        edit(data)
        path = tmp_path / "broken.json"
        path.write_text(json.dumps(data))
        return path

    def sampler(data):
        return next(n for n in data["nodes"] if n["type"] == "EmoCASTSampler")

    def loader(data):
        return next(n for n in data["nodes"] if n["type"] == "EmoCASTLoader")

    cases = {
        r"steps: 0 outside \[1, 200\]": lambda d: sampler(d)["widgets_values"].__setitem__(0, 0),
        r"precision: 'fp8' is not one of": lambda d: loader(d)["widgets_values"].__setitem__(1, "fp8"),
        r"seed: control_after_generate 1.0": lambda d: sampler(d)["widgets_values"].pop(3),
        r"link 1: EmoCASTLoader EMOCAST_MODEL": lambda d: d["links"][0].__setitem__(5, "IMAGE"),
        r"-> EmoCASTFace.image IMAGE": lambda d: d["links"][0].__setitem__(4, 1),
        r"unknown node type EmoCASTTypo": lambda d: sampler(d).__setitem__("type", "EmoCASTTypo"),
    }
    for message, edit in cases.items():
        with pytest.raises(AssertionError, match=message):
            test_workflow_is_a_valid_graph(broken(edit), node_specs)
