"""The README's module map matches the package: every subpackage is in the table, every
type it names is defined there, every file and function the job-flow paragraph names
exists; the top level stays small and no module grows past 500 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "budgeter"
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.index("\n## ", start + 1)
    return README[start:end]


def _table_rows() -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in _section("Module map").splitlines():
        found = re.match(r"\| `budgeter/(\w+)/` \| [^|]+ \|\s*([^|]*?)\s*\|$", line)
        if found:
            rows[found.group(1)] = found.group(2)
    return rows


def _defined_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return names


def test_the_table_lists_every_subpackage_and_nothing_else() -> None:
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")} | {"lua"}
    assert set(_table_rows()) == subpackages


def test_every_main_type_in_the_table_is_defined_in_its_subpackage() -> None:
    for subpackage, types in _table_rows().items():
        named = set(re.findall(r"`(\w+)`", types))
        missing = named - _defined_names(PACKAGE / subpackage)
        assert not missing, f"budgeter/{subpackage}/ does not define {sorted(missing)}"


def test_every_file_and_function_of_the_job_flow_exists() -> None:
    flow = _section("Module map").split("**How a job flows through the code.**")[1]
    flow = " ".join(flow.split())  # names may wrap across lines
    for name in re.findall(r"`([\w/]+\.(?:py|lua))`", flow):
        base = PACKAGE / "lua" if name.endswith(".lua") else PACKAGE
        assert (base / name).is_file(), name
    defined = _defined_names(PACKAGE)
    for owner, member in re.findall(r"`(\w+)\.(\w+)`", flow):
        assert owner in defined and member in defined, f"{owner}.{member}"


def test_the_top_level_keeps_at_most_eight_modules_and_none_is_over_500_lines() -> None:
    assert len(list(PACKAGE.glob("*.py"))) <= 8
    long = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500
    }
    assert not long
