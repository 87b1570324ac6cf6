"""The layers of DESIGN.md, checked on the package's import statements (every one, inside functions and
``if TYPE_CHECKING:`` blocks too: a cycle hidden from the type checker is still a cycle for a reader).

Run as a script (``python tests/test_architecture.py``) to print each module's import level (the longest chain of
package imports below it) and any cycle.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lowrank_tools"

MATH = "linalg"  # pure torch: imports torch/numpy/stdlib, itself and errors; never opens files
OPERATIONS = ("extract", "analyze", "evaluate", "calibrate", "resize", "merge", "apply", "convert", "check")
MATH_MAY_IMPORT = {"torch", "numpy"}
MAX_TOP_MODULES = 15
# Functions of an operation that still touch files themselves, each with the reason it waits. An entry that no
# longer touches files fails test_known_file_work_is_still_there: delete it then.
KNOWN_FILE_WORK: set[tuple[str, str]] = set()  # apply's config copy moved into io/model_folder.py
# touching a file: reading, writing, copying, renaming or deleting one (what only io/ does)
_FILE_IO = (r"(?<![\w.])open\(|\.open\(|\.read_(text|bytes)\(|\.write_(text|bytes)\(|\bshutil\.|\bos\.(replace|rename|remove|"
            r"unlink|rmdir|makedirs|mkdir)\(|\.(unlink|mkdir|rmdir|touch|iterdir|glob|rglob)\(|\btorch\.(load|save)\(|"
            r"\bsave_file\(|\bload_file\(|\bsafe_open\(")
_OPEN = re.compile(_FILE_IO)
_MATH_OPEN = re.compile(_FILE_IO + r"|\bPath\(|\bos\.path\b|\bpathlib\b")  # the math has no business with paths


@dataclass
class Module:
    name: str  # dotted, e.g. lowrank_tools.linalg.svd (a package is its __init__)
    path: Path
    source: str
    imports: dict[str, int] = field(default_factory=dict)  # package module -> first line importing it
    external: dict[str, int] = field(default_factory=dict)  # top-level name of a module outside the package
    private: list[tuple[int, str, str]] = field(default_factory=list)  # (line, module, _name) across modules


def _module_name(path: Path, root: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def load_package(root: Path) -> dict[str, Module]:
    """Every module of the package at ``root`` with the package modules each one imports."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        name = _module_name(path, root)
        modules[name] = Module(name, path, path.read_text(encoding="utf-8"))
    for module in modules.values():
        _collect_imports(module, modules, root.name)
    return modules


