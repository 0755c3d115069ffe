"""The import layering in docs/architecture.md holds, between the top-level packages and inside each package: no
module imports from a layer above its own, and every module has a place in it (so the doc cannot drift from the code).
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def parse(block: str) -> dict[str, int]:
    return {name.strip(): depth for depth, line in enumerate(reversed(block.strip().splitlines()))
            for name in line.split(",")}


def top_layers() -> dict[str, int]:
    heading = "Import layering (each line imports only from lines below it):\n```\n"
    return parse(DOC.split(heading, 1)[1].split("```")[0])


def package_layers() -> dict[str, dict[str, int]]:
    return {package: parse(block) for package, block in
            re.findall(r"Import layering inside `lmforge/(\w+)/`[^\n]*\n```\n(.*?)```", DOC, flags=re.S)}


def internal_imports(path: Path, parts: tuple[str, ...]):
    """(line, absolute module path inside lmforge) of every relative import, including ones inside functions."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            package = list(parts[:-1])[:len(parts) - node.level]
            if node.module:
                yield node.lineno, tuple(package + node.module.split("."))
            else:
                for alias in node.names:
                    yield node.lineno, tuple(package + [alias.name])


def modules():
    for path in sorted((ROOT / "lmforge").rglob("*.py")):
        parts = path.relative_to(ROOT / "lmforge").with_suffix("").parts
        if parts[-1] not in ("__init__", "__main__"):
            yield path, parts


def test_no_module_imports_from_a_higher_layer():
    level = top_layers()
    problems = []
    for path, parts in modules():
        if parts[0] not in level:
            problems.append(f"{'/'.join(parts)}.py: {parts[0]} has no line in the layering of docs/architecture.md")
            continue
        for line, target in internal_imports(path, parts):
            if target[0] != parts[0] and target[0] in level and level[target[0]] > level[parts[0]]:
                problems.append(f"{'/'.join(parts)}.py:{line} imports {target[0]}, a higher layer than {parts[0]}")
    assert not problems, "\n".join(problems)


def test_inside_each_package_no_module_imports_from_a_higher_layer():
    packages = package_layers()
    problems = []
    for path, parts in modules():
        if len(parts) != 2:
            continue
        package, name = parts
        level = packages.get(package)
        if level is None:
            problems.append(f"lmforge/{package}/ has no 'Import layering inside' block in docs/architecture.md")
            continue
        if name not in level:
            problems.append(f"{package}/{name}.py has no line in the layering of lmforge/{package}/")
            continue
        for line, target in internal_imports(path, parts):
            if len(target) >= 2 and target[0] == package and target[1] in level and level[target[1]] > level[name]:
                problems.append(f"{package}/{name}.py:{line} imports {target[1]}, a higher layer than {name}")
    assert not problems, "\n".join(sorted(set(problems)))


def test_layers_are_small():
    """The point of the layout: a reader meets a few names per layer, not a flat list."""
    for where, level in [("top", top_layers())] + list(package_layers().items()):
        counts = {depth: sum(1 for d in level.values() if d == depth) for depth in set(level.values())}
        if where == "top":
            assert max(counts.values()) <= 3, f"top-level layers: {counts}"
        assert len(level) == len(set(level)), where
