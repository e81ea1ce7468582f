"""The package layers (ARCHITECTURE.md): every import in the library, lazy ones inside functions
included, points down. A forbidden import fails here with the file and line that made it."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = os.path.join(ROOT, "mllm")

#: Leaf modules: torch-free contracts every layer may import; they import only each other.
LEAVES = {"mllm.errors", "mllm.modality", "mllm.modality_context", "mllm.checkpoint"}

#: package (or module) -> mllm packages it must never import.
FORBIDDEN = {
    "mllm.tuners": {"mllm.model", "mllm.data", "mllm.train", "mllm.config", "mllm.hub", "mllm.encoders",
                    "mllm.projectors", "mllm.serve"},
    "mllm.encoders": {"mllm.model", "mllm.data", "mllm.train", "mllm.tuners", "mllm.config", "mllm.serve"},
    "mllm.projectors": {"mllm.model", "mllm.train", "mllm.tuners", "mllm.encoders", "mllm.serve"},
    "mllm.metrics": {"mllm.model", "mllm.data", "mllm.train", "mllm.tuners", "mllm.encoders", "mllm.serve"},
    "mllm.data": {"mllm.model", "mllm.train", "mllm.tuners", "mllm.serve"},
    "mllm.model": {"mllm.train", "mllm.serve", "mllm.demo", "mllm.classify", "mllm.continual"},
    "mllm.train": {"mllm.serve", "mllm.demo"},
}
#: Outside the library: the library never imports them (the command line and the demo, which sit
#: on top, may run the evaluation suites).
TOP_LEVEL = {"eval_suites", "stages", "benchmarks", "tests"}
COMMAND_LAYER = ("mllm.cli", "mllm.demo")


def _module_name(path: str) -> str:
    relative = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return relative[: -len(".__init__")] if relative.endswith(".__init__") else relative


def _imports(path: str):
    tree = ast.parse(open(path).read(), filename=path)
    package = _module_name(path).rsplit(".", 0 if path.endswith("__init__.py") else 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: resolve against the importing package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                yield node.lineno, f"{base}.{node.module}" if node.module else base
            elif node.module:
                yield node.lineno, node.module


def _library_files():
    for folder, _, names in os.walk(LIBRARY):
        for name in names:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_imports_point_down():
    wrong = []
    for path in _library_files():
        module = _module_name(path)
        where = os.path.relpath(path, ROOT)
        for line, imported in _imports(path):
            top = imported.split(".")[0]
            if top in TOP_LEVEL and not module.startswith(COMMAND_LAYER):
                wrong.append(f"{where}:{line} imports {imported} (the library never imports {top})")
            if module in LEAVES and imported.startswith("mllm") and imported not in LEAVES and imported != "mllm":
                if not _within(imported, "mllm.data.templates"):   # jinja rendering, torch-free
                    wrong.append(f"{where}:{line} imports {imported} (a leaf imports only leaves)")
            for package, forbidden in FORBIDDEN.items():
                if _within(module, package):
                    hit = next((f for f in forbidden if _within(imported, f)), None)
                    if hit:
                        wrong.append(f"{where}:{line} imports {imported} ({package} must not import {hit})")
    assert not wrong, "imports that cross the layers:\n" + "\n".join(sorted(wrong))


def test_the_rule_catches_a_forbidden_import(tmp_path, monkeypatch):
    """The checker itself: a tuner module importing the model package is reported."""
    package = tmp_path / "mllm" / "tuners"
    package.mkdir(parents=True)
    (package / "bad.py").write_text("def f():\n    from mllm.model.multimodal_lm import MultimodalLM\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", str(tmp_path))
    monkeypatch.setattr(__import__(__name__, fromlist=["LIBRARY"]), "LIBRARY", str(tmp_path / "mllm"))
    try:
        test_imports_point_down()
    except AssertionError as e:
        assert "mllm/tuners/bad.py:2 imports mllm.model.multimodal_lm" in str(e)
    else:
        raise AssertionError("the forbidden import was not reported")