def _collect_imports(module: Module, modules: dict[str, Module], package: str) -> None:
    is_package = module.path.name == "__init__.py"
    for node in ast.walk(ast.parse(module.source, str(module.path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                _add(module, modules, package, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != package:
                module.external.setdefault(target.split(".")[0], node.lineno)
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:  # from . import pipeline: the submodule
                    module.imports.setdefault(sub, node.lineno)
                    continue
                _add(module, modules, package, target, node.lineno)
                if alias.name.startswith("_") and not alias.name.startswith("__") and target != module.name:
                    module.private.append((node.lineno, target, alias.name))


def _add(module: Module, modules: dict[str, Module], package: str, dotted: str, line: int) -> None:
    if dotted.split(".")[0] != package:
        module.external.setdefault(dotted.split(".")[0], line)
        return
    while dotted and dotted not in modules:  # import pkg.mod.attr -> pkg.mod
        dotted = dotted.rpartition(".")[0]
    if dotted and dotted != module.name:
        module.imports.setdefault(dotted, line)


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        on_stack.add(name)
        for dep in modules[name].imports:
            if dep not in index:
                visit(dep)
                low[name] = min(low[name], low[dep])
            elif dep in on_stack:
                low[name] = min(low[name], index[dep])
        if low[name] == index[name]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == name:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(modules) + 100))
    for name in modules:
        if name not in index:
            visit(name)
    return sorted(found)


def levels(modules: dict[str, Module]) -> dict[str, int]:
    """Level 0 imports nothing of the package; level n imports something of level n-1 (a cycle counts once)."""
    component_of = {name: name for name in modules}
    for component in cycles(modules):
        for name in component:
            component_of[name] = component[0]
    memo: dict[str, int] = {}

    def level(name: str, seen: frozenset) -> int:
        key = component_of[name]
        if key in memo:
            return memo[key]
        members = [m for m in modules if component_of[m] == key]
        deps = {component_of[d] for m in members for d in modules[m].imports} - {key} - seen
        memo[key] = 1 + max((level(d, seen | {key}) for d in deps), default=-1)
        return memo[key]

    return {name: level(name, frozenset()) for name in modules}


def _part(name: str, package: str) -> str:
    """The first component below the package: linalg, io, extract, cli, or a top-level module's name."""
    rest = name[len(package) + 1:]
    return rest.split(".")[0] if rest else "__init__"


def violations(root: Path) -> list[str]:
    """Every breach of the layer rules in the package at ``root``, one line each (empty when it keeps them)."""
    package = root.name
    modules = load_package(root)
    stdlib = set(sys.stdlib_module_names)
    found = [f"import cycle: {' <-> '.join(c)}" for c in cycles(modules)]
    for module in modules.values():
        part = _part(module.name, package)
        where = f"{module.path.relative_to(root.parent)}"
        for line, target, name in module.private:
            found.append(f"{where}:{line}: private import of {name} from {target}")
        if part != "cli" and "click" in module.external:
            found.append(f"{where}:{module.external['click']}: imports click outside cli/")
        if part == MATH:
            for dep, line in module.imports.items():
                if _part(dep, package) not in (MATH, "errors"):
                    found.append(f"{where}:{line}: the math imports {dep}")
            for ext, line in module.external.items():
                if ext not in MATH_MAY_IMPORT | stdlib:
                    found.append(f"{where}:{line}: the math imports {ext}")
        if part in (MATH, *OPERATIONS):
            for number, text in file_work(module, _MATH_OPEN if part == MATH else _OPEN):
                if (module.path.relative_to(root).as_posix(), _function_at(module, number)) not in KNOWN_FILE_WORK:
                    found.append(f"{where}:{number}: opens a path outside io/: {text.strip()}")
        if part in OPERATIONS:
            for dep, line in module.imports.items():
                other = _part(dep, package)
                if other != part and other in (*OPERATIONS, "cli"):
                    found.append(f"{where}:{line}: operation {part} imports {dep}")
    top = [p for p in root.glob("*.py")]
    if len(top) > MAX_TOP_MODULES:
        found.append(f"{len(top)} modules at the top of {package} (at most {MAX_TOP_MODULES})")
    return found


def file_work(module: Module, pattern: re.Pattern) -> list[tuple[int, str]]:
    """(line number, line) of every line that touches a file (comments and strings aside)."""
    found = []
    for number, text in enumerate(module.source.splitlines(), 1):
        code = text.split("#")[0]
        if pattern.search(code) and not _quoted(code, pattern):
            found.append((number, text))
    return found


def _function_at(module: Module, line: int) -> str | None:
    """The top-level function (or class) around ``line``."""
    for node in ast.parse(module.source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and \
                node.lineno <= line <= node.end_lineno:
            return node.name
    return None


def _quoted(code: str, pattern: re.Pattern) -> bool:
    """The match is inside a string (an error message naming a path), not a call."""
    stripped = re.sub(r"(\"[^\"]*\"|'[^']*')", "", code)
    return not pattern.search(stripped)


def report(root: Path = ROOT) -> str:
    modules = load_package(root)
    by_level = levels(modules)
    lines = [f"{len(modules)} modules, {max(by_level.values()) + 1} import levels"]
    for name in sorted(modules, key=lambda n: (by_level[n], n)):
        deps = ", ".join(sorted(d[len(root.name) + 1:] or "__init__" for d in modules[name].imports))
        lines.append(f"  {by_level[name]:2d}  {name[len(root.name) + 1:] or '__init__'}: {deps}")
    lines += [f"cycle: {' <-> '.join(c)}" for c in cycles(modules)]
    parts = {}  # the same graph with each folder (and each top-level module) as one node
    for name, module in modules.items():
        part = _part(name, root.name)
        node = parts.setdefault(part, Module(part, module.path, ""))
        for dep in module.imports:
            if _part(dep, root.name) != part:
                node.imports.setdefault(_part(dep, root.name), 0)
    by_part = levels(parts)
    lines.append(f"by folder / top-level module: {max(by_part.values()) + 1} levels")
    for part in sorted(parts, key=lambda n: (by_part[n], n)):
        lines.append(f"  {by_part[part]:2d}  {part}: {', '.join(sorted(parts[part].imports))}")
    return "\n".join(lines)


# --- the package -----------------------------------------------------------------------------------------------


def test_the_package_keeps_the_layers():
    assert violations(ROOT) == []


def test_known_file_work_is_still_there():
    modules = {m.path.relative_to(ROOT).as_posix(): m for m in load_package(ROOT).values()}
    touching = {(path, _function_at(m, n)) for path, m in modules.items() for n, _ in file_work(m, _OPEN)}
    assert KNOWN_FILE_WORK - touching == set()  # moved into io/: delete the entry


def test_levels_are_computed_for_every_module():
    by_level = levels(load_package(ROOT))
    assert by_level["lowrank_tools.errors"] == 0
    assert by_level["lowrank_tools"] > by_level["lowrank_tools.errors"]


@pytest.mark.parametrize("package", ["lowrank_tools", "lowrank_tools.linalg", "lowrank_tools.io",
                                     "lowrank_tools.extract", "lowrank_tools.analyze", "lowrank_tools.cli"])
def test_every_exported_name_exists(package):
    module = importlib.import_module(package)
    assert [name for name in module.__all__ if not hasattr(module, name)] == []


def test_the_public_api_is_where_it_was():
    import lowrank_tools
    from lowrank_tools.extract.streaming import extract

    assert lowrank_tools.extract is extract  # the function, not the subpackage of the same name
    assert {"Adapter", "LoraModule", "ModuleKind", "Method", "RankRule", "extract", "load_adapter", "open_checkpoint",
            "save_adapter", "resize", "merge", "apply", "__version__"} <= set(lowrank_tools.__all__)


def test_the_io_subpackage_does_not_hide_the_standard_library():
    from lowrank_tools.analyze import report  # `import io` in a module of the package: the standard library's

    assert report.io is sys.modules["io"] and hasattr(report.io, "StringIO")


# --- the checker catches what it is there to catch (a planted violation in a tiny package) ----------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", "errors.py": "", "linalg/__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_clean_package_passes(tmp_path):
    root = _package(tmp_path, {
        "linalg/svd.py": "import math\nimport torch\nfrom ..errors import X\nfrom .norms import norm\n",
        "linalg/norms.py": "import numpy as np\n",
        "io/__init__.py": "", "io/files.py": "from pathlib import Path\nPath('x').open()\n",
        "resize.py": "from .linalg.svd import svd\nfrom .io import files\nraise ValueError('see Path(x)')\n",
        "cli/__init__.py": "import click\nfrom ..resize import resize\n",
    })
    assert violations(root) == []


@pytest.mark.parametrize("files, expected", [
    ({"a.py": "from .b import x", "b.py": "def f():\n    from .a import y\n"}, "import cycle: pkg.a <-> pkg.b"),
    ({"a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import x\n", "b.py": "from . import a"},
     "import cycle"),
    ({"linalg/svd.py": "from ..io import files", "io/__init__.py": "", "io/files.py": ""}, "the math imports pkg.io.files"),
    ({"linalg/svd.py": "import safetensors.torch"}, "the math imports safetensors"),
    ({"linalg/svd.py": "def f(p):\n    with open(p) as fh:\n        pass\n"}, "opens a path outside io/"),
    ({"merge.py": "from pathlib import Path\ndef f(p):\n    return Path(p).read_text()\n"}, "opens a path outside io/"),
    ({"report.py": "import click"}, "imports click outside cli/"),
    ({"merge.py": "from .resize import resize", "resize.py": ""}, "operation merge imports pkg.resize"),
    ({"extract/__init__.py": "", "extract/run.py": "from ..analyze import x", "analyze.py": ""},
     "operation extract imports pkg.analyze"),
    ({"apply.py": "def f():\n    from .cli import main\n", "cli/__init__.py": ""}, "operation apply imports pkg.cli"),
    ({"a.py": "from .b import _helper", "b.py": ""}, "private import of _helper from pkg.b"),
    ({f"m{i}.py": "" for i in range(15)}, "modules at the top of pkg"),
])
def test_a_planted_violation_is_found(tmp_path, files, expected):
    found = violations(_package(tmp_path, files))
    assert any(expected in line for line in found), found


def test_levels_count_the_longest_chain(tmp_path):
    root = _package(tmp_path, {"a.py": "from . import b", "b.py": "from .linalg import svd", "linalg/svd.py": ""})
    by_level = levels(load_package(root))
    assert (by_level["pkg.linalg.svd"], by_level["pkg.b"], by_level["pkg.a"]) == (0, 1, 2)


if __name__ == "__main__":
    print(report(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT))
    print("\n".join(violations(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)))
