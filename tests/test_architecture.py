"""The layering of ARCHITECTURE.md, enforced: which part of tiexport may import which, no import circles, no torch on
the ONNX side. Every import statement counts, at module level or inside a function (a function-level import is a
dependency all the same, only a later one)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "tiexport"

# The bottom layer: everything may import it; it imports only within itself (as listed).
BASE = {"errors", "limits", "terminal", "progress", "tidl_spec", "shapes", "devices", "onnx_io", "context", "compat"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "limits": {"errors"},
    "terminal": set(),
    "progress": set(),
    "tidl_spec": {"errors"},
    "shapes": set(),
    "devices": {"errors", "tidl_spec"},
    "onnx_io": {"errors", "limits"},
    "context": {"errors", "onnx_io", "shapes", "tidl_spec"},
    "compat": {"errors"},
    # the three ONNX-side pillars: never each other
    "passes": BASE,
    "validators": BASE,
    "parity": BASE,
    # the torch side's building blocks
    "quantization": BASE,
    "symbolics": BASE | {"passes", "quantization"},
    # orchestration above the pillars
    "workflows": BASE | {"passes", "validators", "parity", "symbolics"},
    "wrappers": BASE | {"quantization", "symbolics", "workflows"},
    "snippets": BASE | {"validators"},
    "cli": BASE | {"passes", "validators", "parity", "workflows", "snippets"},
}
# Where torch may be imported at module level; the ONNX side (everything else) must work without it.
TORCH_AT_MODULE_LEVEL = {"quantization", "symbolics", "wrappers"}
TORCH_AT_USE = {"compat", "parity.torch_reference", "workflows.export"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _component(module: str) -> str:
    """``tiexport.passes.graph`` -> ``passes``; ``tiexport.errors`` -> ``errors``; ``tiexport`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported tiexport module or package, line, at module level) for every import statement in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    type_checking = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks are for the type checker only
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            type_checking.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from tiexport import compat` imports the module tiexport.compat
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for name in names:
            if name == "tiexport" or name.startswith("tiexport."):
                while name not in MODULES:
                    name = name.rpartition(".")[0]
                found.append((name, node.lineno, id(node) in top_level))
            elif name.split(".")[0] == "torch":
                found.append(("torch", node.lineno, id(node) in top_level))
    return found


def test_every_module_belongs_to_a_layer() -> None:
    unknown = sorted({_component(m) for m in MODULES} - set(ALLOWED) - {""})
    assert not unknown, f"components without a place in the layering (add them to ALLOWED and ARCHITECTURE.md): {unknown}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _component(m)))
def test_imports_follow_the_layering(module: str) -> None:
    own = _component(module)
    bad = []
    for target, line, _ in _imports(module):
        if target == "torch":
            continue
        other = _component(target)
        if other and other != own and other not in ALLOWED[own]:
            bad.append(f"line {line}: {target} ({other})")
    assert not bad, f"{module} ({own}) may import only {sorted(ALLOWED[own])} of tiexport, but imports: {bad}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_torch_is_imported_only_on_the_torch_side(module: str) -> None:
    own = _component(module)
    rel = module.partition(".")[2]
    for target, line, top in _imports(module):
        if target != "torch":
            continue
        if own in TORCH_AT_MODULE_LEVEL:
            continue
        assert not top, f"{module} line {line}: torch imported at module level on the ONNX side"
        assert own in TORCH_AT_USE or rel in TORCH_AT_USE, f"{module} line {line}: imports torch"


def test_no_import_circles() -> None:
    graph = {m: {t for t, _, _ in _imports(m) if t != "torch" and t != m} for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            # a package importing its own submodules (its __init__) is not a circle
            if len(component) > 1:
                circles.append(sorted(component))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    assert not circles, f"import circles: {circles}"


def test_the_layering_test_sees_a_violation(tmp_path: Path) -> None:
    # the checker itself must be able to fail: a passes module importing a validator is caught
    global MODULES
    fake = ROOT / "passes" / "_layering_probe.py"
    try:
        fake.write_text("from tiexport.validators.report import Finding\n")
        MODULES = _modules()
        with pytest.raises(AssertionError, match="validators"):
            test_imports_follow_the_layering("tiexport.passes._layering_probe")
    finally:
        fake.unlink(missing_ok=True)
        MODULES = _modules()
