#!/usr/bin/env bash
# Run a kd_flax stage on one node with N GPUs (one JAX process drives all of them).
#
#   launch/gpu.sh --config configs/t5_enfr_seqkd.py:mesh=gpu_8 --workdir runs/enfr \
#       [--stage pipeline] [--gpus 8] [--install] [--venv .venv] [--mem-fraction 0.9] \
#       [--dry-run] [--config.distill.steps=2000 ...] [-- EXTRA ARGS FOR kd_flax.main]
#
# --install   create the venv (if absent) and pip install -e '.[cuda]' (jax with CUDA 12 wheels)
# --gpus N    use the first N GPUs (sets CUDA_VISIBLE_DEVICES); default: all visible
# Sets XLA_PYTHON_CLIENT_MEM_FRACTION (JAX preallocates this share of each GPU's memory;
# 0.9 leaves room for NCCL and the CUDA context) and turns on XLA's latency-hiding scheduler,
# which overlaps the FSDP all-gathers with compute. Pick the mesh preset in the config
# (gpu_1, gpu_8). For several nodes use launch/slurm.sbatch.
# --dry-run prints the environment and every command instead of running them.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAGE="pipeline" CONFIG="" WORKDIR="" GPUS="" INSTALL=0 VENV="$REPO/.venv" MEM_FRACTION="0.9" DRY_RUN=0
PASS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --stage) STAGE="${2:?--stage needs a value}"; shift 2 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --gpus) GPUS="${2:?--gpus needs a value}"; shift 2 ;;
    --venv) VENV="${2:?--venv needs a value}"; shift 2 ;;
    --mem-fraction) MEM_FRACTION="${2:?--mem-fraction needs a value}"; shift 2 ;;
    --stage=*|--workdir=*|--gpus=*|--venv=*|--mem-fraction=*)
      k="${1%%=*}"; v="${1#*=}"; set -- "$k" "$v" "${@:2}"; continue ;;
    --config=*) CONFIG="${1#*=}"; shift ;;
    --config.*) PASS+=("$1"); shift ;;
    --install) INSTALL=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; PASS+=("$@"); break ;;
    *) die "unknown option '$1'; see 'launch/gpu.sh --help' (overrides look like --config.key=value)" ;;
  esac
done

missing=()
[[ -n "$CONFIG" ]] || missing+=(--config)
[[ -n "$WORKDIR" ]] || missing+=(--workdir)
[[ ${#missing[@]} -eq 0 ]] || die "missing required flag(s): ${missing[*]}; e.g. launch/gpu.sh --config configs/demo_cpu.py:mesh=gpu_1 --workdir runs/demo"
case "$STAGE" in
  finetune|generate|distill|evaluate|export|pipeline) ;;
  *) die "--stage '$STAGE' is not allowed; allowed: finetune, generate, distill, evaluate, export, pipeline" ;;
esac
[[ -z "$GPUS" || "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus '$GPUS' must be a positive integer"
[[ "$MEM_FRACTION" =~ ^0?\.[0-9]+$|^1(\.0*)?$ ]] || die "--mem-fraction '$MEM_FRACTION' must be a number in (0, 1]"

quote() {
  local s="$1"
  if [[ "$s" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$s"
  else printf "'%s'" "${s//\'/\'\\\'\'}"; fi
}
show() { printf '+'; for a in "$@"; do printf ' '; quote "$a"; done; printf '\n'; }
run() {
  if [[ $DRY_RUN == 1 ]]; then show "$@"; else show "$@" >&2; "$@"; fi
}

if [[ $DRY_RUN == 0 ]]; then
  command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: no NVIDIA driver on this machine; install the driver, or run on CPU with 'python -m kd_flax.main' directly"
  visible="$(nvidia-smi --list-gpus 2>/dev/null | wc -l)"
  [[ "$visible" -gt 0 ]] || die "nvidia-smi lists no GPUs; check the driver ('nvidia-smi')"
  if [[ -n "$GPUS" && "$GPUS" -gt "$visible" ]]; then
    die "--gpus $GPUS but only $visible GPU(s) are visible"
  fi
fi

cd "$REPO"
if [[ $INSTALL == 1 ]]; then
  [[ -x "$VENV/bin/python" ]] || run python3 -m venv "$VENV"
  run "$VENV/bin/pip" install -q -e ".[cuda]"
fi
PY="$VENV/bin/python"
[[ $DRY_RUN == 1 || -x "$PY" ]] || die "no Python at $PY; pass --install (creates it) or --venv PATH"

ENV=("XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION"
     "XLA_FLAGS=${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
     "NCCL_DEBUG=${NCCL_DEBUG:-WARN}")
if [[ -n "$GPUS" ]]; then
  ENV+=("CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((GPUS - 1)))")
fi
run env "${ENV[@]}" "$PY" -m kd_flax.main "$STAGE" --config "$CONFIG" --workdir "$WORKDIR" "${PASS[@]+"${PASS[@]}"}"
