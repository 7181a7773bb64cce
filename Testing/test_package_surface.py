"""What users and type checkers see of the package: the lazy exports, the entry points' Args sections,
and docs/DESIGN.md naming every library module."""
import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

import AttentionMapLib

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "AttentionMap" / "AttentionMapLib"


def test_type_checking_block_declares_exactly_the_lazy_exports():
    tree = ast.parse((LIB / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    declared = {alias.name: node.module for node in block.body for alias in node.names}
    assert declared == AttentionMapLib._LAZY
    for name, module in declared.items():  # and each name is really defined there
        assert getattr(AttentionMapLib, name).__module__ == f"AttentionMapLib.{module}", name


@pytest.mark.parametrize("name", ["explain", "explain_volume", "load_model", "read_volume"])
def test_public_entry_points_document_every_argument(name):
    function = getattr(AttentionMapLib, name)
    doc = inspect.getdoc(function)
    assert "Args:" in doc and "Returns:" in doc, name
    args = doc.split("Args:")[1].split("Returns:")[0]
    documented = set(re.findall(r"^\s{4}([\w, ]+):", args, flags=re.M))
    names = {n.strip() for entry in documented for n in entry.split(",")}
    missing = set(inspect.signature(function).parameters) - names
    assert not missing, f"{name}: no Args entry for {sorted(missing)}"


def test_design_doc_names_every_library_module():
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    modules = {p.stem for p in [*LIB.rglob("*.py"), *(ROOT / "attentionmap_dev").glob("*.py")]} - {"__init__"}
    assert {"engine", "mrml", "demo_data"} <= modules
    missing = {m for m in modules if f"`{m}`" not in text}
    assert not missing, f"docs/DESIGN.md does not place {sorted(missing)}"
    assert "docs/DESIGN.md" in (LIB / "__init__.py").read_text()


@pytest.mark.parametrize("module", ["cli", "worker", "mrml", "preprocess", "io", "models"])
def test_module_paths_users_import_stay_importable(module):
    """`AttentionMapLib.<module>` as users' scripts import it (a moved module is re-exported from its old path)."""
    imported = importlib.import_module(f"AttentionMapLib.{module}")
    public = getattr(imported, "__all__", None) or [n for n in vars(imported) if not n.startswith("_")]
    assert public, module


def test_preprocess_reexports_the_core_module_names():
    from AttentionMapLib import preprocess
    from AttentionMapLib.core import preprocess as core_preprocess

    public = {n for n, v in vars(core_preprocess).items() if not n.startswith("_")
              and getattr(v, "__module__", core_preprocess.__name__) == core_preprocess.__name__
              and not isinstance(v, type(core_preprocess))}
    assert public <= set(preprocess.__all__), sorted(public - set(preprocess.__all__))
    for name in preprocess.__all__:
        assert getattr(preprocess, name) is getattr(core_preprocess, name), name


def test_core_imports_nothing_from_the_adapters():
    """AttentionMapLib/core/ (the engine) imports only itself, AttentionMapLib.errors and third-party packages:
    no io, models, MRML, worker or CLI, and no Slicer."""
    for path in sorted((LIB / "core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert node.module == "errors", f"{path.name}: from ..{node.module}"
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.startswith("AttentionMapLib"):
                assert node.module.startswith(("AttentionMapLib.core", "AttentionMapLib.errors")), path.name
            elif isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
                assert not names & {"AttentionMapLib", "slicer", "vtk", "qt", "ctk"}, f"{path.name}: {names}"
            assert not (isinstance(node, ast.ImportFrom) and node.level > 2), path.name


def test_no_script_edits_the_import_path():
    """Scripts and tests import the installed package and the repository's packages (run from the root as
    ``python -m tools.x``; pytest puts the root on its path): none inserts or appends to sys.path."""
    pattern = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*\+?=|site\.addsitedir")
    folders = ["AttentionMap", "attentionmap_dev", "tools", "benchmarks", "Testing", ".ci"]
    offenders = [str(path.relative_to(ROOT)) for folder in folders for path in (ROOT / folder).rglob("*.py")
                 if path != Path(__file__).resolve() and pattern.search(path.read_text(encoding="utf-8"))]
    assert not offenders, offenders


def test_ci_runs_the_linter_the_wheel_test_and_the_tests():
    """.ci/run (a clean clone) runs `make lint wheel-test test test-evaluation test-cohort gui-pythons monai-series
    index-check`: ruff over the repository, the wheel outside the checkout, the test suite, the evaluation-marked and
    the cohort-marked tests, then the GUI side on Python 3.9 / 3.12, the engine on the other MONAI / numpy the plans
    install, and the plans against the package index."""
    assert re.search(r"^make lint wheel-test test test-evaluation test-cohort gui-pythons monai-series index-check$",
                     (ROOT / ".ci" / "run").read_text(encoding="utf-8"), re.M)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^lint: \$\(STAMP\)\n\t\$\(PY\) -m ruff check \.$", makefile, re.M)
    assert re.search(r"^wheel-test: \$\(STAMP\)\n\t\.ci/wheel_test\.sh \$\(PY\)$", makefile, re.M)
    assert "ruff==" in (ROOT / "requirements.lock").read_text(encoding="utf-8")


def test_make_evaluate_runs_each_whole_scan_once():
    """`make evaluate`: the card metrics without the whole scans, then EVALUATION.md, which runs them."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^evaluate: \$\(STAMP\)\n((?:\t.*\n)+)", makefile, re.M).group(1).splitlines()
    assert [line.split("-m ")[1] for line in recipe] == ["tools.evaluate_demo_model --no-whole-scans",
                                                        "benchmarks.evaluate"]
