# Environment of every benchmark run on the lent GPU machines (sourced by bench/run_*.sh).
# NVLink multicast stays off on the shared hosts (KINDS.md); OMP threads per rank kept modest.
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1
# The GPUs this run got, for its log.
device_report() {
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv; fi
}
