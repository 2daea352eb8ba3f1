# Defaults shared by every launcher (sourced, not run). Each value can be overridden by exporting
# it before launching.
#   ROSA_JOIN_TIMEOUT  seconds a node waits for the others to join before giving up (missing node)
#   ROSA_DIST_TIMEOUT  seconds a collective may wait (a dead node is detected within this)
export ROSA_JOIN_TIMEOUT=${ROSA_JOIN_TIMEOUT:-300}
export ROSA_DIST_TIMEOUT=${ROSA_DIST_TIMEOUT:-1800}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}  # tear down on NCCL errors/timeouts
export TORCH_NCCL_BLOCKING_WAIT=${TORCH_NCCL_BLOCKING_WAIT:-0}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}  # NVLink SHARP off unless asked for: not every fabric has it
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
export PYTHONUNBUFFERED=1
export PYTHON=${PYTHON:-python3}  # the interpreter that has rosa_scale (e.g. a virtualenv's)
# SIGUSR1 asks rosa-train to checkpoint and stop. Launchers and torchrun's agent ignore it (the
# default would kill them); rosa-train installs its own handler in each training process.
trap '' USR1

# Number of GPUs on this node (0 on a CPU-only node), unless GPUS_PER_NODE is set.
rosa_gpus_per_node() {
  if [ -n "${GPUS_PER_NODE:-}" ]; then echo "$GPUS_PER_NODE"; return; fi
  "$PYTHON" - <<'PY' 2>/dev/null || echo 0
import torch
print(torch.cuda.device_count())
PY
}

# One closing line for a launcher's exit status; returns the status unchanged.
rosa_report_exit() {
  local who=$1 rc=$2 what=$3
  case "$rc" in
    0) ;;
    75) echo "$who: $what stopped on a signal after saving a checkpoint; relaunch with --resume auto" >&2 ;;
    *) echo "$who: error: $what exited with status $rc (a node that did not join within" \
            "ROSA_JOIN_TIMEOUT=${ROSA_JOIN_TIMEOUT}s, a node or process that died, a training error, or a stop" \
            "on a signal after a checkpoint: see above; --resume auto continues from the latest checkpoint)" >&2 ;;
  esac
  return "$rc"
}
