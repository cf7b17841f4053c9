"""The import graph of cbam_jax: no circle, and every import goes down (or across) the layers of
docs/design.md (ground -> layers -> models -> convert -> weights -> compose -> package -> application).

A short AST walk over the sources (no import is executed): every `import cbam_jax...` and
`from cbam_jax... import ...`, at module top or inside a function, is an edge. A module that is in
no layer below fails the test too: a new module says where it belongs.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cbam_jax"

# Bottom up; a module's layer is that of its longest listed prefix. Within the weights layer the
# order is pretrained (folders) < hub (ids -> folders) < zoo (published files -> folders).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("cbam_jax.errors", "cbam_jax.atomic", "cbam_jax.checks", "cbam_jax.images", "cbam_jax.host_memory",
                "cbam_jax.cache")),
    ("layers", ("cbam_jax.layers",)),
    ("models", ("cbam_jax.resnet", "cbam_jax.mobilenet", "cbam_jax.registry", "cbam_jax.summary")),
    ("convert", ("cbam_jax.convert",)),
    ("weights: folders", ("cbam_jax.pretrained",)),
    ("weights: hub", ("cbam_jax.hub",)),
    ("weights: zoo", ("cbam_jax.zoo",)),
    ("compose", ("cbam_jax.factory", "cbam_jax.nnx")),
    ("package", ("cbam_jax",)),  # cbam_jax/__init__.py: the public names
    ("application", ("cbam_jax.cli", "cbam_jax.convert_command", "cbam_jax.predict", "cbam_jax.artifacts",
                     "cbam_jax.training", "cbam_jax.data", "cbam_jax.visualize", "cbam_jax.step_cache",
                     "cbam_jax.detection")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    best, rank = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    return rank


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The cbam_jax modules `module` imports (an imported name that is a module counts as that module)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "cbam_jax"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "cbam_jax":
                continue
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {name for name in found if name != module}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {module: {m for m in imports(module, path, known) if m in known} for module, path in found.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return result


def test_no_import_circle_in_cbam_jax():
    assert circles(graph()) == []


def test_every_module_is_in_a_layer():
    unplaced = sorted(module for module in modules() if layer_of(module) is None)
    assert unplaced == [], f"add these modules to LAYERS in {Path(__file__).name}: {unplaced}"


def test_imports_go_down_the_layers():
    upward = []
    for module, targets in graph().items():
        for target in sorted(targets):
            if module.startswith(target + "."):
                continue  # a submodule importing its package's __init__ (e.g. layers/x -> layers): same package
            mine, theirs = layer_of(module), layer_of(target)
            if None not in (mine, theirs) and theirs > mine:
                upward.append(f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert upward == []


def test_the_walk_sees_imports_and_circles():
    """The checks above can fail: the walk finds relative and function-level imports, and a circle."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    assert layer_of("cbam_jax.zoo") > layer_of("cbam_jax.hub") > layer_of("cbam_jax.pretrained")
    assert layer_of("cbam_jax.convert.layouts.timm") == layer_of("cbam_jax.convert") < layer_of("cbam_jax.convert_command")


def test_the_walk_resolves_import_forms(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("from . import b\nfrom .b import c\nimport cbam_jax.a\n\ndef f():\n    from cbam_jax.b import c\n")
    known = {"cbam_jax.a", "cbam_jax.b", "cbam_jax.b.c", "cbam_jax.x"}
    assert imports("cbam_jax.x", source, known) == {"cbam_jax.a", "cbam_jax.b", "cbam_jax.b.c"}
