"""Imports run one way: tokenize_audio <- soda <- scaling, and inside soda from lower lifecycle groups to higher.

The sources are parsed, never imported, so every import counts: module level, inside functions, under
`if TYPE_CHECKING:`, relative or absolute. Inside `soda` the groups rank
`soda.shape` < `soda.checkpoints` < `soda.model` < `soda.generate` < `soda.train` < `soda.evaluate` < `soda.finetune`;
any other module directly in `soda/` (e.g. a small `soda/settings.py`) and the `soda` package itself rank lowest,
beside `soda.shape`, so everything may import them and they may import only each other and `soda.shape`.
No two modules may import each other, directly or through others. All violations are reported at once.
"""

from __future__ import annotations

import ast
import functools
import itertools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tokenize_audio", "soda", "scaling")
# A package may import only those listed before it.
PACKAGE_RANK = {name: i for i, name in enumerate(PACKAGES)}
SODA_GROUPS = ("shape", "checkpoints", "model", "generate", "train", "evaluate", "finetune")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Every module of `packages` under `root` by dotted name (`soda/train/__init__.py` is `soda.train`)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            found[module_name(root, path)] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str, str]]:
    """(line, imported module, source text) for each import in `path` that names a module of `modules`.

    `from pkg import x` names `pkg.x` when that is a module, else `pkg`; relative imports resolve against `name`."""
    source = path.read_text()
    tree, lines = ast.parse(source, filename=str(path)), source.splitlines()
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        text = " ".join(lines[node.lineno - 1:node.end_lineno])
        for target in dict.fromkeys(targets):
            # `import soda.train.cli` or an attribute import: the longest prefix that is one of our modules.
            parts = target.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != name:
                found.append((node.lineno, ".".join(parts), " ".join(text.split())))
    return found


def soda_rank(module: str) -> int:
    """The lifecycle group of a soda module; top-level modules not in SODA_GROUPS rank with soda.shape (0)."""
    parts = module.split(".")
    return SODA_GROUPS.index(parts[1]) if len(parts) > 1 and parts[1] in SODA_GROUPS else 0


def upward(src: str, dst: str) -> bool:
    src_pkg, dst_pkg = src.split(".")[0], dst.split(".")[0]
    if src_pkg != dst_pkg:
        return PACKAGE_RANK[dst_pkg] > PACKAGE_RANK[src_pkg]
    return src_pkg == "soda" and soda_rank(dst) > soda_rank(src)


@functools.cache
def import_graph(root: Path, packages=PACKAGES):
    modules = find_modules(root, packages)
    edges = {name: imports_of(name, path, modules) for name, path in modules.items()}
    return modules, edges


def direction_violations(root: Path, packages=PACKAGES) -> list[str]:
    modules, edges = import_graph(root, packages)
    bad = sorted((str(modules[src].relative_to(root)), line, src, dst, text)
                 for src, found in edges.items() for line, dst, text in found if upward(src, dst))
    return [f"{path}:{line}: {src} -> {dst}  ({text})" for path, line, src, dst, text in bad]


def cycles(root: Path, packages=PACKAGES) -> list[str]:
    """One cycle, `a -> b (file:line) -> ... -> a`, for each strongly connected group of modules (Tarjan)."""
    modules, edges = import_graph(root, packages)
    graph = {src: sorted({dst for _, dst, _ in found}) for src, found in edges.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    reports = []
    for group in groups:
        cycle = shortest_cycle(graph, group)
        steps = [cycle[0]]
        for src, dst in itertools.pairwise(cycle):
            line = min(line for line, target, _ in edges[src] if target == dst)
            steps.append(f"{dst} ({modules[src].relative_to(root)}:{line})")
        reports.append(" -> ".join(steps))
    return sorted(reports)


def shortest_cycle(graph: dict[str, list[str]], group: set[str]) -> list[str]:
    """The shortest path from the group's first module back to itself, staying inside the group."""
    start = min(group)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in graph[path[-1]]:
            if w == start:
                return path + [start]
            if w in group and w not in seen:
                seen.add(w)
                paths.append(path + [w])
    raise AssertionError(f"no cycle through {start}")


def test_imports_run_one_way():
    bad = direction_violations(REPO)
    assert not bad, f"{len(bad)} upward import(s):\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(REPO)
    assert not found, f"{len(found)} import cycle(s):\n" + "\n".join(found)


def write(root: Path, rel: str, text: str = "") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def fake_tree(tmp_path) -> Path:
    """tokenize_audio/soda/scaling with one allowed import, two upward ones (one hidden in a function) and a cycle."""
    write(tmp_path, "tokenize_audio/__init__.py")
    write(tmp_path, "tokenize_audio/shards.py", "def f():\n    from soda.train import data\n")
    write(tmp_path, "soda/__init__.py")
    write(tmp_path, "soda/settings.py", "import tokenize_audio\n")
    write(tmp_path, "soda/shape.py", "from soda import settings\n")
    write(tmp_path, "soda/train/__init__.py")
    write(tmp_path, "soda/train/data.py", "from soda.shape import x\nfrom .module import y\n")
    write(tmp_path, "soda/train/module.py", "from . import data\nfrom ..evaluate.tasks import z\n")
    write(tmp_path, "soda/evaluate/__init__.py")
    write(tmp_path, "soda/evaluate/tasks.py", "from soda.train.data import x\n")
    write(tmp_path, "scaling/__init__.py")
    write(tmp_path, "scaling/fit.py", "from soda.shape import x\n")
    return tmp_path


def test_checker_reports_upward_imports_and_cycles(fake_tree):
    bad = direction_violations(fake_tree)
    assert len(bad) == 2, bad
    assert bad[0].startswith("soda/train/module.py:2: soda.train.module -> soda.evaluate.tasks")
    assert bad[1].startswith("tokenize_audio/shards.py:2: tokenize_audio.shards -> soda.train.data")
    found = cycles(fake_tree)
    assert len(found) == 1
    assert found[0] == ("soda.evaluate.tasks -> soda.train.data (soda/evaluate/tasks.py:1)"
                        " -> soda.train.module (soda/train/data.py:2) -> soda.evaluate.tasks (soda/train/module.py:2)")
