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
#   ROSA_SAVE_TIMEOUT  seconds a stopped run may take to save its checkpoint before it is killed
export ROSA_SAVE_TIMEOUT=${ROSA_SAVE_TIMEOUT:-600}
# torchrun's agent (also inside accelerate launch) passes the signals it handles on to the training
# processes and SIGKILLs them 30 s later (TORCH_ELASTIC_SHUTDOWN_TIMEOUT from torch 2.12 on):
# too soon for a large model's save. So it handles only SIGQUIT (quit now); SIGTERM or SIGHUP end
# the agent itself, and its training processes, told so by Linux (rosa_scale/launcher_link.py),
# stop at their next step with a checkpoint. SIGINT and SIGUSR1 it ignores, as everything a
# launcher starts does (SIGINT in the background; SIGUSR1 would kill): the launcher passes them on.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGQUIT}
# An agent that fails (another node's agent, which held the rendezvous, is gone) SIGTERMs its
# training processes: they save first, given this long (torch >= 2.12).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$ROSA_SAVE_TIMEOUT
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
            "ROSA_JOIN_TIMEOUT=${ROSA_JOIN_TIMEOUT}s, a node or process that died, a training error, or a save" \
            "cut short: see above; --resume auto continues from the latest checkpoint)" >&2 ;;
  esac
  return "$rc"
}

# rosa_launch [--agent] WHO WHAT COMMAND...: run COMMAND (torchrun, accelerate launch or rosa-train
# itself) and pass stop signals on to the training processes. torchrun and accelerate start those
# in sessions of their own, out of reach of a signal to this launcher or its process group, so
# each one registers in a private ROSA_LAUNCH_DIR (rosa_scale/launcher_link.py). SIGTERM and
# SIGUSR1 are passed on as they are, SIGINT (a first Ctrl-C) and SIGHUP as SIGTERM, also to
# processes that register later; each finishes its step, saves a checkpoint and exits 75. A second
# Ctrl-C, or ROSA_SAVE_TIMEOUT seconds without an end, kills them (the previous checkpoint stays
# usable). COMMAND runs in a process group of its own (a Ctrl-C or a group signal reaches only this
# launcher) and ends if this launcher dies: SIGTERM for rosa-train, SIGKILL for an agent (--agent),
# whose training processes then stop on their own. Training processes that outlive COMMAND are
# stopped the same way and waited for. Exits 75 when the run stopped on a signal with its
# checkpoint saved (or before any training process started), else with COMMAND's status, after one
# closing line (rosa_report_exit).
rosa_launch() {
  local on_launcher_death=TERM
  if [ "$1" = --agent ]; then on_launcher_death=KILL; shift; fi
  _rosa_who=$1 _rosa_what=$2 _rosa_stop="" _rosa_told=" " _rosa_deadline=0 _rosa_killed=""
  shift 2
  ROSA_LAUNCH_DIR=$(mktemp -d "${TMPDIR:-/tmp}/rosa-launch.XXXXXX")
  export ROSA_LAUNCH_DIR
  trap 'rm -rf "$ROSA_LAUNCH_DIR"' EXIT
  trap '_rosa_ask SIGTERM TERM || true' TERM  # `|| true`: under `set -e` a failing trap ends the script
  trap '_rosa_ask SIGHUP TERM || true' HUP
  trap '_rosa_interrupt || true' INT
  # Started with SIGUSR1 ignored (above) and, in the background, SIGINT too.
  "$PYTHON" -c "$_ROSA_DETACH" "$$" "SIG$on_launcher_death" "$@" &
  _rosa_child=$!
  trap '_rosa_ask SIGUSR1 USR1 || true' USR1
  while kill -0 "$_rosa_child" 2>/dev/null; do
    if [ -z "$_rosa_stop" ]; then wait "$_rosa_child" || true; else _rosa_tick; fi  # a trap ends `wait` early
  done
  local rc=0
  wait "$_rosa_child" || rc=$?
  while _rosa_any_worker; do  # outlived COMMAND: its agent was killed
    [ -n "$_rosa_stop" ] || _rosa_ask "the launch command ended before its training processes" TERM
    _rosa_tick
  done
  if [ -n "$_rosa_killed" ]; then
    rc=$_rosa_killed
  elif [ "$rc" -ne 0 ] && { [ -e "$ROSA_LAUNCH_DIR/resumable" ] ||
                            { [ -n "$_rosa_stop" ] && [ ! -e "$ROSA_LAUNCH_DIR/started" ]; }; }; then
    rc=75
  fi
  rosa_report_exit "$_rosa_who" "$rc" "$_rosa_what"
}

