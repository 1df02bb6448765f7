"""``UMLSegmentation.py`` (module, widget, self-test) and the extension's static parts: the ``.ui`` file against the
widget code, the imports of the script, the CMake lists against the files, the extension descriptions."""

from __future__ import annotations

import ast
import enum
import json
import re
import shutil
import subprocess
import sys
import types
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from .umlslicer_helpers import REPO

MODULE = REPO / "UMLSegmentation"
UI_FILE = MODULE / "Resources" / "UI" / "UMLSegmentation.ui"
MODULE_SCRIPT = MODULE / "UMLSegmentation.py"


# ---------------------------------------------------------------------------------------------- .ui vs code


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def ui_parameter_bindings() -> dict[str, ET.Element]:
    bound = {}
    for widget in ui_widgets().values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget
    return bound


def ui_string_list(widget: ET.Element, name: str) -> list[str]:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return [s.text for s in prop.iter("string")]
    return []


@pytest.fixture(scope="module")
def module_namespace():
    """Import UMLSegmentation.py with stand-ins for what only the Slicer application has (qt, the
    ScriptedLoadableModule base classes, parameterNodeWrapper), so its module-level code really runs."""

    class Base:
        def __init__(self, *args, **kwargs):
            pass

    qt = types.ModuleType("qt")
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest", "ScriptedLoadableModuleWidget"):
        setattr(slm, name, type(name, (Base,), {}))
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.WithinRange = lambda lo, hi: ("WithinRange", lo, hi)
    saved = {k: sys.modules.get(k) for k in ("qt", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper")}
    sys.modules.update({"qt": qt, "slicer.ScriptedLoadableModule": slm, "slicer.parameterNodeWrapper": pnw})
    try:
        namespace = {"__name__": "UMLSegmentation_under_test", "__file__": str(MODULE_SCRIPT)}
        exec(compile(MODULE_SCRIPT.read_text(), str(MODULE_SCRIPT), "exec", dont_inherit=True), namespace)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return namespace


def widget_ui_references() -> set[str]:
    """Every ``self.ui.<name>`` in the module, and widget names used through ``getattr(self.ui, name)``."""
    tree = ast.parse(MODULE_SCRIPT.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui" \
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self":
            names.add(node.attr)
    widget_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "UMLSegmentationWidget")
    suffixes = ("Selector", "Label", "Button", "ComboBox", "CheckBox", "SliderWidget", "SpinBox", "ProgressBar", "Widget")
    for node in ast.walk(widget_class):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"[a-z][A-Za-z0-9]+", node.value) \
                and node.value.endswith(suffixes):
            names.add(node.value)
    return names


def test_every_ui_reference_of_the_widget_exists_in_the_ui_file():
    references = widget_ui_references()
    assert {"runButton", "inputVolumeSelector", "phase2VolumeSelector", "uncertaintyProgressBar"} <= references
    missing = sorted(references - set(ui_widgets()))
    assert missing == [], f"the widget uses {missing}, which the .ui file does not define"


def test_every_parameter_is_bound_to_a_fitting_widget(module_namespace):
    params = module_namespace["UMLSegmentationParameterNode"].__annotations__
    bindings = ui_parameter_bindings()
    code = MODULE_SCRIPT.read_text()
    assert set(bindings) <= set(params), f"the .ui binds unknown parameters {sorted(set(bindings) - set(params))}"
    for name, annotation in params.items():
        if name not in bindings:  # bound by hand in the widget code
            assert f"self._parameterNode.{name} =" in code and f"_parameterNode.{name}" in code, f"parameter {name!r} is not bound"
            continue
        widget = bindings[name]
        base = typing.get_origin(annotation) is typing.Annotated and typing.get_args(annotation)[0] or annotation
        cls = widget.get("class")
        if isinstance(base, type) and issubclass(base, enum.Enum):
            assert cls == "QComboBox", name
        elif base is bool:
            assert cls == "QCheckBox", name
        elif base is int:
            assert cls == "QSpinBox", name
        elif base is float:
            assert cls in ("ctkSliderWidget", "QDoubleSpinBox"), name
        else:  # an MRML node class
            assert cls == "qMRMLNodeComboBox", name
            assert ui_string_list(widget, "nodeTypes") == [base.__name__], name
    assert "modelPath" not in bindings  # the model list is dynamic: bound in code


def test_the_input_selector_lists_pictures():
    """A picture loads as a vtkMRMLVectorVolumeNode (colour) or a single-slice scalar volume (grey): the input selector
    lists scalar volumes with their subclasses (qMRMLNodeComboBox's default), hiding only labelmaps, so both show."""
    import slicer

    selector = ui_widgets()["inputVolumeSelector"]
    assert ui_string_list(selector, "nodeTypes") == ["vtkMRMLScalarVolumeNode"]
    assert ui_string_list(selector, "hideChildNodeTypes") == ["vtkMRMLLabelMapVolumeNode"]
    show = [p.findtext("bool") for p in selector.findall("property") if p.get("name") == "showChildNodeTypes"]
    assert show in ([], ["true"])
    assert slicer.vtkMRMLVectorVolumeNode().IsA("vtkMRMLScalarVolumeNode")


def test_node_selectors_get_the_scene():
    root = ET.parse(UI_FILE).getroot()
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    selectors = {n for n, w in ui_widgets().items() if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors and selectors <= receivers


def test_module_metadata(module_namespace):
    assert module_namespace["UMLSegmentationLogic"].__module__ == "UMLSegmentationLib.logic"
    text = MODULE_SCRIPT.read_text()
    assert 'self.parent.categories = ["Segmentation"]' in text
    assert "Uncertainty-informed Mutual Learning" in module_namespace["UML_CITATION"]
    assert "MICCAI 2023" in module_namespace["UML_CITATION"]
    assert {e.value for e in module_namespace["ComputeDevice"]} == {"auto", "cpu", "cuda", "mps"}
    assert "PyTorchUtils" in text and "installTorch" in text and "confirmOkCancelDisplay" in text


def test_every_import_of_the_module_script_resolves():
    """Every name the script imports from UMLSegmentationLib, at module level or inside a function, exists where it
    is imported from; nothing comes from umlcore (Slicer's Python cannot import it in an installed extension)."""
    import importlib

    imports = [n for n in ast.walk(ast.parse(MODULE_SCRIPT.read_text())) if isinstance(n, ast.ImportFrom)
               and n.level == 0 and n.module and n.module.split(".")[0] in ("umlcore", "UMLSegmentationLib")]
    modules = {n.module for n in imports}
    assert "UMLSegmentationLib.logic" in modules and not any(m.split(".")[0] == "umlcore" for m in modules)
    for node in imports:
        module = importlib.import_module(node.module)
        missing = [a.name for a in node.names if not hasattr(module, a.name)]
        assert missing == [], f"UMLSegmentation.py line {node.lineno}: {node.module} has no {missing}"


# ---------------------------------------------------------------------------------------------- CMake


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, variable
    return [t.replace("${MODULE_NAME}", "UMLSegmentation") for t in match.group(1).split()]


def module_files() -> set[str]:
    skip = {"CMakeLists.txt"}
    return {
        p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*")
        if p.is_file() and p.name not in skip and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_every_module_file_is_listed_in_the_module_cmake():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    listed = set(scripts) | set(resources)
    assert listed == module_files()
    assert all(s.endswith(".py") for s in scripts) and not any(r.endswith(".py") for r in resources)
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


STUB_PROJECT = """
cmake_minimum_required(VERSION 3.16)
project(StubSlicerExtension NONE)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(BUILD_TESTING OFF)
# Stand-in for Slicer's macro: record where ctkMacroCompilePythonScript would copy each file
# (relative scripts and resources keep their path; absolute scripts are taken relative to the binary dir).
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  set(targets)
  foreach(f IN LISTS MY_SCRIPTS)
    if(IS_ABSOLUTE ${f})
      if(NOT EXISTS ${f})
        message(FATAL_ERROR "missing script ${f}")
      endif()
      file(RELATIVE_PATH t ${CMAKE_CURRENT_BINARY_DIR} ${f})
      list(APPEND targets "${t}=${f}")
    else()
      if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${f})
        message(FATAL_ERROR "missing script ${f}")
      endif()
      list(APPEND targets "${f}=${CMAKE_CURRENT_SOURCE_DIR}/${f}")
    endif()
  endforeach()
  foreach(f IN LISTS MY_RESOURCES)
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${f})
      message(FATAL_ERROR "missing resource ${f}")
    endif()
    list(APPEND targets "${f}=${CMAKE_CURRENT_SOURCE_DIR}/${f}")
  endforeach()
  string(REPLACE ";" "\\n" lines "${targets}")
  file(WRITE ${CMAKE_BINARY_DIR}/module_files.txt "${lines}\\n")
  file(WRITE ${CMAKE_BINARY_DIR}/module_name.txt "${MY_NAME} ${MY_WITH_GENERIC_TESTS}")
endfunction()
add_subdirectory(@MODULE@ UMLSegmentation)
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_module_cmake_bundles_umlcore_and_the_shipped_models(tmp_path):
    """Configure the module's CMakeLists.txt with a stand-in Slicer macro: every umlcore source lands at
    <module dir>/UMLCore/umlcore/..., shipped bundles at <module dir>/Resources/Models/...."""
    models = tmp_path / "models" / "uml-demo"
    models.mkdir(parents=True)
    (models / "model.json").write_text("{}")
    (models / "model.safetensors").write_bytes(b"\0" * 16)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "CMakeLists.txt").write_text(STUB_PROJECT.replace("@MODULE@", MODULE.as_posix()))
    build = tmp_path / "build"
    proc = subprocess.run(
        ["cmake", "-S", str(tmp_path / "src"), "-B", str(build), f"-DUML_MODELS_DIR={tmp_path / 'models'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (build / "module_name.txt").read_text() == "UMLSegmentation TRUE"
    targets = dict(line.split("=", 1) for line in (build / "module_files.txt").read_text().split("\n") if line)
    engine = {p.relative_to(REPO).as_posix() for p in (REPO / "UMLCore" / "umlcore").rglob("*.py")}
    assert engine and engine <= set(targets)  # UMLCore/umlcore/*.py, relative to the module folder
    for rel in engine:
        assert Path(targets[rel]).read_bytes() == (REPO / rel).read_bytes()
    assert module_files() <= set(targets)
    installed_models = build / "lib/Slicer-5.8/qt-scripted-modules/Resources/Models/uml-demo"
    assert sorted(p.name for p in installed_models.iterdir()) == ["model.json", "model.safetensors"]


# ---------------------------------------------------------------------------------------------- descriptions


def cmake_extension_vars() -> dict[str, str]:
    text = (REPO / "CMakeLists.txt").read_text()
    return {m.group(1): m.group(2).strip().strip('"') for m in re.finditer(r"set\((EXTENSION_\w+)\s+(.*?)\)\n", text)}


def s4ext_fields() -> dict[str, str]:
    fields = {}
    for line in (REPO / "UMLExtension.s4ext").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            fields[key] = value.strip()
    return fields


def test_extension_descriptions_carry_the_required_fields_and_agree():
    cm = cmake_extension_vars()
    s4 = s4ext_fields()
    js = json.loads((REPO / "UMLExtension.json").read_text())
    assert "project(UMLExtension)" in (REPO / "CMakeLists.txt").read_text()
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert cm[f"EXTENSION_{key}"], key
    required_s4ext = ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                      "category", "iconurl", "status", "description", "screenshoturls", "enabled")
    assert all(s4.get(k) for k in required_s4ext), [k for k in required_s4ext if not s4.get(k)]
    assert s4["homepage"] == cm["EXTENSION_HOMEPAGE"] and s4["category"] == cm["EXTENSION_CATEGORY"] == "Segmentation"
    assert s4["contributors"] == cm["EXTENSION_CONTRIBUTORS"] and s4["description"] == cm["EXTENSION_DESCRIPTION"]
    assert s4["iconurl"] == cm["EXTENSION_ICONURL"] and s4["screenshoturls"] == cm["EXTENSION_SCREENSHOTURLS"]
    assert s4["depends"] == cm["EXTENSION_DEPENDS"] == "PyTorch"
    # ExtensionsIndex catalog entry schema v1.0.1: $schema, category and scm_url required, nothing else allowed
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "enabled", "scm_revision", "scm_type", "scm_url", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(js) <= allowed
    assert "slicer-extension-catalog-entry-schema" in js["$schema"]
    assert js["category"] == cm["EXTENSION_CATEGORY"] and js["scm_url"] == s4["scmurl"]
    assert js["scm_revision"] == s4["scmrevision"] and js["build_subdirectory"] == s4["build_subdirectory"]
    assert js["build_dependencies"] == s4["depends"].split()
    assert 1 <= js["tier"] <= 5
    # the index wants a repository named Slicer*; the homepage, icon and screenshots are served from it
    owner, name = s4["scmurl"].removesuffix(".git").split("/")[-2:]
    assert name.startswith("Slicer"), name
    for url in [s4["homepage"], s4["iconurl"], *s4["screenshoturls"].split()]:
        assert f"/{owner}/{name}" in url, url


def test_icon_screenshot_and_license_exist():
    from PIL import Image

    cm = cmake_extension_vars()
    icon = REPO / cm["EXTENSION_ICONURL"].split("/main/", 1)[1]
    assert Image.open(icon).size == (128, 128) and Image.open(icon).format == "PNG"
    for url in cm["EXTENSION_SCREENSHOTURLS"].split():
        assert (REPO / url.split("/main/", 1)[1]).is_file()
    assert Image.open(MODULE / "Resources" / "Icons" / "UMLSegmentation.png").size == (128, 128)
    assert (REPO / "LICENSE").is_file() and Path(cm["EXTENSION_LICENSE_FILE"].replace("${CMAKE_CURRENT_SOURCE_DIR}", str(REPO))) == REPO / "LICENSE"
