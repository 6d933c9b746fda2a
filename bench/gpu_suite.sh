#!/usr/bin/env bash
# The GPU benchmark suite: ONE call on a lent H100/H200 (about 7.5 minutes), everything logged under $OUT.
#
#   bash bench/gpu_suite.sh            # from the repository root; writes $OUT/gpu_suite.log + one JSON per run
#
# Needs only torch + transformers + peft (the GPU image's stack; no ray/mlflow/polars/pydantic/deepspeed).
# Runs are ordered by importance and share a wall-clock budget (SUITE_BUDGET_S, default 450 s): a run that
# would not fit is skipped and says so, and every run has its own timeout, so the log always comes back.
# What each run measures (see docs/performance.md, "GPU suite", for how to read and record the numbers):
#   0 workers-gpu  results across worker counts (bench/world_size.py, docs/cluster.md): the tiny model's stage
#                nodes and GA / NPO / WGA leaves (configs/ablations/workers_tiny.yaml) on 1 GPU and on every GPU
#                of the node (NCCL), printing the largest difference of any loss or eval metric; ZeRO-2 fp32 when
#                deepspeed is importable, else plain torch. Needs pydantic (reteq.config), which comes with
#                deepspeed's carried wheels. On a 1-GPU machine it compares two 1-GPU runs (repeatability only).
#   1 env        GPU, driver, versions, whether flash-attn is importable
#   2 pack-1b    Llama-3.2-1B LoRA r64, finetune steps: fp32 (TF32 off, the paper's setting) and tf32,
#                padded vs packed; global batch 64, chat lengths log-normal median 256 in [64, 1024]
#   3 pack-1b-bf16  same in bf16 autocast, finetune + NPO unlearn, padded vs unsorted vs packed
#   4 score-1b   forget score workload (64 questions x 20 targets + 64 TOFU-like pairs): padded vs shared
#                prefix, fp32 and bf16, with the max |difference| of the scores
#   5 gen-1b     math generation, 64 questions x 5 samples x 128 new tokens, bf16: dynamic vs static cache,
#                batch 64 vs 320
#   6 pack-1b-frozen  bf16 with the LoRA base's Linear weights stored in bf16 (same numbers, less traffic)
#   7 pack-q1.5b / pack-8b / pack-14b   the other paper shapes, bf16, padded vs packed (8B/14B: frozen bf16)
#   8 gen-1b-compile  static cache + torch.compile (compile time is excluded from the rate, but not the budget)
#   9 ds-*       reteq's DeepSpeed engine path (DeepSpeedEngine, the shared loop, its collectives on the GPU's
#                device), whenever deepspeed is importable (carry it: ../shared/STACK.md): ZeRO-2 bf16 vs plain
#                (1B LoRA r64), ZeRO-3 fp32 weights + bf16 autocast (1B LoRA r64 finetune + unlearn; 8B LoRA r8)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/reteq-gpu-suite}
mkdir -p "$OUT"
LOG="$OUT/gpu_suite.log"
PY=${PYTHON:-python3}
BUDGET=${SUITE_BUDGET_S:-450}
START=$(date +%s)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

elapsed() { echo $(( $(date +%s) - START )); }

# run NAME LIMIT_S SCRIPT ARGS...: one benchmark process under min(LIMIT_S, budget left)
run() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - $(elapsed) ))
  if [ "$left" -lt 25 ]; then
    echo "=== SKIP $name: $(elapsed)s used of the ${BUDGET}s budget" >> "$LOG"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s, at $(elapsed)s): $*" >> "$LOG"
  timeout -k 10 "$limit" "$PY" "$@" --json "$OUT/$name.json" 2>&1 | grep -v '^JSON ' >> "$LOG"
  echo "=== $name rc=${PIPESTATUS[0]} (124 = timed out) at $(elapsed)s" >> "$LOG"
}

{
  echo "reteq GPU suite, $(date -u '+%Y-%m-%d %H:%M UTC'), budget ${BUDGET}s"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  "$PY" - <<'EOF' 2>&1
import importlib, torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__)
for m in ("peft", "flash_attn", "deepspeed", "pydantic", "ray"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "not importable:", type(e).__name__)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
EOF
} > "$LOG"

# SUITE_SMOKE=1: the same runs on the tiny shape with toy sizes (checks the script end to end on a CPU)
if [ "${SUITE_SMOKE:-0}" = "1" ]; then
  M1=tiny; MQ=tiny; M8=tiny; M14=tiny; X=(--lora-rank 4); LENS=(--median 48 --sigma 0.5 --lo 16 --hi 128)
  GB=16; MB=4; GB8=8; MB8=2; Q=(--questions 8 --knowledge 8); G=(--questions 8 --new-tokens 8); B1=8; B2=40
  X+=(--threads 1)
