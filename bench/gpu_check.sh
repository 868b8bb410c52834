#!/usr/bin/env bash
# The GPU check: one command, about 5 minutes on one GPU (it stops starting steps after --budget seconds), that needs
# only the machine's own Python with torch, transformers, accelerate and peft, plus the carry folder.
#
#   python -m bench.gpu_carry                                   # once, with a registry: .gpucarry/ (19.0 MiB)
#   bash bench/gpu_check.sh --carry .gpucarry --out DIR         # on the bare GPU machine, from the repository root
#   bash bench/gpu_check.sh                                     # a GPU machine with `make install`'s environment
#   bash bench/gpu_check.sh --smoke --model-config DIR --out DIR [--carry DIR]   # CPU, ~2 min (tests/test_gpu_check.py)
#
# Options: --out DIR (default bench/results/gpu_check), --carry DIR (bench/gpu_carry.py's folder: its wheels are
# unpacked and put first on PYTHONPATH, its rows are the training data; without it ../shared/data/commonsense or a
# generated data set), --work DIR (runs, checkpoints, logs; default a new folder under $TMPDIR), --budget SECONDS
# (default 420, --smoke 1200; no step starts later, each is cut there), --model-config DIR (the config.json folder,
# default recipes/configs/models/llama3-8b).
# PYTHON picks the interpreter (default python3). <out> receives summary.md (each step's status, seconds and peak GPU
# memory, then the tables), summary.json and logs.tar.gz (every log and each run's small outputs); progress.tsv grows
# step by step, so an interrupted check still says how far it got. A failed step is recorded and the next one runs.
#  env        torch / CUDA / GPU, library versions (carried ones marked), flash_attn, bitsandbytes
#  overhead   (a) the LLaMA3-8B-slice overhead table in bf16 (bench/overhead.py, 4 layers, batch 4 x 1024)
#  cr8b-M     (b) LLaMA3-8B at full depth with random weights (model.init=random: its config.json and the tiny
#             tokenizer, no download), bf16, sdpa: recipes/llama3_cr.py with llama3_8b_cr_r8.yaml for 30 optimizer
#             steps of 8 rows (cutoff 256), one allocation step (20), checkpoints at 20 and 30, PEFT export, no
#             lm-eval; M = flexlora, lora. cr8b-M-resume: step 30's checkpoint removed, the same command resumes at 20
#  packing    (d) tests/test_packing.py's packed = padded test: sdpa fp32 on CPU, sdpa bf16 on CUDA, and flash-attn bf16
#             where flash_attn imports
#  fsdp2      (e) cr8b-flexlora under FSDP2 (accelerate_configs/fsdp2.yaml) in one process
#  nf4-M      (c) cr8b-M with model.quantization=nf4, and nf4-M-resume, where bitsandbytes imports (the carry holds
#             it, trimmed to its CPU and CUDA 13.0 libraries), else one row "skipped: bitsandbytes does not import"
# --smoke runs the same steps on the CPU with the config.json folder --model-config names (the test writes LLaMA3-8B's
# at 2 layers and width 64), fp32, 6 steps of 4 rows (allocation and checkpoint at 3), FSDP2 as two gloo processes
# (accelerate's CPU launcher has no one-process FSDP).
set -uo pipefail
CALLER=$PWD
cd "$(dirname "$0")/.."
REPO=$PWD

