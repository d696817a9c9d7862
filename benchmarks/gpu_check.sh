#!/usr/bin/env bash
# The GPU checks, as one script for a borrowed GPU machine that has torch, transformers,
# accelerate and sentencepiece but nothing else, and no network.
#
#   bash benchmarks/gpu_check.sh prepare   # here (CPU machine): fills .gpu/ (gitignored) with
#                                          # wheels, small real corpora and tokenizers, < 50 MiB
#   bash benchmarks/gpu_check.sh run       # there, with .gpu carried: tests + benchmarks -> $OUT
#   bash benchmarks/gpu_check.sh recipes   # there: only the base recipes' loop (RECIPES="a/b c/d"
#                                          # picks some), for a session with little device time
#   bash benchmarks/gpu_check.sh switches  # there: the speed switches (flex, compile, activation
#                                          # checkpointing, chunked loss) off and on, text/base and
#                                          # llava/caption_base -> $OUT/gpu_check.jsonl (~7 min)
#   bash benchmarks/gpu_check.sh switches --dry-run   # here: the same on a CPU at debug sizes
#   bash benchmarks/gpu_check.sh fsdp      # there, on 2+ GPUs: text/base sharded over 2 GPUs
#                                          # (train.parallel=fsdp) against 1, per-GPU tokens/s
#
# xformers 0.0.35 (the newest) is built for torch 2.10+cu128: on the image's torch 2.11+cu130 it
# imports without kernels, and omni falls back to SDPA with a warning saying so (seen 2026-11-26).
# `run` installs the carried wheels (decord, encodec, xformers, soundfile), runs the CUDA tests
# (xformers vs SDPA included), omni's backbone against transformers' Llama in bf16, and every
# `*_base` recipe for a few steps at its real batch size (step time, tokens/s, peak memory) on
# small real corpora. The base recipes' "Measured on ..." comments come from its output.
# Budget: about 9 minutes of device time after the machine starts (2026-11-26 on an H200: the
# recipe loop needed more than the 320 s it had, so it now has 420 s and 20 steps per recipe).
set -uo pipefail
mode=${1:-run}
G=${GPU_DIR:-.gpu}

if [ "$mode" = switches ]; then
    # benchmarks/gpu_check.py: one JSON line per configuration, written as each ends; it keeps to
    # its own --budget (450 s), the timeout is a backstop. Extra arguments go to it.
    shift
    OUT=${OUT:-/tmp/gpu_out}
    PY=${PY:-python3}
    mkdir -p "$OUT"
    # text/base and llava/caption_base need none of the carried wheels: no install, no time spent
    export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    fi
    timeout ${SWITCHES_TIMEOUT:-500} $PY benchmarks/gpu_check.py --data $G --out "$OUT/gpu_check.jsonl" "$@"
    exit $?
fi

if [ "$mode" = prepare ]; then
    set -e
    PY=${PY:-python}
    mkdir -p $G/whl $G/data $G/tok $G/whisper-base
    plat="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64"
    $PY -m pip download -q --no-deps --only-binary=:all: $plat -d $G/whl decord==0.6.0 xformers==0.0.35 soundfile cffi pycparser
    $PY -m pip wheel -q --no-deps -w $G/whl encodec==0.1.1
    cp weights/whisper-base/config.json weights/whisper-base/preprocessor_config.json $G/whisper-base/
    cp -r runs/tokenizers/text_spm $G/tok/
    [ -d $G/tok/text_spm_32k ] || omni tokenizer train text_spm vocab_size=32000 out=$G/tok/text_spm_32k
    [ -d $G/data/video ] || omni data build video --out $G/data/video --max-docs 12
    $PY - <<'EOF'
# small slices of the real corpora; speech as FLAC to fit the carry limit
import json, shutil
from pathlib import Path
import soundfile as sf

