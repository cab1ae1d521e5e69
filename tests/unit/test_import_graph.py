"""The import rules of docs/design.md, read from the source with `ast` (nothing is imported).

Oracle: the table "Packages and import rules": `kernels` and `launch` import nothing of the
project, `data_prep` only `launch` (its rank detector), `pretrain` may import the three others;
and no module imports itself back through a chain of imports (every `import`, at module level
or inside a function, counts).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("data_prep", "kernels", "launch", "pretrain")
ALLOWED = {
    "data_prep": {"launch"},
    "kernels": set(),
    "launch": set(),
    "pretrain": {"kernels", "data_prep", "launch"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
    }


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports: `from a.b import c` counts as a.b.c when that is a
    module, else as a.b; relative imports are resolved against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name from a module -> that module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def test_packages_import_only_what_the_design_allows() -> None:
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in _graph().items()
        for target in targets
        if (top := target.split(".")[0]) != name.split(".")[0]
        and top not in ALLOWED[name.split(".")[0]]
    )
    assert not wrong, wrong


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_the_graph_sees_real_imports() -> None:
    """The reader is not vacuous: edges the code certainly has are found."""
    graph = _graph()
    assert "kernels.dispatch" in graph["kernels.cross_entropy"]
    assert "kernels" in graph["pretrain.model"]
    assert "data_prep.shard_format" in graph["pretrain.data"]


def test_kernels_never_call_torch_distributed() -> None:
    """Collectives reach the kernels through `kernels.collectives.TensorParallel` objects."""
    users = [
        path.name
        for path in sorted((REPO / "kernels").glob("*.py"))
        if "torch.distributed" in path.read_text(encoding="utf-8")
    ]
    assert not users, users


def test_the_data_side_does_not_load_the_model() -> None:
    """Data-loader workers mask batches; they must not import the model, kernels or tp code."""
    graph = _graph()
    reached, todo = set(), ["pretrain.data"]
    while todo:
        for nxt in graph[todo.pop()] - reached:
            reached.add(nxt)
            todo.append(nxt)
    assert "pretrain.masking" in reached
    heavy = sorted(
        m
        for m in reached
        if m.startswith(("pretrain.model", "pretrain.parallel", "pretrain.objectives", "kernels"))
    )
    assert not heavy, heavy
