"""The package's shape: no import cycle (counting imports inside functions),
imports that point down the layers only, `import mlx_moe` without the
server or the planner, and no module over MAX_LINES."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlx_moe"
MAX_LINES = 500

# What each layer (a subpackage, or a module at the top) may import besides
# itself, top to bottom: cli -> serve -> loader -> parallel -> comm.
ALLOWED = {
    "mlx_moe": {"batch", "loader", "parallel"},  # the package's own __init__: the public names
    "cli": {"serve", "planner", "bench", "cluster", "checkpoints", "parallel"},
    "bench": {"loader", "cluster", "checkpoints", "parallel"},
    "generate": {"loader", "cluster", "parallel"},
    "serve": {"loader", "sampling", "cluster", "parallel", "patches"},
    "planner": {"cluster", "checkpoints", "parallel"},
    "batch": {"sampling", "cluster", "parallel"},
    "loader": {"cluster", "checkpoints", "parallel"},
    "cluster": {"checkpoints", "parallel"},
    "parallel": {"patches"},
    "checkpoints": set(),
    "sampling": set(),
    "patches": set(),
}


def _modules():
    """{module name: path} of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules) -> list:
    """(line, imported module) for every import of a package module in
    `name`, at module level or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    found.append((node.lineno, sub))
                elif target in modules:
                    found.append((node.lineno, target))
    return found


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for _, n in graph[m]:
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_graph_sees_every_kind_of_import():
    graph = _graph()
    targets = lambda m: {t for _, t in graph[m]}
    assert "mlx_moe.loader" in targets("mlx_moe")  # from .loader import load_sharded
    assert "mlx_moe.parallel.comm" in targets("mlx_moe.loader")  # from .parallel import comm
    assert "mlx_moe.planner.costmodel" in targets("mlx_moe.cli")  # inside a function
    assert "mlx_moe.parallel.expert" in targets("mlx_moe.parallel")  # the package's __init__


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    graph = _graph()
    assert {_layer(m) for m in graph} == set(ALLOWED), "a layer is missing from ALLOWED, or has gone"
    wrong = [f"{m}:{line} imports {t}" for m, imports in sorted(graph.items()) for line, t in imports
             if _layer(t) != _layer(m) and _layer(t) not in ALLOWED[_layer(m)]]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_front_and_the_engine_meet_only_in_the_channel():
    """serve/front/ (the front process) and serve/engine/ (the ranks) import
    nothing of each other: what crosses between them is in serve/channel.py."""
    graph = _graph()
    side = lambda m: m.split(".")[2] if m.startswith("mlx_moe.serve.") and m.count(".") >= 3 else None
    wrong = [f"{m}:{line} imports {t}" for m, imports in sorted(graph.items()) for line, t in imports
             if {side(m), side(t)} == {"front", "engine"}]
    assert not wrong, "across the process boundary:\n" + "\n".join(wrong)
    assert any(t == "mlx_moe.serve.channel" for _, t in graph["mlx_moe.serve.front.process"])
    assert any(t == "mlx_moe.serve.channel" for _, t in graph["mlx_moe.serve.engine.link"])


def test_import_mlx_moe_loads_no_server_or_planner():
    code = "import sys, mlx_moe; print(' '.join(sorted(m for m in sys.modules if m.startswith('mlx_moe'))))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = out.stdout.split()
    assert "mlx_moe.loader" in loaded
    assert not [m for m in loaded if m.startswith(("mlx_moe.serve", "mlx_moe.planner", "mlx_moe.cli"))], loaded


def test_no_module_is_over_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
