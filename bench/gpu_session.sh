#!/usr/bin/env bash
# The checks that only a GPU can make, in one go, most needed first, each part under its own time limit so that a
# slow part leaves the others their time. Logs and JSON go to $OUT (default: a new temporary folder).
#
#   bash bench/gpu_session.sh                      # every part, each capped: 300 + 150 + 420 s at most
#   bash bench/gpu_session.sh round_trips packing  # some parts, in this order (a 10-minute call: two calls)
#   SMOKE=1 bash bench/gpu_session.sh              # on a CPU, at toy sizes: checks the script itself (~2 min)
#
# Parts:
#   round_trips  bench/gpu_round_trips.py: train, stop, resume from the strategy's own checkpoint, compare the loss
#                curves (single, FSDP sharded / full, DeepSpeed 2 where installed, in_backward, 8-bit AdamW states)
#   packing      bench/bench_llava_baseline.py --mixed: the plain LLaVA loop on LLaVA-like mixed lengths, padded
#                against packed rows on each packed-attention kernel (mask, varlen, flex)
#   steps        bench/bench_train.py on experiments/llava15/sft.yaml at CLIP-L/336 + a 1.1B Llama (TinyLlama's
#                shape, random weights), bf16-mixed, batch 16: the project's step as it is, then packed on the
#                varlen kernel, + compiled blocks and fused AdamW, + AdamW in backward, 8-bit states instead
#                (step time, tokens/s, peak GiB, MFU)
#
# Needs the tokenizer fixtures (python tests/fixtures/build_tokenizers.py data/generated/tokenizers: they are
# fetched, so build them where there is a network and carry data/generated/tokenizers) and the project's Python
# packages (omegaconf, and bitsandbytes for the 8-bit cases).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python}
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(round_trips packing steps)
echo "results: $OUT"

part() {  # part NAME SECONDS COMMAND...: its output to the console and $OUT/NAME.log, its exit status said
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

TOKENIZER=data/generated/tokenizers/vicuna
TINYLLAMA='{model_type: llama, hidden_size: 2048, intermediate_size: 5632, num_hidden_layers: 22, num_attention_heads: 32, num_key_value_heads: 4, vocab_size: 32000, max_position_embeddings: 2048, tie_word_embeddings: false}'
DATA="{root: $OUT/s336, image_size: 336, num_train: 2000, num_val: 16}"
ROUND_TRIPS=(single fsdp_sharded fsdp_full deepspeed_2 in_backward adamw_8bit --steps 10)
BASELINE=()
RUN=(trainer.precision=bf16-mixed data.num_workers=8)
TIMED=(--steps 20 --warmup 5)
if [ -n "${SMOKE:-}" ]; then  # toy sizes on a CPU
    TINYLLAMA='{model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, vocab_size: 32000, tie_word_embeddings: false}'
    DATA="{root: $OUT/s112, image_size: 112, num_train: 64, num_val: 16}"
    ROUND_TRIPS=(single in_backward adamw_8bit --steps 2 --accelerator cpu --precision 32-true)  # FSDP needs CUDA
    BASELINE=(--device cpu --batch 4 --steps 1 --warmup 1 --max-length 1024 --modes plain,mask
        --llm '{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 32002}'
        --vision '{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 112, "patch_size": 14}')
    RUN=(trainer.accelerator=cpu trainer.precision=32-true data.num_workers=0 data.max_length=512
        'model.encoder={name: clip, config: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 3, num_attention_heads: 4, image_size: 112, patch_size: 14}}')
    TIMED=(--steps 2 --warmup 1)
fi
STEPS=(
    experiments/llava15/sft.yaml model.encoder.checkpoint=null model.llm.path=null "model.llm.config=$TINYLLAMA"
    model.llm.grad_checkpointing=false model.tokenizer=$TOKENIZER data.train_json=null data.image_folder=null
    "data.builtin=$DATA" data.batch_size=16 trainer.devices=1 trainer.strategy=null "${RUN[@]}"
)
PACKED="data.packing=true model.llm.packed_attention=varlen"
NO_CLIP="trainer.gradient_clip_val=null"
[ -n "${SMOKE:-}" ] && PACKED="data.packing=true"

for p in "${PARTS[@]}"; do
    case $p in
        round_trips)
            part round_trips 300 "$PY" bench/gpu_round_trips.py "${ROUND_TRIPS[@]}" --work "$OUT/round_trips" \
                --out "$OUT/round_trips.json" ;;
        packing)
            part packing 150 "$PY" bench/bench_llava_baseline.py --mixed "${BASELINE[@]}" ;;
        steps)
            part steps 420 "$PY" bench/bench_train.py "${STEPS[@]}" "${TIMED[@]}" --compare "" "$PACKED" \
                "$PACKED model.compile=true optim.fused=true" \
                "$PACKED model.compile=true optim.fused=true optim.in_backward=true $NO_CLIP" \
                "$PACKED model.compile=true optim.states=8bit optim.in_backward=true $NO_CLIP" ;;
        *)
            echo "unknown part $p: choose from round_trips packing steps" >&2
            exit 2 ;;
    esac
done
