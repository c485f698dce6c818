"""Inference needs no TensorFlow: in a subprocess where `import tensorflow` fails, `import frozenlm_jax`,
`load_lm`, `load_frozen` of a trained run, `generate` and `score` on an image file, and the evaluators on image
files all run, and nothing imports TensorFlow."""

import os
import subprocess
import sys

import numpy as np
from conftest import write_random_hf_llama, xla_flags_for_child
from PIL import Image

SCRIPT = """
import pathlib, sys

# As if not installed: `import tensorflow` raises ModuleNotFoundError, importlib.util.find_spec gives None.
sys.modules["tensorflow"] = sys.modules["tensorflow_datasets"] = None
import numpy as np
import frozenlm_jax
from frozenlm_jax import load_frozen, load_lm
from frozenlm_jax.eval.report import evaluate_runs

hf_dir, workdir, image, out = sys.argv[1:]
lm = load_lm(hf_dir)
logits = lm.model.apply({"params": lm.params}, np.array([[1, 2, 3]]))
assert logits.shape[:2] == (1, 3), logits.shape
model = load_frozen(workdir)
prompt = [pathlib.Path(image), "A picture of"]
[text] = model.generate(prompt, max_new_tokens=3)
scores = model.score(prompt, ["a red circle", "two blue squares"])
assert np.isfinite(scores).all() and scores.shape == (2,), scores
report = evaluate_runs([workdir], "shapes_vqa,fast_binding", out)
loaded = sorted(m for m, module in sys.modules.items()
                if module is not None and m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
assert not loaded, loaded
assert report, report
print("OK", repr(text))
"""


def test_inference_and_evaluation_run_without_tensorflow(tiny_run, tmp_path):
    workdir, _ = tiny_run
    write_random_hf_llama(tmp_path / "hf")
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3)).astype(np.uint8)).save(image)
    env = dict(os.environ, XLA_FLAGS=xla_flags_for_child(1), FROZENLM_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "hf"), str(workdir), str(image),
                          str(tmp_path / "eval")], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.splitlines()[-1].startswith("OK ")
    assert (tmp_path / "eval" / "results.md").exists()
