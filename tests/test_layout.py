"""The package layout stays layered (README "Layout"): each module imports only its own layer and the
ones below; layers 0–4 never import the model zoo (so "works on any JAX model" is a property of the
import graph); one module walks jaxprs and only `oba_jax.program.interpret` touches JAX's jaxpr internals; no
module imports another's private names."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "oba_jax")
LAYERS = {  # module path prefix (relative to oba_jax/) -> layer
    "paths": 0, "sharding": 0, "nnx_model": 0, "fastconv": 0, "losses": 0,
    "program": 1, "graph": 2, "scores": 3, "structured": 4, "unstructured": 4, "experiment": 5,
}


def _modules():
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                yield os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, "."), path


def _layer(module: str) -> int | None:
    """Layer of `oba_jax.<module>` (None: the package facade `oba_jax/__init__.py`)."""
    head = module.split(".")[0]
    if head == "__init__":
        return None
    assert head in LAYERS, f"oba_jax/{head}: not in the layer table of tests/test_layout.py (and README Layout)"
    return LAYERS[head]


def _imports(path: str):
    """(imported module, imported names, line) for every import statement."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, (), node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, tuple(a.name for a in node.names), node.lineno


def _targets(module: str, names: tuple[str, ...]) -> list[str]:
    """The oba_jax modules an import reaches (`from oba_jax import fastconv` reaches oba_jax.fastconv)."""
    if module == "oba_jax":
        subs = [n for n in names if os.path.exists(os.path.join(PACKAGE, n + ".py"))
                or os.path.isdir(os.path.join(PACKAGE, n))]
        return subs if subs and len(subs) == len(names) else ["__init__"]
    return [module[len("oba_jax."):]]


@pytest.mark.parametrize("module,path", list(_modules()))
def test_imports_point_down_the_layers(module, path):
    layer = _layer(module)
    for imported, names, line in _imports(path):
        where = f"oba_jax/{module.replace('.', '/')}.py:{line}"
        if imported == "models" or imported.startswith("models."):
            assert layer is None or layer >= 5, f"{where}: layer {layer} imports the model zoo"
        if imported == "oba_jax" or imported.startswith("oba_jax."):
            for target in _targets(imported, names):
                if layer is None:
                    continue
                target_layer = _layer(target)
                assert target_layer is not None, f"{where}: imports the oba_jax facade (import the module)"
                assert target_layer <= layer, f"{where}: layer {layer} imports oba_jax.{target} (layer {target_layer})"
                if layer == 4 and target_layer == 4:
                    assert target.split(".")[0] == module.split(".")[0], f"{where}: layer-4 siblings import each other"


def _python_files():
    for top in ("oba_jax", "tests", "bench"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            yield from (os.path.join(dirpath, f) for f in files if f.endswith(".py"))
    yield from (os.path.join(ROOT, f) for f in ("train.py", "prune.py"))


def test_no_module_imports_another_modules_private_names():
    bad = []
    for path in _python_files():
        for imported, names, line in _imports(path):
            if imported.split(".")[0] in ("oba_jax", "models"):
                bad += [f"{os.path.relpath(path, ROOT)}:{line} {n}" for n in names if n.startswith("_")]
    assert bad == []


def test_one_interpreter_and_one_owner_of_jaxpr_internals():
    loops, internals = [], []
    for path in (p for p in _python_files() if os.sep + "oba_jax" + os.sep in p):
        text = open(path).read()
        rel = os.path.relpath(path, ROOT)
        loops += [rel for _ in re.finditer(r"for \w+ in [\w.()]*\.eqns\b", text)]
        if not rel.endswith(os.path.join("program", "interpret.py")) and \
                re.search(r"jax\.extend|get_bind_params|ctx\.manager", text):
            internals.append(rel)
    assert loops == ["oba_jax/program/interpret.py"]
    assert internals == []
