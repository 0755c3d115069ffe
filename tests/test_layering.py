"""The import layering in docs/architecture.md holds: no module imports from a layer above its own, and every module
has a place in it (so the doc cannot drift from the code)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layers() -> dict[str, int]:
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = doc.split("Import layering (each line imports only from lines below it):\n```\n", 1)[1].split("```")[0]
    return {name.strip(): depth for depth, line in enumerate(reversed(block.strip().splitlines()))
            for name in line.split(",")}


def internal_imports(path: Path, parts: tuple[str, ...]):
    """(line, top-level lmforge module) of every relative import in the file, including ones inside functions."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            package = list(parts[:-1])[:len(parts) - node.level]
            target = package + (node.module.split(".") if node.module else [node.names[0].name])
            yield node.lineno, target[0]


def test_no_module_imports_from_a_higher_layer():
    level = layers()
    problems = []
    for path in sorted((ROOT / "lmforge").rglob("*.py")):
        parts = path.relative_to(ROOT / "lmforge").with_suffix("").parts
        if parts[0] in ("__init__", "__main__"):
            continue
        if parts[0] not in level:
            problems.append(f"{path.name}: {parts[0]} has no line in the layering of docs/architecture.md")
            continue
        for line, target in internal_imports(path, parts):
            if target != parts[0] and target in level and level[target] > level[parts[0]]:
                problems.append(f"{'/'.join(parts)}.py:{line} imports {target}, a higher layer than {parts[0]}")
    assert not problems, "\n".join(problems)
