#!/usr/bin/env bash
# Every GPU measurement of issue #24 (fast frozen encoders), of issue #21 points 2 and 3 (the
# sampling strategies against the passes they are built from, stage 3's b/a on a GPU) and of
# sam.decoder_batch's GPU default (one mask-decoder call of all prompt sets), in one go, sized for
# one 10-minute device call (estimated 7-10 minutes on one H200, not yet run there; each entry has
# its own time limit), then the optional int8 encoder weights (sam.encoder_int8) and the encoder
# batch size that maximises throughput in three more entries (about 4-5 minutes more). CHECKS picks
# entries, to split the run over two device calls.
#
#   bash benchmarks/gpu_checks.sh --prepare   # here, once: the wheels the GPU image lacks -> .whl/
#   bash benchmarks/gpu_checks.sh             # on the GPU machine, with .whl carried along
#   CHECKS="evaluate decoder_batch" bash benchmarks/gpu_checks.sh   # some entries only
#   CHECKS="sam_v1_int8 sam2_int8 batch_sweep" bash benchmarks/gpu_checks.sh   # the second call
#   PYTHON=.venv/bin/python bash benchmarks/gpu_checks.sh --smoke   # any CPU: same entries, tiny settings
#
# For sam/vit_h and sam2/hiera_l (random weights saved to a file and loaded through the real
# loader, bf16 autocast), benchmarks/bench_precompute.py measures the reference and the fast encoder
# path in one process: encoder img/s, FLOP per image, model FLOP utilisation against the GPU's dense
# bf16 peak, compile time, stage 3's (b) img/s and b/a, and the agreement of the two paths' cached
# logits (max |logit difference|, IoU of the thresholded masks; goal >= 0.99). Each model's log and
# JSON go to $OUT (default runs/gpu_checks), with env.txt (GPU, driver, versions). Then the stage-3
# writer process against the thread, mask-decoder calls of all prompt sets against a few, and
# benchmarks/bench_evaluate.py on sam/vit_b: prompt perturbation (K = 10) against one decoder
# call, the Laplace in Monte-Carlo (S = 32) against one head forward, TTA against its encoder passes.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-gpu}
OUT=${OUT:-runs/gpu_checks}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
CHECKS=${CHECKS:-"sam_v1 sam2 cache_writer decoder_batch evaluate sam_v1_int8 sam2_int8 batch_sweep"}
WHEELS="segment-anything==1.0 hydra-core==1.3.8 omegaconf==2.3.1 iopath==0.1.10 antlr4-python3-runtime==4.9.3 sam2==1.1.0"

case "$MODE" in
  --prepare)
    # Pure-Python wheels only (sam2 without its optional CUDA extension, as requirements.txt installs it).
    mkdir -p .whl
    for spec in $WHEELS; do
      SAM2_BUILD_CUDA=0 "$PY" -m pip wheel --no-deps --no-build-isolation -q -w .whl "$spec" || exit 1
    done
    ls -l .whl
    exit 0 ;;
  --smoke)
    DEVICE=cpu
    SAM_V1=(--family sam --model-type demo_tiny)
    SAM_2=(--family sam2 --model-type hiera_t)
    SIZES=(--images 2 --promptsets 2 --batch-size 2 --workers 0 --height 96 --width 128 --verify 1
           --compile-encoder false)
    DECODER=(--promptsets 4 --sizes 2 --repeats 1)
    EVALUATE=(--family sam --model-type demo_tiny --height 96 --width 128 --tta hflip --repeats 1)
    SWEEP=(--batch-sweep 1,2)
    LIMIT_V1=900; LIMIT_2=900 ;;
  gpu)
    DEVICE=cuda
    SAM_V1=(--family sam --model-type vit_h)
    SAM_2=(--family sam2 --model-type hiera_l)
    SIZES=(--images 128 --promptsets 10 --batch-size 8 --workers 8)
    DECODER=(--promptsets 4 10 40 --sizes 4 10)
    EVALUATE=(--family sam --model-type vit_b --threads 8 --repeats 5 --encoder-impl fast --compile-encoder false)
    SWEEP=(--images 64 --batch-sweep 1,2,4,8,16,32)
    LIMIT_V1=280; LIMIT_2=250 ;;
  *)
    echo "usage: $0 [--prepare | --smoke]" >&2
    exit 2 ;;
esac

mkdir -p "$OUT"
if ! "$PY" -c "import segment_anything, sam2" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "segment_anything / sam2 missing and no .whl/ folder: run '$0 --prepare' where pip works, carry .whl" >&2
    exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u
  git log --oneline -1 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
wanted() { [[ " $CHECKS " == *" $1 "* ]]; }
bench() {  # name, time limit (s), script and its arguments; log to $OUT/<name>.log
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0
  echo "=== $name (limit ${limit} s)"
  timeout -k 10 "$limit" "$PY" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name failed or timed out (exit $rc)"; status=1; }
}
measure() {  # name, time limit (s), encoder paths, model arguments...: stage 3 with each path
  local name=$1 limit=$2 paths=$3
  shift 3
  bench "$name" "$limit" benchmarks/bench_precompute.py "$@" --device "$DEVICE" "${SIZES[@]}" --no-naive \
    --encoder-impl "$paths" --json "$OUT/$name.json"
}

measure sam_v1 "$LIMIT_V1" reference,fast "${SAM_V1[@]}"
measure sam2 "$LIMIT_2" reference,fast "${SAM_2[@]}"
# Stage 3's writer process against the writer thread on this host's cores and disk (CPU only, ~20 s).
bench cache_writer 120 benchmarks/bench_cache_writer.py
# sam.decoder_batch: one mask-decoder call of all prompt sets (auto on a GPU) against calls of a few.
bench decoder_batch 120 benchmarks/bench_decoder_batch.py --device "$DEVICE" "${DECODER[@]}"
# Issue #21 point 2: prompt perturbation <= 2x one decoder pass and Monte-Carlo Laplace <= 2x one
# head forward, on a GPU (sam/vit_b: the mask decoder is the same for every SAM v1 size).
bench evaluate 150 benchmarks/bench_evaluate.py --device "$DEVICE" "${EVALUATE[@]}"
# sam.encoder_int8 (optional, off by default): the fast path with and without int8 encoder weights,
# and the agreement of their cached logits (goal: mask IoU >= 0.99).
measure sam_v1_int8 "$LIMIT_V1" fast,fast+int8 "${SAM_V1[@]}"
measure sam2_int8 "$LIMIT_2" fast,fast+int8 "${SAM_2[@]}"
# The encoder batch size that maximises throughput (sam.encoder_batch_size), vit_h on the fast path,
# uncompiled (a compiled sweep pays one compile per size).
bench batch_sweep 200 benchmarks/bench_precompute.py "${SAM_V1[@]}" --device "$DEVICE" "${SIZES[@]}" "${SWEEP[@]}" \
  --no-naive --encoder-impl fast --compile-encoder false --json "$OUT/batch_sweep.json"
exit $status
