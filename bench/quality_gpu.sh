#!/usr/bin/env bash
# The quality benchmark's runs on one GPU machine without network, in one command.
#
#   python -m bench.quality_carry .gpu_quality       # here, once: MiniLM in fp16, the GLUE tsv files, peft (~48 MiB)
#   bash bench/quality_gpu.sh OUT STOP_MIN HARD_MIN  # there, from the repository root, with .gpu_quality beside it
#
# Side by side on the one GPU (MiniLM runs are launch-bound, so many share it; one CPU core each):
#   - `bench.quality --paper`, PAPER_JOBS (10) at a time: Table 8's schedule, every method and switch;
#   - `bench.quality --cpu`, CPU_JOBS (3) at a time: the --cpu profile's runs that no earlier session finished (each
#     result records the device it ran on);
#   - a control, 1 at a time: the --cpu profile's FlexLoRA default at seed 0 on each task again on the GPU, to hold
#     against the same runs made on the CPU (the rows above are compared with CPU runs); STS-B's seed 1, since its
#     seed 0 belongs to the lr sweep the others wait for.
# No run starts after STOP_MIN minutes; each process is killed at HARD_MIN. Every finished run's result file, the
# reports, the logs and a GPU utilisation trace are packed into OUT/quality_gpu.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: quality_gpu.sh OUT STOP_MIN HARD_MIN}
STOP=${2:?usage: quality_gpu.sh OUT STOP_MIN HARD_MIN}
HARD=${3:?usage: quality_gpu.sh OUT STOP_MIN HARD_MIN}
CARRY=${CARRY:-.gpu_quality}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/quality_site "$CARRY"/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/quality_site:$PWD
if ! "$PYTHON" -c "import transformers, peft" > "$OUT/imports.log" 2>&1; then  # its other dependencies too old there
    rm -rf /tmp/quality_site/transformers /tmp/quality_site/transformers-*
    "$PYTHON" -c "import transformers, peft" >> "$OUT/imports.log" 2>&1 || exit 1
fi
"$PYTHON" -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/imports.log"
LOCATIONS=(--data-dir "$CARRY/glue" --model-dir "$CARRY/minilm" --stop-after "$STOP")
# Without MPS the GPU time-slices between the runs' CUDA contexts: 14 runs at once, measured on one H200, moved at
# 0.11-0.29 s per optimizer step each (bench/results/quality_gpu_logs/). The MPS server lets their small kernels run
# side by side; USE_MPS=0 turns it off, and it is left off where it does not start or a CUDA tensor fails under it.
MPS=off
if [ "${USE_MPS:-1}" = 1 ] && command -v nvidia-cuda-mps-control > /dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d && timeout 60 "$PYTHON" -c "import torch; torch.ones(1, device='cuda').sum().item()"
    then MPS=on
    else echo quit | nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    fi
fi
echo "MPS $MPS" | tee -a "$OUT/imports.log"
nvidia-smi dmon -s u -d 10 > "$OUT/gpu_utilisation.txt" 2>&1 &
TRACE=$!
CONTROL=outputs/quality-gpu-control
mkdir -p "$CONTROL" && cp -r bench/results/quality_cpu_runs "$CONTROL/"
CONTROL_RUNS=(glue-stsb-flexlora-lr2x-s1 glue-cola-flexlora-lr2x-s0 glue-mrpc-flexlora-lr2x-s0)  # not the sweep's
for run in "${CONTROL_RUNS[@]}"; do rm -f "$CONTROL/quality_cpu_runs/$run.json"; done
timeout "${HARD}m" "$PYTHON" -m bench.quality --paper --jobs "${PAPER_JOBS:-10}" "${LOCATIONS[@]}" > "$OUT/paper.log" 2>&1 &
PIDS=($!)
timeout "${HARD}m" "$PYTHON" -m bench.quality --cpu --jobs "${CPU_JOBS:-3}" "${LOCATIONS[@]}" > "$OUT/cpu.log" 2>&1 &
PIDS+=($!)
timeout "${HARD}m" "$PYTHON" -m bench.quality --cpu --jobs 1 --out "$CONTROL" --work-dir "$CONTROL/work" \
    --only "${CONTROL_RUNS[@]}" "${LOCATIONS[@]}" > "$OUT/control.log" 2>&1 &
PIDS+=($!)
wait "${PIDS[@]}"
kill "$TRACE" 2>/dev/null
[ "$MPS" = on ] && echo quit | nvidia-cuda-mps-control
tar czf "$OUT/quality_gpu.tgz" --ignore-failed-read bench/results/quality_paper* bench/results/quality_cpu* \
    "$CONTROL"/quality_cpu_runs "$OUT"/*.log "$OUT/gpu_utilisation.txt"
grep -h "runs in all\|: ok in\|: diverged in\|: failed in" "$OUT"/*.log | tail -40
