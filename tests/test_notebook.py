"""notebooks/quickstart.ipynb runs: every code cell executed in order, in one namespace, with configs/tiny.py
and a few steps substituted for its parameters (offline, no Jupyter needed), so the notebook cannot rot."""

import json
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def code_cells(notebook: dict) -> list[tuple[list[str], str]]:
    """(tags, source) of each code cell, IPython's `%magic` and `!shell` lines dropped."""
    cells = []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
        cells.append((cell["metadata"].get("tags", []), "\n".join(lines)))
    return cells


def fake_ipython_display(displayed: list) -> types.ModuleType:
    """Just enough of `IPython.display` for the notebook outside Jupyter: display() records what it is given."""

    class Image:
        def __init__(self, data=None, filename=None, **kwargs):
            self.data = Path(filename).read_bytes() if filename is not None else data

    class Markdown:
        def __init__(self, data=None, filename=None):
            self.data = Path(filename).read_text() if filename is not None else data

    module = types.ModuleType("IPython.display")
    module.Image, module.Markdown = Image, Markdown
    module.display = lambda *objects, **kwargs: displayed.extend(objects)
    return module


def builtins_importing(module: types.ModuleType) -> dict:
    """Builtins whose `import` gives `module` for its own name, seen only by code run with them (not put in
    sys.modules, where other libraries would take it for the real thing)."""
    import builtins

    def importer(name, globals=None, locals=None, fromlist=(), level=0):
        if name == module.__name__ and fromlist:
            return module
        if name == module.__name__ or name.startswith(module.__name__ + "."):
            raise ImportError(f"only `from {module.__name__} import ...` is stubbed in this test")
        return builtins.__import__(name, globals, locals, fromlist, level)

    return dict(vars(builtins), __import__=importer)


def test_notebook_is_clean_nbformat_with_a_parameters_cell():
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4 and notebook["metadata"]["kernelspec"]["language"] == "python"
    cells = notebook["cells"]
    assert all(c["cell_type"] in ("markdown", "code") and "id" in c and "source" in c for c in cells)
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code), \
        "commit the notebook without outputs (Kernel → Restart & Clear Output)"
    assert "parameters" in code[0]["metadata"].get("tags", []), "the first code cell holds the parameters"
    sources = ["".join(c["source"]) for c in code[1:]]
    assert [("USE_SMOLLM2" in s, '"smollm2-135m"' in s) for s in sources].count((True, True)) == 1
    assert not any("USE_SMOLLM2" in s and '"smollm2-135m"' not in s for s in sources), \
        "only the SmolLM2 demo may be skipped in the test (by USE_SMOLLM2)"


@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")  # a random LM's captions are random bytes
def test_every_code_cell_runs_with_the_tiny_config(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    namespace: dict = {"__name__": "__main__"}
    displayed: list = []
    try:
        import IPython.display  # noqa: F401
        stubbed = False
    except ImportError:  # not installed here: the notebook's display calls are recorded instead
        namespace["__builtins__"] = builtins_importing(fake_ipython_display(displayed))
        stubbed = True
    monkeypatch.setenv("FROZENLM_CACHE", str(tmp_path / "cache"))  # generated evaluation files
    monkeypatch.chdir(ROOT)
    workdir = tmp_path / "run"
    parameters = dict(CONFIG=str(ROOT / "frozenlm_jax" / "configs" / "tiny.py"), NUM_STEPS=4, WORKDIR=str(workdir),
                      DATA_DIR=str(tmp_path / "tfds"), EVAL_EXAMPLES=4, USE_SMOLLM2=False)

    cells = code_cells(json.loads(NOTEBOOK.read_text()))
    for index, (tags, source) in enumerate(cells):
        start = time.perf_counter()
        try:
            exec(compile(source, f"quickstart.ipynb code cell {index}", "exec"), namespace)
            for number in plt.get_fignums():  # render every figure, as Jupyter would
                plt.figure(number).canvas.draw()
            plt.close("all")
            print(f"cell {index}: {time.perf_counter() - start:.1f} s")
        except Exception as e:
            pytest.fail(f"code cell {index} raised {type(e).__name__}: {e}\n--- cell source ---\n{source}")
        if "parameters" in tags:
            missing = sorted(set(parameters) - set(namespace))
            assert not missing, f"the parameters cell no longer sets {missing}"
            namespace.update(parameters)  # as papermill injects them, right after the parameters cell

    assert namespace["fm"].image_size == 16  # the tiny model was trained and loaded
    assert len(namespace["captions"]) == 4 and isinstance(namespace["answer"], str)
    eval_dir = workdir / "eval"
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["rows"][0]["name"] == "run" and "fast_binding 2-way 1-shot" in results["rows"][0]["scores"]
    png = (eval_dir / "accuracy_vs_shots.png").read_bytes()
    if stubbed:
        assert [type(d).__name__ for d in displayed] == ["Markdown", "Image"]
        assert displayed[0].data.startswith("# Evaluation") and displayed[1].data == png
