"""The import layers: orchestration (opd.pipeline) → stages (opd.stages) → foundation (opd.cache).

A module may import its own layer and the layers below it, never one above (module-level or inside a
function), so the foundation can be used without the stages and the stages without the CLI.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"cache": 0, "stages": 1, "pipeline": 2}


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "opd" and parts[1] in LAYERS else None


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_no_module_imports_a_layer_above_its_own(folder):
    bad = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for lineno, module in _imports(path):
            target = _layer(module)
            if target is not None and LAYERS[target] > LAYERS[folder]:
                bad.append(f"{path.relative_to(ROOT)}:{lineno} imports {module}")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_the_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from opd.pipeline.loop import die_with_parent\n    import opd.stages.train\n")
    assert [(_layer(m)) for _, m in _imports(probe) if _layer(m)] == ["pipeline", "pipeline", "stages"]