COMMAND="bash bench/gpu_check.sh $*"
PYTHON=${PYTHON:-python3}
OUT=bench/results/gpu_check
CARRY=
WORK=
BUDGET=
SMOKE=0
MODEL_CONFIG=recipes/configs/models/llama3-8b
usage_error() { echo "gpu_check.sh: $1" >&2; exit 2; }
show_help() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$REPO/bench/gpu_check.sh"; }
from_caller() { case "$1" in /*) echo "$1" ;; *) echo "$CALLER/$1" ;; esac; }  # paths given are the caller's
while [ $# -gt 0 ]; do
    case "$1" in
        --out|--carry|--work|--budget|--model-config) [ $# -ge 2 ] || usage_error "$1 needs a value" ;;&
        --out) OUT=$(from_caller "$2"); shift 2 ;;
        --carry) CARRY=$(from_caller "$2"); shift 2 ;;
        --work) WORK=$(from_caller "$2"); shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --model-config) MODEL_CONFIG=$(from_caller "$2"); shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        -h|--help) show_help; exit 0 ;;
        *) usage_error "unknown argument $1 (see --help)" ;;
    esac
done
[ -n "$BUDGET" ] || BUDGET=$([ "$SMOKE" = 1 ] && echo 1200 || echo 420)  # a loaded 2-core CPU is slow
[[ "$BUDGET" =~ ^[0-9]+$ ]] || usage_error "--budget must be a number of seconds, got $BUDGET"
[ -f "$MODEL_CONFIG/config.json" ] || usage_error "--model-config $MODEL_CONFIG holds no config.json"
if [ "$SMOKE" = 1 ] && [ "$MODEL_CONFIG" = recipes/configs/models/llama3-8b ]; then
    usage_error "--smoke needs --model-config (a small config.json folder: LLaMA3-8B's 16 GB do not train on a CPU)"
fi
if [ -n "$CARRY" ] && [ ! -d "$CARRY/data/commonsense" ]; then
    usage_error "--carry $CARRY has no data/commonsense folder (make it with python -m bench.gpu_carry)"
fi
if [ -e "$OUT/summary.md" ]; then
    usage_error "$OUT already holds a check (summary.md); choose another --out or remove it"
fi
if [ -z "$WORK" ]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/flexlora-gpu-check.XXXXXX")
fi
mkdir -p "$OUT" "$WORK/logs" "$WORK/runs" || exit 2
OUT=$(cd "$OUT" && pwd) WORK=$(cd "$WORK" && pwd)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, installed or not
STARTED=$SECONDS
: > "$WORK/steps.tsv"

if [ -n "$CARRY" ]; then  # pinned pure-Python wheels, first on the path so they win over the machine's copies
    mkdir -p "$WORK/site"
    for wheel in "$CARRY"/wheels/*.whl; do
        [ -e "$wheel" ] || continue
        "$PYTHON" -m zipfile -e "$wheel" "$WORK/site" || usage_error "cannot unpack $wheel"
    done
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
    DATA=$(cd "$CARRY/data/commonsense" && pwd)
elif [ -d ../shared/data/commonsense ]; then
    DATA=$(cd ../shared/data/commonsense && pwd)
else
    DATA=synthetic
fi

if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu
    OVERHEAD=(--smoke)
    SINGLE=(--config_file accelerate_configs/cpu.yaml)
    FSDP=(--config_file accelerate_configs/cpu_fsdp2.yaml --main_process_port 0)
    STEPS=6
    SIZE=(model.dtype=float32 data.max_samples=64 train.max_steps=6 train.batch_size=4 train.micro_batch_size=2
          train.warmup_steps=1 adapter.t_warmup=3 adapter.t_final=2 adapter.delta_t=3 checkpoint.every_n_steps=3)
    RUN_LIMIT=300
else
    DEVICE=cuda
    OVERHEAD=(--model llama3-8b-slice --device cuda --dtype bfloat16 --layers 4 --batch 4 --seq 1024 --rounds 5
              --warmup-rounds 1 --memory-reps 1 --micro-samples 4)
    SINGLE=(--config_file accelerate_configs/single_gpu.yaml)
    FSDP=(--config_file accelerate_configs/fsdp2.yaml --num_processes 1)
    STEPS=30
    SIZE=(model.dtype=bfloat16 data.max_samples=320 train.max_steps=30 train.batch_size=8 train.micro_batch_size=4
          train.warmup_steps=3 adapter.t_warmup=20 adapter.t_final=5 adapter.delta_t=20 checkpoint.every_n_steps=20)
    RUN_LIMIT=150
fi
# One allocation step: the window [t_warmup, T - t_final] holds one multiple of delta_t, right where a checkpoint is,
# so the resume restores moved ranks. Dropout off: the FSDP2 run and the single-process run draw no random masks.
RECIPE=(--config recipes/configs/llama3_8b_cr_r8.yaml model.init=random model.path="$MODEL_CONFIG"
        model.tokenizer=recipes/configs/models/tiny-tokenizer model.attn_implementation=sdpa data.path="$DATA"
        "${SIZE[@]}" train.log_every=1 checkpoint.keep_last=2 adapter.lora_dropout=0.0 eval.enabled=false
        logging.tensorboard=false)

ABORT=
record() {  # record NAME STATUS SECONDS PEAK_GPU_MIB
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$WORK/steps.tsv"
    cp "$WORK/steps.tsv" "$OUT/progress.tsv"
}

step() {  # step NAME LIMIT COMMAND...: run it within the budget, with its log and peak GPU memory; 0 if it passed
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - STARTED)))
    if [ -n "$ABORT" ]; then record "$name" "skipped: $ABORT" 0 -; return 1; fi
    if [ "$left" -lt 20 ]; then record "$name" "skipped: the ${BUDGET} s budget is spent" 0 -; return 1; fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "[gpu_check] $name (at most $limit s) ..." >&2
    local sampler=
    if [ "$DEVICE" = cuda ] && command -v nvidia-smi > /dev/null; then  # the device's memory, every process included
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$WORK/logs/$name.gpu_mib" 2>&1 &
        sampler=$!
    fi
    local begin=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1  # a hung step: its whole process group
    local code=$? seconds=$((SECONDS - begin)) peak=-
    if [ -n "$sampler" ]; then
        kill "$sampler" 2> /dev/null
        wait "$sampler" 2> /dev/null
        peak=$(grep -E '^[0-9]+$' "$WORK/logs/$name.gpu_mib" | sort -n | tail -1)
    fi
    local status=ok
    if [ "$code" = 124 ] || [ "$code" = 137 ]; then status="timed out after $limit s"
    elif [ "$code" != 0 ]; then status="failed (exit $code)"; fi
    record "$name" "$status" "$seconds" "${peak:--}"
    [ "$status" = ok ] || echo "[gpu_check] $name: $status; see logs/$name.log in logs.tar.gz" >&2
    [ "$status" = ok ]
}

train() {  # NAME ACCELERATE_ARGS... -- OVERRIDES...: one run; its command is kept for resume NAME
    local name=$1
    shift
    local accelerate=()
    while [ "$1" != -- ]; do accelerate+=("$1"); shift; done
    shift
    local run=$WORK/runs/$name
    local command=("$PYTHON" -m accelerate.commands.launch "${accelerate[@]}" recipes/llama3_cr.py "${RECIPE[@]}" "$@"
                   output_dir="$run")
    printf '%q ' "${command[@]}" > "$WORK/runs/$name.command"
    step "$name" "$RUN_LIMIT" "${command[@]}" || return 0
    mv "$run/metrics.json" "$run/metrics.first.json"  # the uninterrupted run's, to compare the resumed one with
    cp "$run/train_log.jsonl" "$run/train_log.first.jsonl"
}

resume() {  # NAME: the run NAME again, its last checkpoint removed: it resumes from the one before
    local name=$1 run=$WORK/runs/$1
    if [ ! -e "$run/metrics.first.json" ]; then record "$name-resume" "skipped: $name did not finish" 0 -; return; fi
    rm -r "$run/checkpoints/$(printf 'step_%08d' "$STEPS")"
    eval "step $name-resume $RUN_LIMIT $(cat "$WORK/runs/$name.command")"
}

SITE_ARGS=()
[ -z "$CARRY" ] || SITE_ARGS=(--site "$WORK/site")
step env 120 "$PYTHON" -m bench.gpu_check_report env "$WORK" --device "$DEVICE" "${SITE_ARGS[@]}" \
    || ABORT="the env step failed"
# The order puts what only a GPU can show first, so a short --budget still gets it: both full-depth dry runs, FSDP2,
# packed = padded in bf16, then the resumes and the 8B-slice table.
for method in flexlora lora; do
    train "cr8b-$method" "${SINGLE[@]}" -- method="$method"
done
step fsdp2 "$RUN_LIMIT" "$PYTHON" -m accelerate.commands.launch "${FSDP[@]}" recipes/llama3_cr.py "${RECIPE[@]}" \
    method=flexlora output_dir="$WORK/runs/fsdp2"
step packing 90 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_packing.py -k packed_matches_padded
for method in flexlora lora; do
    resume "cr8b-$method"
done
step overhead 120 "$PYTHON" -m bench.overhead "${OVERHEAD[@]}" --out "$WORK/overhead"
if [ -n "$ABORT" ]; then
    record nf4 "skipped: $ABORT" 0 -
elif "$PYTHON" -c "import json, sys; sys.exit(not json.load(open(sys.argv[1]))['bitsandbytes_usable'])" "$WORK/env.json"
then
    for method in flexlora lora; do
        train "nf4-$method" "${SINGLE[@]}" -- method="$method" model.quantization=nf4
    done
    for method in flexlora lora; do
        resume "nf4-$method"
    done
else
    record nf4 "skipped: bitsandbytes does not import" 0 -
fi

"$PYTHON" -m bench.gpu_check_report summary "$WORK" --out "$OUT" --seconds "$((SECONDS - STARTED))" \
    --budget "$BUDGET" --command "$COMMAND"