def subset(src, dst, n, keys, flac=False):
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for split, k in (("train", n), ("val", max(8, n // 8))):
        rows = [json.loads(l) for l in (src / f"{split}.jsonl").read_text().splitlines()[:k]]
        for r in rows:
            for key in keys:
                out = dst / (r[key].rsplit(".", 1)[0] + ".flac" if flac else r[key])
                out.parent.mkdir(parents=True, exist_ok=True)
                if flac:
                    wave, sr = sf.read(src / r[key])
                    sf.write(out, wave, sr, format="FLAC")
                    r[key] = str(out.relative_to(dst))
                else:
                    shutil.copy(src / r[key], out)
        (dst / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

subset("data/speech", ".gpu/data/speech", 240, ["audio"], flac=True)
subset("data/images", ".gpu/data/images", 200, ["image"])
subset("data/sounds", ".gpu/data/sounds", 80, ["audio"])
subset("data/text", ".gpu/data/text", 1500, [])
EOF
    du -sh $G $G/*
    exit 0
fi

OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $G/whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, xformers, encodec, decord; print(torch.__version__, transformers.__version__, xformers.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/gpu.txt"
mkdir -p runs/tokenizers && cp -r $G/tok/* runs/tokenizers/
# random weights in Whisper-base's layout: step time and memory do not depend on the values
python3 -c "
from transformers import WhisperConfig, WhisperModel
WhisperModel(WhisperConfig.from_pretrained('$G/whisper-base')).save_pretrained('$G/whisper-base')"
python3 -c "
from omni.tokenizers.audio import AudioCodec
AudioCodec('small').save('runs/tokenizers/audio_codec_base')"

if [ "$mode" = fsdp ]; then
# FSDP2 over 2 GPUs at the single-GPU run's per-GPU batch: the goal is a per-GPU tokens/s >= 0.90x
# of one GPU's (docs/distributed.md). metrics.jsonl's tokens_per_s counts every process's tokens.
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
[ "$n" -ge 2 ] || { echo "fsdp: needs 2 GPUs, this machine has $n" | tee "$OUT/fsdp.txt"; exit 0; }
B=$(python3 -c "from omni.config import load_recipe; print(load_recipe('text/base').train.batch_size)")
common="data.path=.gpu/data/text tokenizer.path=$G/tok/text_spm_32k train.steps=${STEPS:-30} train.log_every=10
    train.eval_every=1000 train.eval_batches=1 train.save_every=1000 train.progress=false train.resume=false
    train.overwrite=true"
timeout 240 python3 -m omni.cli train text/base $common train.out_dir=$OUT/gpu1 2>&1 | tail -3
timeout 300 torchrun --standalone --nproc-per-node 2 -m omni.cli train text/base $common \
    train.batch_size=$((2 * B)) train.parallel=fsdp train.out_dir=$OUT/gpu2_fsdp 2>&1 | tail -3
python3 - "$OUT" <<'EOF' | tee "$OUT/fsdp.txt"
import json, sys
from omni.train.loop import read_metrics
def per_gpu(d, world):
    rows = [r for r in read_metrics(f"{sys.argv[1]}/{d}/metrics.jsonl") if "tokens_per_s" in r]
    return rows[-1]["tokens_per_s"] / world, rows[-1].get("max_mem_gib")
one, mem1 = per_gpu("gpu1", 1)
two, mem2 = per_gpu("gpu2_fsdp", 2)
print(json.dumps({"bench": "fsdp_2gpu", "recipe": "text/base", "tokens_per_s_per_gpu_1": one,
                  "tokens_per_s_per_gpu_fsdp2": two, "ratio": round(two / one, 3), "goal": 0.9,
                  "max_mem_gib_1": mem1, "max_mem_gib_fsdp2": mem2}))
EOF
exit 0
fi

if [ "$mode" = run ]; then
# 1. the test suite's CUDA tests and the model tests on the GPU machine
timeout 100 python3 -m pytest -q -x -m 'gpu or not gpu' tests/model/test_backbone.py tests/model/test_head.py 2>&1 | tail -15 | tee "$OUT/tests.txt"

# 2. backbone vs transformers' Llama, bf16, SDPA and xformers
for attn in sdpa xformers; do
    timeout 60 python3 benchmarks/backbone_vs_hf.py --device cuda --dtype bfloat16 --attn $attn --dim 1024 \
        --layers 12 --heads 16 --kv-heads 4 --ffn 2816 --vocab 32000 --batch 16 --seq 1024 --new-tokens 128 \
        --repeats 2 --warmup 1 --gen-batches 1,16 2>&1 | tail -6 | tee -a "$OUT/backbone.txt"
done

fi

# 3. every base recipe at its real batch size on small real corpora
S=.gpu/data
RECIPES=${RECIPES:-"text/base whisper/asr_base whisper/asr_pretrained_tower_base audiocaps/sounds_base
    llava/caption_base videollama/caption_base audiolm/continue_base"}
timeout ${RECIPE_TIMEOUT:-420} python3 benchmarks/recipe_steps.py --steps ${STEPS:-20} $RECIPES \
    --set "text/base:data.path=$S/text" --set "text/base:tokenizer.path=$G/tok/text_spm_32k" \
    --set "whisper/asr_base:data.path=$S/speech" --set "whisper/asr_base:tokenizer.path=$G/tok/text_spm" \
    --set "whisper/asr_pretrained_tower_base:data.path=$S/speech" \
    --set "whisper/asr_pretrained_tower_base:tokenizer.path=$G/tok/text_spm" \
    --set "whisper/asr_pretrained_tower_base:model.media.audio.encoder.path=$G/whisper-base" \
    --set "audiocaps/sounds_base:data.path=$S/sounds" \
    --set "audiocaps/sounds_base:model.media.audio.encoder.path=$G/whisper-base" \
    --set "llava/caption_base:data.path=$S/images" --set "videollama/caption_base:data.path=$S/video" \
    --set "audiolm/continue_base:data.path=$S/speech" --set "audiolm/continue_base:tokenizer.path=$G/tok/text_spm" \
    2>&1 | tee "$OUT/recipes_log.txt" | grep -E "^RESULT|^\{|s/step|^[a-z]+/" | tee "$OUT/recipes.txt"
