"""Static checks of the Slicer extension: what a Slicer build, the Extensions Index and Slicer 5.8
(Python 3.9) would reject, checked without Slicer. Facts are from the Slicer sources (v5.8.0
parameterNodeWrapper/guiConnectors.py, Utilities/Templates) and Slicer/ExtensionsIndex
(scripts/check_description_files.py, catalog schema v1.0.1)."""
import ast
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import slicer

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "AttentionMap"
MODULE_FILE = MODULE_DIR / "AttentionMap.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "AttentionMap.ui"
LIB_DIR = MODULE_DIR / "AttentionMapLib"
CATALOG = ROOT / "AttentionMap.json"

# Slicer 5.8 GUI connectors: widget class -> the unannotated parameter types it can bind.
# (ctkSliderWidget binds float only in 5.8; int widgets are QSlider/QSpinBox; str/enum combos need Choice.)
CONNECTORS_5_8 = {
    "QCheckBox": {"bool"}, "ctkCheckBox": {"bool"}, "QPushButton": {"bool"},
    "QSlider": {"int"}, "QSpinBox": {"int"},
    "QDoubleSpinBox": {"float"}, "ctkSliderWidget": {"float"}, "qMRMLSliderWidget": {"float"},
    "ctkDoubleSlider": {"float"}, "ctkDoubleSpinBox": {"float"}, "qMRMLSpinBox": {"float"},
    "QComboBox": {"choice"}, "ctkComboBox": {"choice"},
    "QLineEdit": {"str"}, "QLabel": {"str"}, "QTextEdit": {"str"},
    "ctkPathLineEdit": {"Path"}, "ctkDirectoryButton": {"Path"},
    "qMRMLNodeComboBox": {"node"},
}
# Schema v1.0.1 properties and the categories accepted by the Extensions Index checker.
CATALOG_PROPERTIES = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                      "build_subdirectory", "enabled", "tier"}
ACCEPTED_CATEGORIES = {
    "Active Learning", "Analysis", "Cardiac", "Converters", "DICOM", "Developer Tools", "Diffusion", "Examples",
    "Exporter", "Filtering", "IGT", "Informatics", "Neuroimaging", "Nuclear Medicine", "Quantification",
    "Radiotherapy", "Registration", "Rendering", "Segmentation", "Shape Analysis", "Simulation", "Training",
    "Ultrasound", "Utilities"}


# ---------------------------------------------------------------- helpers

def cmake_list(path: Path, variable: str) -> list:
    text = path.read_text()
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"{path}: no set({variable} ...)"
    return [item.replace("${MODULE_NAME}", "AttentionMap") for item in match.group(1).split()]


def cmake_set(text: str, variable: str) -> str:
    match = re.search(rf'set\s*\(\s*{variable}\s+"([^"]*)"\s*\)', text)
    assert match, f"set({variable} \"...\") missing"
    return match.group(1)


def module_ast() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(), feature_version=(3, 9))


def parameter_node_fields() -> dict:
    """name -> (annotation AST, default AST or None) of the @parameterNodeWrapper class."""
    for node in module_ast().body:
        if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list):
            return {s.target.id: (s.annotation, s.value) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in AttentionMap.py")


def module_constants() -> dict:
    constants = {}
    for node in module_ast().body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                if ast.unparse(node.value) == "list(method_names())":  # the method registry's names
                    from AttentionMapLib.core.method_registry import method_names
                    constants[node.targets[0].id] = list(method_names())
    return constants


def field_kind(annotation: ast.AST) -> tuple:
    """('node', [class names]) / ('choice', choices) / ('float' | 'int' | 'bool' | 'str' | 'Path', None).

    A node field is one class or a Union of node classes (and None), as the 5.8 parameterNodeWrapper's
    util.isNodeOrUnionOfNodes accepts; its util.getNodeTypes gives the combo box those class names."""
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
        base, *extras = annotation.slice.elts
        for extra in extras:
            if isinstance(extra, ast.Call) and ast.unparse(extra.func) == "Choice":
                return "choice", module_constants().get(ast.unparse(extra.args[0]), None)
        return field_kind(base)
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) in ("Union", "typing.Union"):
        names = [ast.unparse(e).split(".")[-1] for e in annotation.slice.elts if ast.unparse(e) != "None"]
        if names and all(n.startswith("vtkMRML") for n in names):
            return "node", names
    name = ast.unparse(annotation).split(".")[-1]
    if name.startswith("vtkMRML"):
        return "node", [name]
    return name, None


