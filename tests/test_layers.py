"""The module graph follows docs/layers.md: every module has a layer, no import goes up, and there is no circle."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGES = ("emocast_core", "nodes", "training")


def _layers() -> list[list[str]]:
    text = (ROOT / "docs" / "layers.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/layers.md has no ```layers block"
    layers = []
    for number, line in enumerate(block.group(1).strip().splitlines()):
        index, rest = line.split(" ", 1)
        assert int(index) == number, f"layers must be numbered 0, 1, ...: {line!r}"
        layers.append(rest.split(":", 1)[1].split())
    return layers


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The repository modules `name` imports, at any depth, except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for branch in ast.walk(tree)
               if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.dump(branch.test)
               for node in ast.walk(branch)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _layer_of(name: str, layers: list[list[str]]) -> int | None:
    best, rank = -1, None
    for number, entries in enumerate(layers):
        for entry in entries:
            if (name == entry or name.startswith(entry + ".")) and len(entry) > best:
                best, rank = len(entry), number
    return rank


def _upward(graph: dict[str, set[str]], rank: dict[str, int]) -> list[str]:
    return sorted(f"{a} (layer {rank[a]}) imports {b} (layer {rank[b]})"
                  for a, targets in graph.items() for b in targets if rank[b] > rank[a])


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [m1, m2, ..., m1], or None."""
    done: set[str] = set()

    def visit(path: list[str]) -> list[str] | None:
        for target in sorted(graph[path[-1]]):
            if target in path:
                return path[path.index(target):] + [target]
            if target not in done and (cycle := visit(path + [target])):
                return cycle
        done.add(path[-1])
        return None

    for name in sorted(graph):
        if name not in done and (cycle := visit([name])):
            return cycle
    return None


def test_every_import_goes_down_and_there_is_no_circle():
    layers, modules = _layers(), _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    rank = {name: _layer_of(name, layers) for name in modules}
    assert [n for n, r in rank.items() if r is None] == [], "modules missing from docs/layers.md"
    upward = _upward(graph, rank)
    assert upward == [], "imports that go up:\n" + "\n".join(upward)
    cycle = _find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_layer_check_sees_upward_and_circular_imports(tmp_path):
    """The checker itself: a made-up upward import and a made-up circle are both reported."""
    layers = [["low"], ["high"]]
    assert _layer_of("low.part", layers) == 0 and _layer_of("high", layers) == 1 and _layer_of("other", layers) is None
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import g\n")
    (tmp_path / "__init__.py").write_text("")
    modules = {"pkg": tmp_path / "__init__.py", "pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"}
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}  # a lazy import counts
    assert _find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    assert _upward(graph, {"pkg": 0, "pkg.a": 0, "pkg.b": 1}) == ["pkg.a (layer 0) imports pkg.b (layer 1)"]
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import g\n")
    assert _imports("pkg.b", modules["pkg.b"], modules) == set()
    assert _find_cycle({"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": set()}) is None
