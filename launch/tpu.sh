#!/usr/bin/env bash
# Run a kd_flax stage on a Cloud TPU VM (single host or pod slice).
#
#   launch/tpu.sh --name kd-v4 --zone us-central2-b --accelerator v4-8 \
#       --config configs/t5_enfr_seqkd.py --workdir gs://BUCKET/runs/enfr [--stage pipeline] \
#       [--project P] [--version RUNTIME] [--queued] [--spot] [--detach] [--dry-run] \
#       [--config.distill.steps=2000 ...] [-- EXTRA ARGS FOR kd_flax.main]
#
# Steps: (1) reuse the TPU VM NAME if `describe` finds it, else create it — directly
# (`tpu-vm create`) or through a queued resource (`--queued`, waits until ACTIVE);
# (2) copy the repository's files (git ls-files: no .venv, no runs) to ~/kd_flax on every
# worker; (3) install kd_flax[tpu] into ~/kd_flax_venv on every worker (Python >= 3.11,
# apt-installed if the image has an older one); (4) run
# `python -m kd_flax.main STAGE --config ... --workdir ...` on every worker at once
# (`--worker=all`: one JAX process per host; jax.distributed finds the pod on its own).
# The workdir should be gs:// so that every host sees the same files.
# --dry-run prints every command (shell-quoted, one per line, prefixed "+ ") instead of running it.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
}

NAME="" ZONE="" ACCEL="" VERSION="" PROJECT="" STAGE="pipeline" CONFIG="" WORKDIR=""
QUEUED=0 SPOT=0 DRY_RUN=0 DETACH=0
PASS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --accelerator|--accelerator-type) ACCEL="${2:?--accelerator needs a value}"; shift 2 ;;
    --version|--runtime-version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --stage) STAGE="${2:?--stage needs a value}"; shift 2 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --name=*|--zone=*|--accelerator=*|--version=*|--project=*|--stage=*|--workdir=*)
      k="${1%%=*}"; v="${1#*=}"; set -- "$k" "$v" "${@:2}"; continue ;;
    --config=*) CONFIG="${1#*=}"; shift ;;
    --config.*) PASS+=("$1"); shift ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --detach) DETACH=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; PASS+=("$@"); break ;;
    *) die "unknown option '$1'; see 'launch/tpu.sh --help' (overrides look like --config.key=value)" ;;
  esac
done

missing=()
[[ -n "$NAME" ]] || missing+=(--name)
[[ -n "$ZONE" ]] || missing+=(--zone)
[[ -n "$CONFIG" ]] || missing+=(--config)
[[ -n "$WORKDIR" ]] || missing+=(--workdir)
if [[ ${#missing[@]} -gt 0 ]]; then
  die "missing required flag(s): ${missing[*]}; e.g. launch/tpu.sh --name kd-tpu --zone us-central2-b --accelerator v4-8 --config configs/demo_cpu.py --workdir gs://BUCKET/run"
fi
case "$STAGE" in
  finetune|generate|distill|evaluate|export|pipeline) ;;
  *) die "--stage '$STAGE' is not allowed; allowed: finetune, generate, distill, evaluate, export, pipeline" ;;
esac
[[ "$WORKDIR" == gs://* ]] || echo "warning: --workdir '$WORKDIR' is not gs://; on a multi-host slice every worker needs the same files" >&2

# Default TPU runtime per generation (the images Google lists for TPU VMs).
default_version() {
  case "$1" in
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "" ;;
  esac
}

quote() {  # shell-quote for display: bare when safe, else in single quotes
  local s="$1"
  if [[ "$s" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$s"
  else printf "'%s'" "${s//\'/\'\\\'\'}"; fi
}

show() { printf '+'; for a in "$@"; do printf ' '; quote "$a"; done; printf '\n'; }

run() {  # --dry-run: print the command to stdout; else echo it to stderr and run it
  if [[ $DRY_RUN == 1 ]]; then
    show "$@"
  else
    show "$@" >&2
    "$@"
  fi
}

LOC=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project "$PROJECT")

# --- checks: gcloud present and logged in (skipped for --dry-run, which runs nothing) ---
if [[ $DRY_RUN == 0 ]]; then
  command -v gcloud >/dev/null 2>&1 || die "gcloud not found on PATH; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login'"
  account="$(gcloud auth list --filter=status:ACTIVE --format="value(account)" 2>/dev/null || true)"
  [[ -n "$account" ]] || die "gcloud is not authenticated (no active account); run 'gcloud auth login' (or 'gcloud auth activate-service-account --key-file=KEY.json')"
fi

# --- (1) create or reuse ---
exists=0
if [[ $DRY_RUN == 0 ]]; then
  if gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}" --format="value(state)" >/dev/null 2>&1; then
    exists=1
    echo "reusing TPU VM '$NAME' in $ZONE" >&2
  fi
else
  echo "# reuse if this succeeds:"
  run gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}" --format="value(state)"
  echo "# otherwise create:"
fi
if [[ $exists == 0 ]]; then
  [[ -n "$ACCEL" ]] || die "TPU VM '$NAME' does not exist and --accelerator is missing (e.g. --accelerator v4-8, v5litepod-16, v5p-64)"
  [[ -n "$VERSION" ]] || VERSION="$(default_version "$ACCEL")"
  [[ -n "$VERSION" ]] || die "no default runtime for --accelerator '$ACCEL'; pass --version (e.g. tpu-ubuntu2204-base)"
  if [[ $QUEUED == 1 ]]; then
    args=(gcloud compute tpus queued-resources create "$NAME" --node-id "$NAME" "${LOC[@]}"
          --accelerator-type "$ACCEL" --runtime-version "$VERSION")
    [[ $SPOT == 1 ]] && args+=(--spot)
    run "${args[@]}"
    # A queued resource is granted when capacity frees up: wait until it is ACTIVE.
    if [[ $DRY_RUN == 0 ]]; then
      while :; do
        state="$(gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" --format="value(state.state)" 2>/dev/null || true)"
        case "$state" in
          ACTIVE) break ;;
          FAILED|SUSPENDED) die "queued resource '$NAME' is $state; see 'gcloud compute tpus queued-resources describe $NAME --zone $ZONE'" ;;
        esac
        echo "queued resource '$NAME': ${state:-unknown}; waiting..." >&2
        sleep "${KD_FLAX_POLL_SECONDS:-30}"
      done
    else
      echo "# then wait until this prints ACTIVE:"
      run gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" --format="value(state.state)"
    fi
  else
    args=(gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}" --accelerator-type "$ACCEL" --version "$VERSION")
    [[ $SPOT == 1 ]] && args+=(--spot)
    run "${args[@]}"
  fi
