"""The package's layers, read from its source: which module may import which.

The layers, bottom to top: config and attention; data; models; decoding and parallel; runs;
train; cli. An import points down (everything may import config), never up or sideways into
another subpackage of the same layer. Imports inside functions count: they run too.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "transformer_jax"

LAYERS = {"config": 0, "attention": 0, "data": 1, "models": 2, "decoding": 3, "parallel": 3,
          "runs": 4, "train": 5, "cli": 6}
# The python -m transformer_jax.<name> shims.
ENTRY_POINTS = {"prepare", "sample", "translate", "visualize"}
WRITERS = {"orbax", "tensorboardX", "matplotlib", "tqdm"}  # third-party packages that write


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (``from pkg import sub`` counts as sub)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            found |= subs
            if len(subs) < len(node.names):  # some names are attributes of the module itself
                found.add(node.module)
    return found


GRAPH = {name: {m for m in _imports(path) if m in MODULES and m != name}
         for name, path in MODULES.items()}
EXTERNAL = {name: {m.split(".")[0] for m in _imports(path) if not m.startswith("transformer_jax")}
            for name, path in MODULES.items()}


def _part(module: str) -> str:
    """The top-level part of the package a module belongs to ("" for the root package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_cli(module: str) -> bool:
    return _part(module) == "cli" or _part(module) in ENTRY_POINTS


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in GRAPH[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_the_graph_was_read():
    assert len(MODULES) > 30
    assert "transformer_jax.train.step" in GRAPH["transformer_jax.train.workload"]
    assert "transformer_jax.data.batches" in GRAPH["transformer_jax.train.lm"]  # from-import


def test_no_import_cycles():
    for module in GRAPH:
        assert module not in _closure(module), f"{module} imports itself through a cycle"


def test_imports_point_down_the_layers():
    wrong = []
    for module, deps in GRAPH.items():
        part = _part(module)
        if part in ("", "config") or part in ENTRY_POINTS:
            continue
        for dep in deps:
            target = _part(dep)
            if target in ("config", part) or target == "":
                continue
            if target in ENTRY_POINTS or LAYERS[target] >= LAYERS[part]:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports that point up or sideways: " + ", ".join(sorted(wrong))


def test_no_library_module_imports_a_command_line():
    wrong = [f"{m} -> {d}" for m, deps in GRAPH.items() if not _is_cli(m) and m != "transformer_jax"
             for d in deps if _is_cli(d)]
    assert not wrong, ", ".join(sorted(wrong))


def test_models_import_only_attention_and_config():
    for module, deps in GRAPH.items():
        if _part(module) == "models":
            assert {_part(d) for d in deps} <= {"models", "attention", "config"}, (module, deps)


@pytest.mark.parametrize("module", ["transformer_jax.train.step", "transformer_jax.train.optim"])
def test_the_pure_step_imports_nothing_that_writes_files(module):
    reached = _closure(module) | {module}
    assert not {_part(m) for m in reached} & {"runs", "cli"}, sorted(reached)
    assert not set().union(*(EXTERNAL[m] for m in reached)) & WRITERS


def test_importing_the_kernel_loads_no_flax_and_nothing_else_of_the_package():
    code = ("import sys, transformer_jax.attention; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('flax', 'optax', 'orbax', 'transformer_jax')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    loaded = eval(out)  # a printed list of names
    assert all(m == "transformer_jax" or m.startswith("transformer_jax.attention")
               for m in loaded), loaded


def _long_functions(path: Path, limit: int = 80) -> list[str]:
    """Functions of ``path`` longer than ``limit`` lines, their docstring excluded."""
    long = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str) and len(body) > 1):
                body = body[1:]
            lines = node.end_lineno - body[0].lineno + 1
            if lines > limit:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return long


def test_no_function_is_longer_than_80_lines():
    long = [f for path in [*MODULES.values(), ROOT / "train.py"] for f in _long_functions(path)]
    assert not long, long
