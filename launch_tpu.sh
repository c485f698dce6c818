#!/usr/bin/env bash
# Launch frozenlm_jax training on every worker of a Cloud TPU VM pod.
#
#   WORKDIR=gs://my-bucket/frozen/run1 TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets \
#     ./launch_tpu.sh [--create] [--dry-run] [-- EXTRA TRAINER ARGS]
#
# Run ./launch_tpu.sh --help for every variable and flag; docs/tpu.md explains them.
set -euo pipefail

PROG=launch_tpu.sh
REMOTE_DIR=frozenlm_jax            # code, relative to each worker's $HOME
REMOTE_VENV=frozenlm_jax_venv      # virtual environment, relative to $HOME
REMOTE_TARBALL=frozenlm_jax_src.tar.gz
REMOTE_LOG=frozenlm_jax_train.log  # trainer output with --detach

usage() {
  cat <<EOF
Usage: $PROG [options] [-- extra trainer args...]

Copies this repository to every worker of a TPU VM pod, makes a virtual environment
there with jax[tpu] and this package (idempotent), clears stale TPU holders and runs
  python -m frozenlm_jax.train --config=\$CONFIG --workdir=\$WORKDIR [extra args]
on all workers at once with FROZENLM_DISTRIBUTED=1 (the trainer then calls
jax.distributed.initialize()).

Variables (environment), each also settable by the flag beside it:
  WORKDIR          --workdir=DIR           required; output dir shared by all workers, e.g. gs://my-bucket/frozen/run1
  TFDS_DATA_DIR    --tfds-data-dir=DIR     required; tfds data dir every worker reads, e.g. gs://my-bucket/tensorflow_datasets
  TPU_NAME         --tpu-name=NAME         default: frozenlm-\$ACCELERATOR_TYPE
  ZONE             --zone=ZONE             default: europe-west4-a
  PROJECT          --project=ID            default: empty (gcloud's configured project)
  ACCELERATOR_TYPE --accelerator-type=T    default: v3-64 (the paper's TPUv3 4x8)
  RUNTIME_VERSION  --runtime-version=V     default: tpu-ubuntu2204-base
  CONFIG           --config=NAME[:ARG]     a packaged config (frozenlm_jax/configs/NAME.py) or a file; default: cc3m_paper
  JAX_SPEC         --jax-spec=SPEC         default: jax[tpu] (pip requirement installed with the package)
  WORKER_PYTHON    --worker-python=PY      default: python3.11 (apt-installed on the workers if missing)
  CREATE_FLAGS     --create-flags=FLAGS    extra flags for 'tpu-vm create', e.g. "--spot"; default: empty

Flags:
  --create       create the TPU VM pod first (gcloud compute tpus tpu-vm create)
  --skip-setup   do not copy the code or touch the venv; only clean up and run
  --detach       start the trainer in the background on each worker (output in ~/$REMOTE_LOG)
                 instead of streaming its output here until it ends
  --dry-run      print every command it would run, one per line, and run none
  -h, --help     this help
  --config.KEY=VALUE   passed to the trainer as a config override
  -- ARGS...     everything after -- is passed to the trainer unchanged

Example:
  WORKDIR=gs://my-bucket/frozen/run1 TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets \\
    ./launch_tpu.sh --create --zone=europe-west4-a --config.train.num_steps=1000
EOF
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

# q WORD: WORD quoted for a POSIX shell: unchanged when it needs no quoting, else in
# double quotes when it holds none of $ ` " \ ! (readable inside a single-quoted
# --command), else in single quotes.
q() {
  if [[ -n $1 && $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 != *[\$\`\"\\!]* ]]; then
    printf '"%s"' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# quote_line ARGS...: the command line that runs exactly ARGS, on one line. A word
# --flag=VALUE is written --flag=QUOTED_VALUE, which the shell reads the same way.
quote_line() {
  local out="" w
  for w in "$@"; do
    if [[ $w =~ ^--[a-z-]+= ]]; then
      out+="${w%%=*}=$(q "${w#*=}") "
    else
      out+="$(q "$w") "
    fi
  done
  printf '%s\n' "${out% }"
}

DRY_RUN=0
CREATE=0
SKIP_SETUP=0
DETACH=0
EXTRA=()

need_value() {  # need_value FLAG REMAINING_ARG_COUNT
  [[ $2 -ge 2 ]] || die "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --create) CREATE=1 ;;
    --skip-setup) SKIP_SETUP=1 ;;
    --detach) DETACH=1 ;;
    --config.*) EXTRA+=("$1") ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --tfds-data-dir=*) TFDS_DATA_DIR=${1#*=} ;;
    --tpu-name=*) TPU_NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --accelerator-type=*) ACCELERATOR_TYPE=${1#*=} ;;
    --runtime-version=*) RUNTIME_VERSION=${1#*=} ;;
    --config=*) CONFIG=${1#*=} ;;
    --jax-spec=*) JAX_SPEC=${1#*=} ;;
    --worker-python=*) WORKER_PYTHON=${1#*=} ;;
    --create-flags=*) CREATE_FLAGS=${1#*=} ;;
    --workdir|--tfds-data-dir|--tpu-name|--zone|--project|--accelerator-type|--runtime-version|--config|--jax-spec|--worker-python|--create-flags)
      need_value "$1" $#
      set -- "$1=$2" "${@:3}"
      continue ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) die "unknown argument '$1' (trainer arguments go after --; see --help)" ;;
  esac
  shift
done

ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v3-64}
TPU_NAME=${TPU_NAME:-frozenlm-$ACCELERATOR_TYPE}
ZONE=${ZONE:-europe-west4-a}
PROJECT=${PROJECT:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-cc3m_paper}
JAX_SPEC=${JAX_SPEC:-jax[tpu]}
WORKER_PYTHON=${WORKER_PYTHON:-python3.11}
CREATE_FLAGS=${CREATE_FLAGS:-}
WORKDIR=${WORKDIR:-}
TFDS_DATA_DIR=${TFDS_DATA_DIR:-}

[[ -n $WORKDIR ]] || die "WORKDIR is not set: the run's output directory, shared by all workers.
  Example: WORKDIR=gs://my-bucket/frozen/run1 ./$PROG   (or --workdir=gs://my-bucket/frozen/run1)"
[[ -n $TFDS_DATA_DIR ]] || die "TFDS_DATA_DIR is not set: the tfds data directory every worker reads.
  Example: TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets ./$PROG   (or --tfds-data-dir=gs://my-bucket/tensorflow_datasets)"
[[ $WORKDIR == gs://* ]] || printf '%s: warning: WORKDIR=%s is not a gs:// bucket; every worker must see the same directory\n' "$PROG" "$WORKDIR" >&2

# Run from the repository root, whatever the caller's directory.
cd "$(dirname "${BASH_SOURCE[0]}")"
[[ -f ${CONFIG%%:*} || -f frozenlm_jax/configs/${CONFIG%%:*}.py ]] ||
  die "CONFIG=$CONFIG: no file ${CONFIG%%:*} in $(pwd) and no packaged config frozenlm_jax/configs/${CONFIG%%:*}.py"

# run ARGS...: print the command; run it unless --dry-run.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    quote_line "$@"
  else
    printf '+ %s\n' "$(quote_line "$@")" >&2
    "$@"
  fi
}

GFLAGS=(--zone="$ZONE")
[[ -z $PROJECT ]] || GFLAGS+=(--project="$PROJECT")

# 1. Create the pod.
if [[ $CREATE == 1 ]]; then
  read -r -a create_extra <<<"$CREATE_FLAGS"
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GFLAGS[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    ${create_extra[@]+"${create_extra[@]}"}
fi

# 2. Copy the code (git's tracked and untracked-but-not-ignored files) and set up the venv.
if [[ $SKIP_SETUP == 0 ]]; then
  TMPDIR_LOCAL=$(mktemp -d)
  trap 'rm -rf "$TMPDIR_LOCAL"' EXIT
  TARBALL=$TMPDIR_LOCAL/$REMOTE_TARBALL
  if [[ $DRY_RUN == 1 ]]; then
    printf '# local: tar -czf %s of git ls-files --cached --others --exclude-standard\n' "$(q "$TARBALL")"
  else
    git rev-parse --is-inside-work-tree >/dev/null 2>&1 || die "$(pwd) is not a git work tree; the code to copy is what git lists"
    list=$TMPDIR_LOCAL/files.txt
    : >"$list"
    while IFS= read -r -d '' f; do
      if [[ $f == *$'\n'* ]]; then
        die "file name with a newline: $f"
      elif [[ -e $f ]]; then
        printf '%s\n' "$f" >>"$list"
      fi
    done < <(git ls-files -z --cached --others --exclude-standard)
    printf '+ tar -czf %s -T %s  (%s files)\n' "$(q "$TARBALL")" "$(q "$list")" "$(wc -l <"$list" | tr -d ' ')" >&2
    tar -czf "$TARBALL" -T "$list"
  fi
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:$REMOTE_TARBALL" "${GFLAGS[@]}" --worker=all

  py=$(q "$WORKER_PYTHON")
  pip="$REMOTE_VENV/bin/pip"
  apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
  setup="set -euo pipefail; cd \"\$HOME\""
  setup+="; rm -rf $REMOTE_DIR.new; mkdir $REMOTE_DIR.new; tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR.new"
  setup+="; rm -rf $REMOTE_DIR; mv $REMOTE_DIR.new $REMOTE_DIR"
  setup+="; if [ ! -x $pip ]; then rm -rf $REMOTE_VENV"
  setup+="; if ! $py -m venv $REMOTE_VENV; then $apt update -q && $apt install -y -q $py $(q "$WORKER_PYTHON-venv")"
  setup+=" && rm -rf $REMOTE_VENV && $py -m venv $REMOTE_VENV; fi; fi"
  setup+="; $pip install -q --upgrade pip"
  setup+="; $pip install -q $(q "$JAX_SPEC") -e $(q "./${REMOTE_DIR}[train]")"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GFLAGS[@]}" --worker=all --command="$setup"
fi

# 3. Clear stale TPU holders, then train on all workers.
train="\"\$HOME/$REMOTE_VENV/bin/python\" -m frozenlm_jax.train $(q "--config=$CONFIG") $(q "--workdir=$WORKDIR")"
for a in ${EXTRA[@]+"${EXTRA[@]}"}; do
  train+=" $(q "$a")"
done
cmd="set -euo pipefail; cd \"\$HOME/$REMOTE_DIR\""
# shellcheck disable=SC2016  # expanded on the workers, not here
cmd+='; holders=$(sudo lsof -t -w /dev/accel* /dev/vfio/* 2>/dev/null | sort -u || true)'
# shellcheck disable=SC2016
cmd+='; if [ -n "$holders" ]; then echo "$(hostname): killing stale TPU holders: $holders" >&2; sudo kill -9 $holders || true; sleep 3; fi'
cmd+="; sudo rm -f /tmp/libtpu_lockfile"
cmd+="; export FROZENLM_DISTRIBUTED=1 TFDS_DATA_DIR=$(q "$TFDS_DATA_DIR")"
if [[ $DETACH == 1 ]]; then
  cmd+="; nohup $train >\"\$HOME/$REMOTE_LOG\" 2>&1 </dev/null & echo \"\$(hostname): trainer started, log in ~/$REMOTE_LOG\""
else
  cmd+="; exec $train"
fi
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GFLAGS[@]}" --worker=all --command="$cmd"