fi

# --- (2) copy the code: tracked + untracked-but-not-ignored files only ---
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAGING="$(mktemp -d "${TMPDIR:-/tmp}/kd_flax_launch.XXXXXX")"
trap 'rm -rf "$STAGING"' EXIT
mkdir -p "$STAGING/kd_flax"
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
  (cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$STAGING/kd_flax"
else
  (cd "$REPO" && tar --exclude=.venv --exclude=runs --exclude='*.egg-info' -cf - .) | tar -xf - -C "$STAGING/kd_flax"
fi
run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker=all --command "rm -rf ~/kd_flax"
run gcloud compute tpus tpu-vm scp --recurse "$STAGING/kd_flax" "$NAME:~/" "${LOC[@]}" --worker=all

# --- (3) install kd_flax[tpu] on every worker (Python >= 3.11 in ~/kd_flax_venv) ---
SETUP='set -e; cd ~/kd_flax; PY=""; for p in python3.13 python3.12 python3.11 python3; do if command -v $p >/dev/null && $p -c "import sys; sys.exit(sys.version_info < (3, 11))"; then PY=$p; break; fi; done; if [ -z "$PY" ]; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv; PY=python3.11; fi; [ -x ~/kd_flax_venv/bin/python ] || $PY -m venv ~/kd_flax_venv; ~/kd_flax_venv/bin/pip install -q -U pip; ~/kd_flax_venv/bin/pip install -q -e ".[tpu]"'
run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker=all --command "$SETUP"

# --- (4) run the stage on every worker ---
CMD="cd ~/kd_flax && ~/kd_flax_venv/bin/python -m kd_flax.main $(printf '%q' "$STAGE") --config $(printf '%q' "$CONFIG") --workdir $(printf '%q' "$WORKDIR")"
for a in "${PASS[@]+"${PASS[@]}"}"; do CMD+=" $(printf '%q' "$a")"; done
if [[ $DETACH == 1 ]]; then
  # Survives the ssh session; follow with: gcloud compute tpus tpu-vm ssh NAME --worker=0 --command "tail -f ~/kd_flax_STAGE.log"
  CMD="nohup bash -c $(printf '%q' "$CMD") > ~/kd_flax_$STAGE.log 2>&1 < /dev/null &"
fi
run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker=all --command "$CMD"

if [[ $QUEUED == 1 ]]; then
  echo "# when done: gcloud compute tpus queued-resources delete $NAME --zone $ZONE --force" >&2
else
  echo "# when done: gcloud compute tpus tpu-vm delete $NAME --zone $ZONE" >&2
fi
