"""The package's layers import one way: built from the sources (function-level imports included), the import
graph of `frozenlm_jax` has no cycle and no module imports a higher layer (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "frozenlm_jax"
# Lowest first; a module may import its own layer and lower ones. Prefixes name a module or a package.
LAYERS = [
    ("frozenlm_jax.console", "frozenlm_jax.parallel", "frozenlm_jax.paths", "frozenlm_jax.tokenizer",
     "frozenlm_jax.trees"),
    ("frozenlm_jax.models",),
    ("frozenlm_jax.config",),
    ("frozenlm_jax.weights",),
    ("frozenlm_jax.build",),
    ("frozenlm_jax.data",),
    ("frozenlm_jax.checkpointing",),
    ("frozenlm_jax.decode", "frozenlm_jax.frozen_lm", "frozenlm_jax.export"),
    ("frozenlm_jax.eval",),
    ("frozenlm_jax.train",),
    ("frozenlm_jax.configs", "frozenlm_jax.evaluate", "frozenlm_jax.generate", "frozenlm_jax.train.__main__",
     "frozenlm_jax.checkpoints", "frozenlm_jax"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of the longest prefix naming `module`."""
    best, layer = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    assert layer is not None, f"{module} is in no layer of LAYERS"
    return layer


def imports_of(path: Path) -> set[str]:
    """The frozenlm_jax modules `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("frozenlm_jax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("frozenlm_jax"):
            # `from package import submodule` imports the submodule.
            found |= {f"{node.module}.{a.name}" if (PACKAGE.parent / node.module.replace(".", "/") / a.name).exists()
                      or (PACKAGE.parent / (node.module.replace(".", "/") + f"/{a.name}.py")).exists()
                      else node.module for a in node.names}
    return found


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module):
    upward = sorted(m for m in GRAPH[module] if layer_of(m) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports higher layers: {upward}"


def test_no_import_cycle():
    known = set(GRAPH)
    edges = {m: {i for i in targets if i in known and i != m} for m, targets in GRAPH.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for target in edges[module]:
            if state.get(target) == 1:
                pytest.fail(f"import cycle: {' -> '.join(path[path.index(target):] + [target])}")
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_the_layer_test_sees_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from frozenlm_jax.train.step import make_trainer\n")
    assert imports_of(source) == {"frozenlm_jax.train.step"}


def test_top_level_names_and_the_deprecated_checkpoints_alias():
    import importlib
    import sys
    import warnings

    import frozenlm_jax
    from frozenlm_jax import weights

    assert {"Frozen", "FrozenLM", "load_frozen", "load_lm", "make_trainer", "train_and_evaluate"} <= set(dir(frozenlm_jax))
    sys.modules.pop("frozenlm_jax.checkpoints", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("frozenlm_jax.checkpoints")
    assert any(issubclass(w.category, DeprecationWarning) and "frozenlm_jax.weights" in str(w.message) for w in caught)
    assert old.load_lm is weights.load_lm
    assert importlib.import_module("frozenlm_jax.checkpoints.vision_weights") is weights.vision
    assert importlib.import_module("frozenlm_jax.checkpoints.gguf") is weights.gguf