else
  M1=llama-3.2-1b; MQ=qwen2.5-1.5b; M8=llama-3.1-8b; M14=qwen2.5-14b; X=(); LENS=(--median 256 --sigma 0.7 --lo 64
  --hi 1024); GB=64; MB=8; GB8=32; MB8=4; Q=(--questions 64 --knowledge 64); G=(--questions 64 --new-tokens 128)
  B1=64; B2=320
fi

# a correctness check first (about a minute): the same numbers on 1 GPU and on all of them
if "$PY" -c "import pydantic, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  if "$PY" -c "import deepspeed" 2>/dev/null; then WDS=configs/deepspeed/zero2_fp32.json; else WDS=none; fi
  run workers-gpu 120 bench/world_size.py configs/ablations/workers_tiny.yaml --gpu --workers 1,all \
    --deepspeed $WDS --work /tmp/reteq-workers-gpu
else
  echo "=== SKIP workers-gpu: needs a GPU and pydantic (carried with deepspeed: ../shared/STACK.md)" >> "$LOG"
fi
run pack-1b 120 bench/packing_throughput.py --shape $M1 --precisions fp32,tf32 --modes padded,packed \
  --phases finetune --global-batch $GB --micro-batch $MB --steps 2 --warmup-steps 1 "${LENS[@]}" "${X[@]}"
run pack-1b-bf16 90 bench/packing_throughput.py --shape $M1 --precisions bf16 --modes padded,unsorted,packed \
  --phases finetune,unlearn --global-batch $GB --micro-batch $MB --steps 3 --warmup-steps 1 "${LENS[@]}" "${X[@]}"
run score-1b 90 bench/scoring_throughput.py --shape $M1 --precisions fp32,bf16 --methods padded,shared "${Q[@]}" \
  --batch-size 32 --repeats 2 "${X[@]}"
run gen-1b 90 bench/generation_throughput.py --shape $M1 --precision bf16 --samples 5 "${G[@]}" \
  --configs dynamic:$B1,static:$B1,dynamic:$B2,static:$B2 "${X[@]}"
run pack-1b-frozen 60 bench/packing_throughput.py --shape $M1 --precisions bf16 --frozen-bf16 --modes packed \
  --phases finetune --global-batch $GB --micro-batch $MB --steps 3 "${LENS[@]}" "${X[@]}"
run pack-q1.5b 60 bench/packing_throughput.py --shape $MQ --precisions bf16 --modes padded,packed \
  --phases finetune --global-batch $GB --micro-batch $MB --steps 2 "${LENS[@]}" "${X[@]}"
run pack-8b 75 bench/packing_throughput.py --shape $M8 --precisions bf16 --frozen-bf16 --modes padded,packed \
  --phases finetune --global-batch $GB8 --micro-batch $MB8 --steps 2 "${LENS[@]}" "${X[@]}"
run pack-14b 90 bench/packing_throughput.py --shape $M14 --precisions bf16 --frozen-bf16 --modes padded,packed \
  --phases finetune --global-batch $(( GB8 / 2 )) --micro-batch $(( MB8 / 2 )) --steps 2 "${LENS[@]}" "${X[@]}"
run gen-1b-compile 120 bench/generation_throughput.py --shape $M1 --precision bf16 --samples 5 "${G[@]}" \
  --configs static+compile:$B2 "${X[@]}"
if "$PY" -c "import deepspeed" 2>/dev/null; then
  run ds-1b 120 bench/packing_throughput.py --shape $M1 --precisions bf16 --engines plain,deepspeed \
    --deepspeed-config configs/deepspeed/zero2_bf16.json --modes packed --phases finetune --global-batch $GB \
    --micro-batch $MB --steps 2 "${LENS[@]}" "${X[@]}"
  run ds-1b-zero3 120 bench/packing_throughput.py --shape $M1 --precisions bf16 --engines deepspeed \
    --deepspeed-config configs/deepspeed/zero3_fp32.json --modes packed --phases finetune,unlearn \
    --global-batch $GB --micro-batch $MB --steps 2 "${LENS[@]}" "${X[@]}"
  run ds-8b-zero3 120 bench/packing_throughput.py --shape $M8 --precisions bf16 --engines deepspeed \
    --deepspeed-config configs/deepspeed/zero3_fp32.json --modes packed --phases finetune --global-batch $GB8 \
    --micro-batch $MB8 --steps 2 "${LENS[@]}" "${X[@]}"
else
  echo "=== SKIP ds-1b, ds-1b-zero3, ds-8b-zero3: deepspeed is not importable (carry it: ../shared/STACK.md)" >> "$LOG"
fi
echo "=== suite done at $(elapsed)s" >> "$LOG"
cat "$LOG"
