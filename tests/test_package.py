"""The package's shape, read from its source (ast): wings by concern on floors (a wing imports only its
own modules and wings below it, lazy imports included), no import cycles, only the loss's autograd ops
import the kernels, ``__all__`` lists what other modules import, library modules log instead of
printing, and no comment points outside the repository."""

import ast
import importlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fastsfm"
FOUNDATIONS = {"config", "io", "rng", "progress", "distributed", "signals", "memory"}
"""The small modules at the top of ``fastsfm/``: they import only one another."""
FLOORS = {
    "foundations": 1,
    "kernels": 2,
    "loss": 3,
    "data": 3,
    "models": 4,
    "stats": 5,
    "distill": 6,
    "evaluate": 6,
    "bench": 7.1,
    "reproduce": 7.2,
    "cli": 7.3,
}
"""The floor of each wing (README's Architecture): a wing imports only wings on lower floors.
Floor 7 is ordered: the bench helpers, then the grid (whose projection times steps with them),
then the command line (which runs the grid and the demo)."""
KERNEL_IMPORTERS = {"fastsfm.loss.ops", "fastsfm.loss.gca_ops", "fastsfm.bench.kernel_report"}
"""The losses' autograd ops launch the kernels; the kernel report intercepts their launchers."""
FRONT_ENDS = {
    "fastsfm.cli.commands",
    "fastsfm.cli.demo",
    "fastsfm.progress",
    "fastsfm.bench.benchmark",
}
"""Modules that talk to a user (they may print): the command line, the demo, progress lines on a
stream, the table printer of ``benches/``."""


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (REPO / "kernels").rglob("*.py"):  # installed as fastsfm.kernels
        parts = ["fastsfm", *path.relative_to(REPO).with_suffix("").parts]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str | None]]:
    """``(module, imported name)`` of every fastsfm import in a module, at any depth (lazy imports too)."""
    return _imports_of(name, path, path.read_text())


def _imports_of(name: str, path: Path, source: str) -> list[tuple[str, str | None]]:
    tree = ast.parse(source)
    base = name.split(".") if path.stem == "__init__" else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = ".".join(base[: len(base) - node.level + 1] + [node.module or ""]) if node.level else node.module
            target = (target or "").rstrip(".")
            if not target.startswith("fastsfm"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None) if sub in MODULES else (target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.startswith("fastsfm")]
    return [(m, n) for m, n in found if m in MODULES and m != name]


GRAPH = {name: {m for m, _ in _imports(name, path)} for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    assert _cycle() is None, " -> ".join(_cycle())


def wing(module: str) -> str:
    """The wing of a module name: ``fastsfm.loss.ops`` -> ``loss``; a foundation -> ``foundations``."""
    parts = module.split(".")
    if module == "fastsfm":
        return "face"
    return "foundations" if parts[1] in FOUNDATIONS else parts[1]


def test_every_module_is_in_a_wing_or_a_foundation():
    loose = [name for name in MODULES if name != "fastsfm" and wing(name) not in FLOORS]
    assert not loose, f"modules outside the wings {sorted(FLOORS)}: {loose}"
    flat = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert set(flat) == FOUNDATIONS
    for name, path in MODULES.items():
        if path.name == "__init__.py" and name.count(".") == 1:
            assert ast.get_docstring(ast.parse(path.read_text())), f"{name} says what the wing does"


def test_wings_import_only_their_own_floor_or_below():
    upward = sorted(
        f"{name} ({wing(name)}) imports {dep} ({wing(dep)})"
        for name in MODULES
        if name != "fastsfm"
        for dep in GRAPH[name] - {"fastsfm"}  # the package face: only its __version__ is read below it
        if wing(dep) != wing(name) and FLOORS[wing(dep)] >= FLOORS[wing(name)]
    )
    assert not upward


def test_only_the_autograd_ops_import_the_kernels():
    importers = {n for n in MODULES if wing(n) != "kernels" and any(wing(d) == "kernels" for d in GRAPH[n])}
    assert importers <= KERNEL_IMPORTERS and "fastsfm.loss.ops" in importers


def test_the_floor_check_sees_an_upward_import():
    """The checks above read real imports: a lazy import of a higher wing is found."""
    tree = "def f():\n    from ..distill.loop import distill\n"
    found = [m for m, _ in _imports_of("fastsfm.data.images", PACKAGE / "data" / "images.py", tree)]
    assert found == ["fastsfm.distill.loop"] and FLOORS[wing(found[0])] > FLOORS["data"]


def test_all_lists_what_other_modules_import():
    missing = []
    for name, path in MODULES.items():
        for module, imported in _imports(name, path):
            if imported is None or imported.startswith("_") or imported == "*" or module == "fastsfm":
                continue
            exported = getattr(importlib.import_module(module), "__all__", None)
            if exported is not None and imported not in exported:
                missing.append(f"{name} imports {module}.{imported}")
    assert not missing
    for module in MODULES:
        if module.endswith("__main__"):  # importing it runs the command line
            continue
        loaded = importlib.import_module(module)
        assert all(hasattr(loaded, n) for n in getattr(loaded, "__all__", [])), module


def test_library_modules_log_instead_of_printing():
    printing = []
    for name, path in MODULES.items():
        if name in FRONT_ENDS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                printing.append(f"{name}:{node.lineno}")
    assert not printing


def test_sources_point_to_papers_and_repositories_not_to_local_folders():
    tests = REPO.glob("tests/**/*.py")
    files = [*MODULES.values(), *REPO.glob("benches/*.py"), *tests, *PACKAGE.rglob("resources/*.*")]
    outside = "shared" + "/"  # a folder beside the repository, which users do not have
    assert not [str(p) for p in files if outside in p.read_text()]
    assert not [str(p) for p in [*MODULES.values(), *REPO.glob("benches/*.py")] if "sys.path" in p.read_text()]


def test_wheel_ships_every_module_and_data_file_and_no_top_level_kernels(tmp_path):
    """The built wheel (not the editable install the tests run on) holds every module of ``_modules()``
    and every weight, resource and preset file, and no top-level ``kernels`` package (a PyPI name)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"  # a copy: setuptools would reuse a stale build/ folder of the checkout
    junk = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("fastsfm", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=junk)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run([*cmd, str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("fastsfm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        name.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")
        for name, path in _modules().items()
    }
    assert modules - names == set()
    data = {
        str(p.relative_to(REPO))
        for pattern in ("weights/*.safetensors", "resources/*.json", "resources/configs/*.toml")
        for p in PACKAGE.glob(pattern)
    }
    assert data and data - names == set()
    assert not any(n.startswith("kernels/") for n in names)


def test_ci_runs_exactly_the_readme_test_command():
    """``.ci/run``'s command is, character for character, the README's second command, so CI proves the README."""
    command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    block = (REPO / "README.md").read_text().split("## The two commands", 1)[1].split("```", 2)[1]
    lines = [line for line in block.splitlines() if line and not line.startswith(("#", "bash"))]
    assert len(lines) == 2 and lines[1] == command and "pytest" in command
    assert lines[0].startswith("python3 -m venv .venv") and lines[0].endswith("fastsfm demo")