_ROSA_DETACH='import ctypes, os, signal, sys
launcher, on_launcher_death, command = int(sys.argv[1]), getattr(signal, sys.argv[2]), sys.argv[3:]
if sys.platform.startswith("linux"):
    ctypes.CDLL(None).prctl(1, int(on_launcher_death), 0, 0, 0)  # PR_SET_PDEATHSIG, kept across exec
    if os.getppid() != launcher:
        sys.exit("rosa_launch: the launcher exited before its command started")
os.setpgid(0, 0)
os.execvp(command[0], command)'

_rosa_ask() {  # _rosa_ask WHAT SIGNAL: a stop was asked for; pass SIGNAL on
  if [ -z "$_rosa_stop" ]; then
    echo "$_rosa_who: $1: every training process saves a checkpoint at its next step and stops" \
         "(killed after ROSA_SAVE_TIMEOUT=${ROSA_SAVE_TIMEOUT}s; a second Ctrl-C kills at once)" >&2 || true
    _rosa_stop=$2
    _rosa_deadline=$(( SECONDS + ROSA_SAVE_TIMEOUT ))
  fi
  _rosa_tell
}

_rosa_interrupt() {
  if [ -z "$_rosa_stop" ]; then _rosa_ask "Ctrl-C" TERM; return; fi
  echo "$_rosa_who: Ctrl-C while stopping: killing the training processes" >&2 || true
  _rosa_kill 130
}

_rosa_tick() {  # while stopping: tell processes that registered since, enforce ROSA_SAVE_TIMEOUT
  _rosa_tell
  if [ -z "$_rosa_killed" ] && [ "$SECONDS" -ge "$_rosa_deadline" ]; then
    echo "$_rosa_who: no end within ROSA_SAVE_TIMEOUT=${ROSA_SAVE_TIMEOUT}s: killing the training processes" >&2 || true
    _rosa_kill 137
  fi
  sleep 0.2 || true
}

_rosa_tell() {  # send the stop signal to every registered training process not told yet
  local file pid
  for file in "$ROSA_LAUNCH_DIR"/worker-*; do
    pid=${file##*/worker-}
    case "$_rosa_told" in *" $pid "*) continue ;; esac
    _rosa_ours "$pid" || continue
    kill -s "$_rosa_stop" "$pid" 2>/dev/null || true
    _rosa_told+="$pid "
  done
  return 0
}

_rosa_kill() {  # _rosa_kill STATUS: SIGKILL the training processes and COMMAND; the launcher exits STATUS
  local file pid
  _rosa_killed=$1
  for file in "$ROSA_LAUNCH_DIR"/worker-*; do
    pid=${file##*/worker-}
    ! _rosa_ours "$pid" || kill -s KILL "$pid" 2>/dev/null || true
  done
  kill -s KILL -- "-$_rosa_child" 2>/dev/null || kill -s KILL "$_rosa_child" 2>/dev/null || true
  return 0
}

_rosa_any_worker() {
  local file
  for file in "$ROSA_LAUNCH_DIR"/worker-*; do
    ! _rosa_ours "${file##*/worker-}" || return 0
  done
  return 1
}

_rosa_ours() {  # is PID alive and a training process of this launch (not a reused PID)?
  local entry entries=()
  [[ $1 =~ ^[0-9]+$ ]] && kill -0 "$1" 2>/dev/null || return 1
  [ -d /proc/self ] || return 0  # no /proc: trust the PID
  mapfile -d '' entries 2>/dev/null < "/proc/$1/environ" || return 1
  for entry in "${entries[@]}"; do
    [ "$entry" != "ROSA_LAUNCH_DIR=$ROSA_LAUNCH_DIR" ] || return 0
  done
  return 1
}
