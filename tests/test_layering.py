"""The server side stands alone: nothing under server/ imports the offline packages.

calibration/ and bench/ import server/, never the reverse, so a serving image needs neither and
an offline change cannot break serving. Checked on the source with `ast`, imports inside
functions and `importlib.import_module("...")` calls included.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = ("calibration", "bench")


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def offending(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path}:{line} imports {name}" for line, name in imported_modules(tree) if name.split(".")[0] in OFFLINE]


def test_no_server_module_imports_calibration_or_bench():
    files = sorted((ROOT / "server").rglob("*.py"))
    assert len(files) > 20  # the walk found the tree
    problems = [p for f in files for p in offending(f)]
    assert not problems, "\n".join(problems)


def test_the_check_catches_each_form_of_import(tmp_path):
    sources = ["import calibration", "from calibration.fit import fit_heads", "import bench.serve as b",
               "def f():\n    from bench import cli", "import importlib\nimportlib.import_module('calibration.cli')"]
    for i, source in enumerate(sources):
        path = tmp_path / f"probe_{i}.py"
        path.write_text(source + "\n")
        assert offending(path), source
    clean = tmp_path / "clean.py"
    clean.write_text("from server.model.fetch import DEFAULT_MODEL\nimport calibrationx\n")
    assert not offending(clean)