def ui_widgets() -> dict:
    """widget name -> (class, {property name: element})."""
    tree = ElementTree.parse(UI_FILE)
    widgets = {}
    for widget in tree.iter("widget"):
        props = {p.get("name"): p for p in widget.findall("property")}
        widgets[widget.get("name")] = (widget.get("class"), props)
    return widgets


def bound_widgets() -> dict:
    """SlicerParameterName -> (widget name, class, properties)."""
    bound = {}
    for name, (cls, props) in ui_widgets().items():
        if "SlicerParameterName" in props:
            parameter = props["SlicerParameterName"].find("string").text
            assert parameter not in bound, f"{parameter} is bound to two widgets"
            bound[parameter] = (name, cls, props)
    return bound


def png_size(path: Path) -> tuple:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


# ---------------------------------------------------------------- CMake

def test_every_file_in_the_module_cmake_lists_exists():
    listed = cmake_list(MODULE_DIR / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS") + cmake_list(
        MODULE_DIR / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES")
    missing = [item for item in listed if not (MODULE_DIR / item).is_file()]
    assert not missing, f"listed in AttentionMap/CMakeLists.txt but missing: {missing}"
    assert len(listed) == len(set(listed)), "a file is listed twice"


def test_every_library_file_and_resource_is_listed():
    listed = set(cmake_list(MODULE_DIR / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS"))
    listed |= set(cmake_list(MODULE_DIR / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES"))
    library = {f"AttentionMapLib/{p.relative_to(LIB_DIR).as_posix()}" for p in LIB_DIR.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    resources = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    assert "AttentionMap.py" in listed
    assert not (library - listed), f"library files missing from MODULE_PYTHON_SCRIPTS: {sorted(library - listed)}"
    assert not (resources - listed), f"resources missing from MODULE_PYTHON_RESOURCES: {sorted(resources - listed)}"
    assert {
        "AttentionMapLib/demo_model/demo_lung_nodule_vit.json",
        "AttentionMapLib/demo_model/demo_lung_nodule_vit.safetensors",
        "Resources/UI/AttentionMap.ui",
        "Resources/Icons/AttentionMap.png",
    } <= listed


def test_the_module_ships_no_training_or_evaluation_code():
    """The demo model's data, the baselines and the scripts stay in the repository (attentionmap_dev/, tools/,
    benchmarks/): nothing the Slicer module ships is, or imports, development code."""
    listed = cmake_list(MODULE_DIR / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS")
    listed += cmake_list(MODULE_DIR / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES")
    development = {p.stem for p in (ROOT / "attentionmap_dev").glob("*.py")} - {"__init__"}
    assert {"demo_data", "baselines"} <= development
    assert not [item for item in listed if Path(item).stem in development or re.search(r"train|evaluat", item)]
    for item in (item for item in listed if item.endswith(".py")):
        tree = ast.parse((MODULE_DIR / item).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
        assert not imported & {"attentionmap_dev", "tools", "benchmarks", "Testing"}, item


def test_module_cmake_builds_with_generic_tests_and_registers_the_self_test():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert re.search(r"slicerMacroBuildScriptedModule\(.*NAME \$\{MODULE_NAME\}.*WITH_GENERIC_TESTS.*\)", text, re.S)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert "add_subdirectory(Testing)" in text
    assert "add_subdirectory(Python)" in (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text()
    assert (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").is_file()
    assert "class AttentionMapTest(ScriptedLoadableModuleTest)" in MODULE_FILE.read_text()


def test_extension_cmake_has_full_metadata_and_images_that_exist():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(AttentionMap\)", text, re.M)
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION"):
        assert cmake_set(text, variable).strip(), variable
    assert cmake_set(text, "EXTENSION_DEPENDS") == "PyTorch"
    assert "add_subdirectory(AttentionMap)" in text and "find_package(Slicer REQUIRED)" in text
    assert "${Slicer_EXTENSION_GENERATE_CONFIG}" in text and "${Slicer_EXTENSION_CPACK}" in text
    homepage = cmake_set(text, "EXTENSION_HOMEPAGE")
    raw = homepage.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    # the Extensions Index checker reads these two with exactly these patterns
    icons = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', text)
    screenshots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', text)
    assert len(icons) == 1 and screenshots
    for url in [icons[0]] + screenshots[0].split():
        assert url.startswith(raw), f"{url} is not a raw file of {homepage}"
        local = ROOT / url[len(raw):]
        assert local.is_file(), f"{url}: {local} does not exist in the repository"
        png_size(local)
    assert png_size(ROOT / icons[0][len(raw):]) == (128, 128)
    assert png_size(MODULE_DIR / "Resources" / "Icons" / "AttentionMap.png") == (128, 128)


# ---------------------------------------------------------------- catalog entry and licence

def test_catalog_entry_meets_the_extensions_index_rules():
    raw = CATALOG.read_bytes()
    assert b"\r" not in raw, "the index requires LF line endings"
    entry = json.loads(raw)
    assert set(entry) <= CATALOG_PROPERTIES, f"not in schema v1.0.1: {set(entry) - CATALOG_PROPERTIES}"
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].startswith(
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json")
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert entry["category"] in ACCEPTED_CATEGORIES and entry["category"] == cmake_set(cmake, "EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == ["PyTorch"] == cmake_set(cmake, "EXTENSION_DEPENDS").split()
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    name = CATALOG.stem
    assert not name.lower().startswith("slicer"), "the extension name must not start with Slicer"
    assert re.search(rf"^project\({name}\)", cmake, re.M), "file name must equal the CMake project name"
    assert entry["scm_url"].startswith("https://")
    repository = entry["scm_url"].rstrip("/").split("/")[-1].removesuffix(".git")
    assert repository.startswith("Slicer"), "the repository name should start with Slicer"
    assert entry["scm_url"].rstrip("/").removesuffix(".git") == cmake_set(cmake, "EXTENSION_HOMEPAGE")


def test_bsd3_licence_at_the_root():
    text = (ROOT / "LICENSE").read_text()
    assert "BSD 3-Clause License" in text and "AttentionMap contributors" in text
    assert "Neither the name of the copyright holder" in text


# ---------------------------------------------------------------- module file vs .ui vs parameter node

def test_every_ui_widget_used_exists_in_the_ui_file():
    used = {node.attr for node in ast.walk(module_ast())
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert used, "AttentionMap.py uses no self.ui widgets?"
    missing = used - set(ui_widgets())
    assert not missing, f"self.ui.<name> used but not in AttentionMap.ui: {sorted(missing)}"


def test_every_slicer_parameter_name_is_a_field_and_its_widget_can_bind_it():
    fields = parameter_node_fields()
    bound = bound_widgets()
    assert not set(bound) - set(fields), f"SlicerParameterName without a field: {set(bound) - set(fields)}"
    for parameter, (widget, cls, props) in bound.items():
        kind, detail = field_kind(fields[parameter][0])
        assert kind in CONNECTORS_5_8.get(cls, set()), f"{widget} ({cls}) cannot bind {parameter} ({kind}) in 5.8"
        if kind == "node":
            types = [s.text for s in props["nodeTypes"].iter("string")]
            for node_type in types:
                assert any(getattr(slicer, node_type)().IsA(c) for c in detail), (
                    f"{widget}: {node_type} not in {detail}"
                )
        if kind == "choice":
            assert detail, f"{parameter}: Choice must name a literal module-level list"
            default = fields[parameter][1]
            if default is not None:
                value = module_constants().get(ast.unparse(default).split("[")[0], None)
                value = value[ast.literal_eval(default.slice)] if isinstance(default, ast.Subscript) else (
                    ast.literal_eval(default))
                assert value in detail, f"{parameter}: default {value!r} not among {detail}"
        if cls == "QSlider":
            assert "WithinRange" in ast.unparse(fields[parameter][0]), "a QSlider needs a bounded int (5.8)"


def test_every_mrml_widget_gets_the_scene():
    tree = ElementTree.parse(UI_FILE)
    receivers = {c.find("receiver").text for c in tree.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    combos = {name for name, (cls, _) in ui_widgets().items()
              if cls in ("qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget")}
    assert combos and combos == receivers, f"without setMRMLScene: {combos - receivers}"
    root = tree.getroot().find("widget")
    assert root.get("class") == "qMRMLWidget" and root.get("name") == "AttentionMap"


def test_module_has_the_slicer_metadata():
    text = MODULE_FILE.read_text()
    for attribute in ("title", "categories", "contributors", "helpText", "acknowledgementText"):
        assert re.search(rf"self\.parent\.{attribute} = ", text), attribute
    for base in ("AttentionMap(ScriptedLoadableModule)", "AttentionMapWidget(ScriptedLoadableModuleWidget, "
                 "VTKObservationMixin)", "AttentionMapLogic(ScriptedLoadableModuleLogic)"):
        assert f"class {base}" in text


# ---------------------------------------------------------------- Python 3.9 and imports without torch

PY39_FILES = [MODULE_FILE] + sorted(LIB_DIR.glob("*.py"))


@pytest.mark.parametrize("path", PY39_FILES, ids=lambda p: p.name)
def test_parses_as_python_3_9(path):
    tree = ast.parse(path.read_text(), feature_version=(3, 9))
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body)
    if path == MODULE_FILE:
        assert not future, "no `from __future__` in AttentionMap.py"
    if not future:  # annotations are evaluated at run time: `X | Y` fails on 3.9
        annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.AnnAssign, ast.arg)) and n.annotation]
        annotations += [n.returns for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.returns]
        for annotation in annotations:
            assert not any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(annotation)), \
                f"{path.name}: `X | Y` annotation {ast.unparse(annotation)}"


def _top_level_imports(tree: ast.Module) -> list:
    """(module, names) of every import executed when the module is imported (not inside functions)."""
    found = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def test_module_top_level_imports_need_no_torch_or_monai():
    allowed_roots = set(sys.stdlib_module_names) | {"slicer", "qt", "ctk", "vtk", "numpy", "AttentionMapLib"}
    imports = _top_level_imports(module_ast())
    assert {module.split(".")[0] for module, _ in imports} <= allowed_roots
    statements = [ast.unparse(node) for node in module_ast().body
                  if isinstance(node, (ast.Import, ast.ImportFrom)) and "AttentionMapLib" in ast.unparse(node)]
    assert statements, "AttentionMap.py should use the library"
    # run exactly the module's library imports with torch and MONAI made unimportable
    script = textwrap.dedent(f"""
        import sys
        for blocked in ("torch", "monai", "einops"):
            sys.modules[blocked] = None
        for statement in {statements!r}:
            exec(statement)
        try:
            import AttentionMap
            print("MODULE IMPORTED")
        except ModuleNotFoundError as error:
            print("MISSING", error.name)
    """)
    # the module's folder alone on the path, as Slicer puts it
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(MODULE_DIR)})
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    # slicer-core has no Qt: the module stops at `import ctk`/`import qt`, never at torch or monai
    assert last == "MODULE IMPORTED" or last in ("MISSING ctk", "MISSING qt"), result.stdout + result.stderr


# ---------------------------------------------------------------- issue 9: defects found by reading Slicer's sources

def module_function(name: str) -> ast.FunctionDef:
    """A method of any class in AttentionMap.py, by name."""
    for node in ast.walk(module_ast()):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"AttentionMap.py has no function {name}")


def calls_in(function: ast.FunctionDef) -> list:
    """Names of the functions / methods called in a function, in source order (attribute tail)."""
    calls = [n for n in ast.walk(function) if isinstance(n, ast.Call)]
    calls.sort(key=lambda n: (n.lineno, n.col_offset))
    return [ast.unparse(n.func).split(".")[-1] for n in calls]


def test_every_node_selector_lists_nodes_of_a_real_scene(slicer_scene):
    """What the combo box shows once connectGui set its nodeTypes from the annotation: with
    showChildNodeTypes false only exact classes match, so an abstract class (vtkMRMLColorNode, the
    old annotation) showed no colour table at all."""
    from AttentionMapLib import mrml

    scene = slicer_scene.scene
    mrml.heat_color_node(scene)
    for cls in ("vtkMRMLScalarVolumeNode", "vtkMRMLMarkupsFiducialNode", "vtkMRMLSegmentationNode", "vtkMRMLTableNode"):
        scene.AddNewNodeByClass(cls)
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    fields = parameter_node_fields()
    for parameter, (widget, _cls, props) in bound_widgets().items():
        kind, classes = field_kind(fields[parameter][0])
        if kind != "node":
            continue
        show_children = (
            props.get("showChildNodeTypes") is None or props["showChildNodeTypes"].find("bool").text == "true"
        )
        listed = [
            n for n in nodes if (any(n.IsA(c) for c in classes) if show_children else n.GetClassName() in classes)
        ]
        assert listed, f"{widget}: no node of {classes} (showChildNodeTypes {show_children}) in a real scene"
        if parameter == "colorNode":
            names = {n.GetName() for n in listed}
            assert {"AttentionMapHeat", "PET-Heat", "Rainbow"} <= names, names


def test_gui_process_never_imports_torch_or_monai():
    """Everything AttentionMap.py imports, at any depth of the file, is torch-free; importing those
    library modules with torch and MONAI blocked works (the worker process alone imports them)."""
    library = set()
    for node in ast.walk(module_ast()):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("AttentionMapLib"):
            library |= {node.module.split(".", 1)[1]} if "." in node.module else {a.name for a in node.names}
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            assert not any(m.split(".")[0] in ("torch", "monai", "einops") for m in modules), ast.unparse(node)
    library -= {"AttentionMapError"}
    assert {"worker", "mrml", "dependencies", "module_logic"} <= library
    script = textwrap.dedent(f"""
        import sys
        for blocked in ("torch", "monai", "einops"):
            sys.modules[blocked] = None
        import importlib
        for name in {sorted(library | {"worker_protocol"})!r}:
            importlib.import_module("AttentionMapLib." + name)
        from AttentionMapLib.models import DEMO_CARD
        print("OK")
    """)
    # the module's folder alone on the path, as Slicer puts it
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(MODULE_DIR)})
    assert result.stdout.strip().endswith("OK"), result.stdout + result.stderr


def test_dependencies_are_installed_by_the_version_plan_after_one_consent():
    """A worker Python is checked by running it (nothing installed into Slicer); else the plan for Slicer's Python
    is installed after one consent asked outside the wait cursor, torch with its dependencies (never through
    PyTorchUtils.installTorch, whose light-the-torch pins pip below what Slicer 5.10 / 5.12 ship and which imports
    torch into Slicer), the rest with --no-deps; a failed pip on 5.12 is not reported twice."""
    install = module_function("installDependencies")
    calls = calls_in(install)
    assert calls.count("confirmOkCancelDisplay") == 1 and "plan_dependencies" in calls
    assert calls.index("configured_python") < calls.index("checkWorkerPython") < calls.index("plan_dependencies")
    assert calls.index("plan_dependencies") < calls.index("confirmOkCancelDisplay") < calls.index("WaitCursor")
    assert calls.index("WaitCursor") < calls.index("_pipInstall")
    source = ast.unparse(install)
    assert "self._pipInstall(plan.torch_arguments)" in source and "torch_loaded='torch' in sys.modules" in source
    # the --no-deps pins go through a requirements file with their hashes (slicer.util.pip_install passes a list
    # on as ["install", *arguments]: v5.12.3 Base/Python/slicer/packaging.py L952-955, v5.10.0 and v5.8.0
    # Base/Python/slicer/util.py pip_install)
    assert "plan.hashed_requirements()" in source and "self._pipInstall(plan.hashed_arguments(requirements))" in source
    pip = ast.unparse(module_function("_pipInstall"))
    assert "pip_install(arguments)" in pip and "CalledProcessError" in pip and "(5, 12)" in pip
    text = MODULE_FILE.read_text()
    assert "installTorch" not in text and "PyTorchUtils" not in text and "monai[einops]" not in text
    apply = ast.unparse(module_function("onApplyButton"))
    assert "installDependencies" in apply and "waitCursor=True" not in apply  # the question without a wait cursor
    assert apply.index("installDependencies") < apply.index("WaitCursor()")
    assert "installDependencies(askConsent=False)" in ast.unparse(module_function("test_AttentionMap_demo"))
    assert "skipTest" in ast.unparse(module_function("test_AttentionMap_demo"))  # no network: one clear message


def test_a_failure_while_showing_a_result_still_runs_the_pending_apply():
    """tryWithErrorDisplay re-raises (v5.12.3 Base/Python/slicer/util.py): onPoll catches it, clears the pending
    flags in a finally block and then runs the pending Apply or re-fusion."""
    poll = module_function("onPoll")
    tries = [n for n in ast.walk(poll) if isinstance(n, ast.Try)]
    assert tries and tries[0].finalbody and "_showFinal" in ast.unparse(tries[0].body)
    assert "_applyPending = self._fuseAgainPending = False" in ast.unparse(tries[0].finalbody)


def test_the_gui_connects_to_a_parameter_node_once():
    """Slicer 5.8's connectGui returns no tag and its disconnectGui removes nothing: exit() does not disconnect,
    enter() with the same node connects nothing again, observers are removed only where they exist."""
    assert "disconnectGui" not in calls_in(module_function("exit"))
    setter = ast.unparse(module_function("setParameterNode"))
    assert "parameterNode.parameterNode is self._parameterNode.parameterNode" in setter
    assert setter.index("hasObserver") < setter.index("removeObserver")


def test_the_worker_python_lives_in_the_application_settings_not_the_scene():
    fields = parameter_node_fields()
    assert not any("python" in name.lower() for name in fields)
    changed = ast.unparse(module_function("onWorkerPythonChanged"))
    assert "QSettings().setValue(WORKER_PYTHON_SETTING" in changed and "set_worker_python" in changed


def test_one_job_at_a_time_and_scoring_is_cancellable():
    apply = ast.unparse(module_function("onApplyButton"))
    assert "self._jobKind == 'score'" in apply  # Apply does nothing while the worker scores
    assert "not scoring" in ast.unparse(module_function("onParameterNodeModified"))  # ... and is disabled
    score = ast.unparse(module_function("onScoreButton"))
    assert "self._jobKind == 'score'" in score and "self._job.cancel()" in score


def test_a_result_is_checked_against_the_options_shown_once_applied():
    assert "fusion_differs" in calls_in(module_function("_applyResult"))
    assert "_fuseAgainTimer.start" in ast.unparse(module_function("_applyResult"))


def test_volume_rendering_goes_through_the_property_node():
    source = (LIB_DIR / "mrml.py").read_text()
    body = source[
        source.index("def _set_transfer_functions") : source.index("# ------", source.index("def _set_transfer"))
    ]
    assert "property_node.SetColor(" in body and "property_node.SetScalarOpacity(" in body
    assert "GetVolumeProperty()" not in body


def test_statistics_switch_to_a_layout_with_a_table():
    calls = calls_in(module_function("onStatisticsButton"))
    assert "GetLayoutWithTable" in calls and "setLayout" in calls
    assert calls.index("setLayout") < calls.index("PropagateTableSelection")


def test_layer_and_head_ranges_come_from_the_card_before_any_run():
    info = ast.unparse(module_function("_showModelInfo"))
    assert "self.ui.layerSlider.maximum" in info and "self.ui.headSpinBox.maximum" in info
    assert "modelSummary" in info and "card_summary" in ast.unparse(module_function("modelSummary"))
    assert "_showModelInfo" in calls_in(module_function("setParameterNode"))  # after connectGui reset them
    assert calls_in(module_function("setParameterNode")).index("connectGui") < calls_in(
        module_function("setParameterNode")).index("_showModelInfo")


def test_the_query_point_list_keeps_one_point():
    assert "keep_newest_control_point" in calls_in(module_function("onQueryPointMoved"))
    assert "keep_newest_control_point" in calls_in(module_function("_observeQueryPoint"))


def test_a_closing_scene_cancels_the_job_whose_result_is_then_never_applied():
    close = module_function("onSceneStartClose")
    assert "self._job.cancel()" in ast.unparse(close) and "forgetResult" in calls_in(close)
    assert "stop_shared_worker" in calls_in(module_function("cleanup"))  # Slicer closing: no worker survives


def test_scoring_runs_where_the_network_is():
    body = module_function("startScore").body[1:]  # after the docstring
    assert not any("device" in ast.unparse(statement) for statement in body)


def test_heat_table_comes_with_the_first_result_and_cases_reuse_their_nodes():
    assert "heat_color_node" not in ast.unparse(module_function("initializeParameterNode"))
    assert "heat_color_node" in calls_in(module_function("_show"))
    assert "case_output_nodes" in calls_in(module_function("processCases"))
    start = ast.unparse(module_function("startExplain"))
    assert start.count("volume_to_array") == 1 and "copy" not in start.replace("Copy the input", "")


def test_translations_and_module_dependencies_follow_the_template():
    tree = module_ast()
    guarded = [n for n in tree.body if isinstance(n, ast.Try)
               and "from slicer.i18n import tr as _" in ast.unparse(n) and "ImportError" in ast.unparse(n)]
    assert guarded, "the _() import must be guarded: slicer-core has no slicer.i18n"
    text = MODULE_FILE.read_text()
    assert 'self.parent.title = _("' in text and "self.parent.helpText = _(" in text
    assert 'translate("qSlicerAbstractCoreModule", "Analysis")' in text
    dependencies = re.search(r"self\.parent\.dependencies = (\[.*?\])", text).group(1)
    assert set(ast.literal_eval(dependencies)) == {"Markups", "Segmentations", "Tables", "VolumeRendering"}
    assert "logTextEdit" in ui_widgets() and "appendPlainText" in ast.unparse(module_function("_log"))


def test_the_self_test_drives_the_asynchronous_path():
    calls = calls_in(module_function("test_AttentionMap_demo"))
    for step in ("startExplain", "applyResult", "startFuseAgain", "applyFusedAgain", "process", "startScore"):
        assert step in calls, step
    assert "poll" in calls_in(module_function("_poll")) and "processEvents" in calls_in(module_function("_poll"))
    assert "assertLessEqual" in calls and "patch_size_mm" in calls  # the peak within one patch of the nodule


def test_worker_messages_are_data_never_pickles():
    """Both sides use send_bytes / recv_bytes (JSON and raw numbers) and np.load(allow_pickle=False):
    never Connection.send / recv (which pickle), pickle, or multiprocessing's process start-up."""
    for name in ("worker.py", "worker_protocol.py", "worker_process.py"):
        tree = ast.parse((LIB_DIR / name).read_text())
        for node in ast.walk(tree):
            # protocol.send: JSON; sock.recv / sendall: raw bytes of the handshake on a plain socket
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) not in ("protocol", "sock", "self.sock"):
                assert node.attr not in ("send", "recv"), f"{name}: {ast.unparse(node)} pickles"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(m in ("pickle", "multiprocessing", "multiprocessing.shared_memory") for m in modules), \
                    f"{name}: {ast.unparse(node)}"
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle" and name != "worker_protocol.py":
                raise AssertionError(f"{name}: allow_pickle outside the protocol module")
    flags = [ast.unparse(node.value) for node in ast.walk(ast.parse((LIB_DIR / "worker_protocol.py").read_text()))
             if isinstance(node, ast.keyword) and node.arg == "allow_pickle"]
    assert flags == ["False", "False"], flags  # np.save and np.load of the input file


def test_bundle_trust_is_never_saved_with_a_scene_and_resets_with_the_model():
    """A scene file could otherwise carry "trusted" to another bundle path: the flag is no parameter node field and
    no bound widget; the logic keeps the one bundle path trusted in this session and the checkbox follows it."""
    assert "trustBundle" not in parameter_node_fields()
    assert "trustBundle" not in bound_widgets()
    shown = ast.unparse(module_function("onParameterNodeModified"))
    assert "self.ui.trustBundleCheckBox.checked = self.logic.bundleTrusted(p)" in shown
    for step in ("startExplain", "processCases"):
        assert "trust_bundle=self.bundleTrusted(p)" in ast.unparse(module_function(step))
