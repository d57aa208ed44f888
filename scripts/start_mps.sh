# Source this before starting many small CUDA processes on one GPU: it starts the CUDA MPS daemon (the
# processes then share the GPU's compute at once instead of time-slicing it) and checks that a CUDA
# process can start under it; without MPS (no daemon binary, or the check fails) nothing changes.
#   . scripts/start_mps.sh        # prints "mps on" or "mps off: REASON"
if command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/mps-pipe} CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/mps-log}
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    nvidia-cuda-mps-control -d 2>/dev/null  # fails harmlessly when a daemon already runs
    sleep 1
    if timeout 60 python3 -c "import torch; torch.ones(1, device='cuda')" 2>/dev/null; then
        echo "mps on"
    else
        echo quit | nvidia-cuda-mps-control 2>/dev/null
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        echo "mps off: a CUDA process could not start under the daemon"
    fi
else
    echo "mps off: no nvidia-cuda-mps-control"
fi
