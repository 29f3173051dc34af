"""The package's shape, checked: one installed `agentloop` namespace, layers that only
import downward, no import circles, small documented modules.

Read the layer table as the architecture (docs/architecture.md draws it): a module
may import modules of its own layer or of a lower one, never a higher one. Inside
one layer the cycle check keeps imports one-way. Imports inside functions count
too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
import zipfile
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"serve": "agentloop.serve", "rl": "agentloop.rl", "templates": "agentloop.templates",
           "tools": "agentloop.tools", "agents": "agentloop.agents"}

# (prefix, layer): the longest matching prefix decides. Lower imports nothing higher.
LAYERS = [
    ("agentloop.templates", 0),
    ("agentloop.tools", 1),
    ("agentloop.rl", 2),
    ("agentloop.agents", 3),           # clients of the HTTP API: tools + the openai/LangChain SDKs
    ("agentloop.serve.settings", 4),
    ("agentloop.serve.errors", 4),
    ("agentloop.serve.metrics", 4),
    ("agentloop.serve.protocol", 4),
    ("agentloop.serve.store", 5),
    ("agentloop.serve.engine", 6),
    ("agentloop.serve.services", 7),
    ("agentloop.serve.compose", 8),
    ("agentloop.serve.http", 9),
    ("agentloop.serve.cli", 10),
    ("agentloop.serve.inside_vllm", 11),  # runs inside vLLM; imported by nothing of ours
    ("agentloop.serve", 4),               # the package's own __init__
]
# Only code that runs inside the engine or the training job imports these at module level.
HEAVY = {"torch", "vllm", "transformers", "trl", "peft", "xgrammar", "accelerate", "datasets"}
HEAVY_OK = ("agentloop.serve.inside_vllm", "agentloop.rl.shared_prefix")
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in FOLDERS.items():
        for f in (ROOT / folder).rglob("*.py"):
            if "node_modules" in f.parts:
                continue
            rel = f.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((pkg, *rel))
            out[name.removesuffix(".__init__")] = f
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                out.append(("." * node.level + (node.module or ""), node.lineno, id(node) in top))
                continue
            for a in node.names:  # `from pkg import module` imports the module
                full = f"{node.module}.{a.name}"
                out.append((full if full in MODULES else node.module, node.lineno, id(node) in top))
    return out


def _layer(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


GRAPH = {m: [(i, line, top) for i, line, top in _imports(p)] for m, p in MODULES.items()}


def test_imports_are_absolute_and_in_the_namespace():
    bad = []
    for m, imps in GRAPH.items():
        for i, line, _ in imps:
            if i.startswith(".") or i.split(".")[0] in FOLDERS:
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line} imports {i}")
    assert not bad, "import agentloop.* by its full name:\n" + "\n".join(bad)


def test_layers_only_import_downward():
    bad = []
    for m, imps in GRAPH.items():
        for i, line, _ in imps:
            if i in MODULES and _layer(i) > _layer(m):
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line}: {m} (layer {_layer(m)}) imports {i} "
                           f"(layer {_layer(i)})")
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_code_that_runs_inside_vllm():
    bad = [f"{m} imports {i}" for m, imps in GRAPH.items() for i, _, _ in imps
           if i.startswith("agentloop.serve.inside_vllm") and not m.startswith("agentloop.serve.inside_vllm")]
    assert not bad, bad


def test_no_import_circles():
    edges = defaultdict(set)
    for m, imps in GRAPH.items():
        for i, _, _ in imps:
            if i in MODULES and i != m and not m.startswith(i + "."):  # a package's own __init__ is not a cycle
                edges[m].add(i)
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(edges[n]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(MODULES):
        if n not in state:
            visit(n)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_gateway_modules_never_import_torch_or_vllm_at_import_time():
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {i}" for m, imps in GRAPH.items()
           for i, line, top in imps
           if top and i.split(".")[0] in HEAVY and not m.startswith(HEAVY_OK)]
    assert not bad, "import heavy libraries inside the functions that need them:\n" + "\n".join(bad)


def test_modules_are_small_and_say_what_they_own():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    undocumented = [str(p.relative_to(ROOT)) for p in MODULES.values()
                    if p.stat().st_size and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not long, long
    assert not undocumented, undocumented


def test_pyproject_lists_every_package():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert listed == on_disk
    assert cfg["package-dir"] == {pkg: folder for folder, pkg in FOLDERS.items()}


def test_entry_points_name_modules_that_exist():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    targets = list(cfg["scripts"].values()) + list(cfg["entry-points"]["vllm.general_plugins"].values())
    for target in targets:
        module, _, func = target.partition(":")
        assert module in MODULES, target
        assert re.search(rf"^def {func}\(", MODULES[module].read_text(), re.M), target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("agentloop-*.whl")
    return whl


def test_wheel_claims_only_agentloop_at_the_top_level(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"agentloop", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "agentloop/__init__.py" not in names  # a namespace package: nothing to collide with
    for needed in ("agentloop/serve/http/app.py", "agentloop/templates/chatml_tools.jinja",
                   "agentloop/rl/regression_tools.json", "agentloop/serve/http/ui/templates/chat.html",
                   "agentloop/serve/inside_vllm/parsers.py"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith("agentloop/") and "/tests/" in n]


def test_installed_wheel_adds_only_agentloop(wheel, tmp_path):
    """Installed into a fresh target folder: what site-packages would gain."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    found = {p.name for p in target.iterdir()} - {"bin"}
    assert {n for n in found if not n.endswith(".dist-info")} == {"agentloop"}, found
    # The installed copy imports on its own (its dependencies come from this venv),
    # not through the editable install of the work tree.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "import importlib.machinery as m; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
            "import agentloop.serve.http.app as app, agentloop.rl.versions as v; "
            "assert app.__file__.startswith(sys.argv[1]), app.__file__; print(v.parse_version('agentloop@v0003'))")
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "v0003"
