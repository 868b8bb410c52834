#!/usr/bin/env bash
# Launch a FlexLoRA training script on all GPUs of this machine through `accelerate launch`.
#
#   launch/single_node.sh SCRIPT [SCRIPT ARGS...]
#   ENGINE=fsdp2 NUM_GPUS=4 launch/single_node.sh recipes/llama3_cr.py --config recipes/configs/llama3_8b_cr_r8.yaml
#
# ENGINE   name of a config in accelerate_configs/ without .yaml: fsdp2 (default), deepspeed_zero2,
#          deepspeed_zero3, ddp, single_gpu; on a CPU-only machine cpu_ddp / cpu_fsdp2 / cpu_zero2 / cpu_zero3.
#          zero2 and zero3 are accepted as short names.
# NUM_GPUS processes to start (default: every visible GPU; CUDA_VISIBLE_DEVICES selects which).
# MAIN_PROCESS_PORT  rendezvous port (default 0: accelerate picks a free one).
# The script must build its Accelerator with flexlora.accelerate_setup.build_accelerator(), which checks that
# the engine and process count that actually run are the ones asked for here.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 ]]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
ENGINE=${ENGINE:-fsdp2}
case "$ENGINE" in
  zero2 | zero3) ENGINE="deepspeed_$ENGINE" ;;
esac
CONFIG="accelerate_configs/$ENGINE.yaml"
if [[ ! -f "$CONFIG" ]]; then
  echo "unknown ENGINE=$ENGINE: no $CONFIG (choose from: $(cd accelerate_configs && ls *.yaml | sed 's/\.yaml//' | tr '\n' ' '))" >&2
  exit 2
fi
NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
if [[ "$NUM_GPUS" -lt 1 ]]; then
  echo "no GPU visible: set NUM_GPUS, or use ENGINE=cpu_ddp / cpu_fsdp2 with NUM_GPUS=<processes>" >&2
  exit 2
fi

exec accelerate launch --config_file "$CONFIG" --num_machines 1 --num_processes "$NUM_GPUS" \
  --main_process_port "${MAIN_PROCESS_PORT:-0}" "$@"
