#!/usr/bin/env bash
# The GPU check of issue 30, for a session lent an NVIDIA GPU (an H200: 132 SMs). Two calls, about 8 minutes each.
# Set up once, in the repo root (.gpu/ is kept out of git by .git/info/exclude; ../shared does not travel):
#   mkdir -p .gpu && echo /.gpu/ >> .git/info/exclude && cp harness/gpu_check.sh ../shared/gpu/mm_time.py \
#     ../shared/bench/torch_mdlm.py .gpu/ && pip download --no-deps -d .gpu/whl tinygrad==0.14.0
# Then: device run, carry [".gpu"], command "bash .gpu/gpu_check.sh 1" (then "... 2"), timeout_s 560 each.
# Dry run here first, on tinygrad's NULL device: DRY=1 bash harness/gpu_check.sh 1 (and 2): every command, no GPU.
# 1: the matmul timed right, the step before and after the fill work (profile, speed), the peer in the same run.
# 2: a BEAM=4 search of the step's slowest kernels, written as harness/schedules/ARCH.json, and the step with them.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
if [ -n "${DRY:-}" ]; then export DEV=NULL:NVCC:sm_90 NULL_ALLOW_COPYOUT=1; T=1; X=6; SEARCH="--search 1 --beam 1"; else
  export DEV=${DEV:-CUDA}  # DEV=NV does not know Hopper
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl &&
    export PYTHONPATH=/tmp/site
  nvrtc=$(find / -name 'libnvrtc.so*' 2>/dev/null | head -1)
  [ -n "$nvrtc" ] && export NVRTC_PATH="$nvrtc" LD_LIBRARY_PATH="$(dirname "$nvrtc"):${LD_LIBRARY_PATH:-}"
  export CACHEDB=$OUT/../tinygrad-cache.db; T=10; X=1; SEARCH="--search 8 --beam 4"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
fi
bench="python3 -m harness.bench --preset base"
if [ "${1:-1}" = 1 ]; then
  if [ -z "${DRY:-}" ]; then  # the standalone matmul, with TinyJit and a synchronize (mm_time.py)
    timeout 90 python3 .gpu/mm_time.py 2>&1 | tail -4 | tee "$OUT/matmul.txt"
    BEAM=4 timeout 150 python3 .gpu/mm_time.py 2>&1 | tail -4 | tee -a "$OUT/matmul.txt"
  fi
  # before the fill work: tinygrad's own split thresholds (the env wins over kernels.GPU_SPLIT)
  REDUCEOP_SPLIT_THRESHOLD=32768 REDUCEOP_SPLIT_SIZE=22 timeout $((150 * X)) $bench --profile --top 25 \
    > "$OUT/profile_before.txt" 2>&1
  timeout $((150 * X)) $bench --profile --top 25 > "$OUT/profile_after.txt" 2>&1
  timeout $((120 * X)) $bench --steps $T --skip-sample > "$OUT/bench_after.txt" 2>&1
  if [ -z "${DRY:-}" ]; then
    for s in train valid; do  # xz may not be there
      python3 -c "import lzma, sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())" data/tinystories/$s.txt.xz \
        > /tmp/$s.txt
    done
    timeout 120 python3 .gpu/torch_mdlm.py --train /tmp/train.txt --val /tmp/valid.txt --device cuda --dtype bfloat16 \
      --dim 512 --layers 8 --heads 8 --seq-len 256 --batch 64 --vocab-size 8192 --steps 30 --eval-every 1000 \
      --eval-windows 8 --eval-samples 1 2>&1 | tail -1 | tee "$OUT/peer_base.txt"
  fi
  for f in profile_before profile_after bench_after; do echo "$f: $(tail -1 "$OUT/$f.txt" | cut -c1-300)"; done
else
  arch=$(python3 -c "from tinygrad import Device; print(Device[Device.DEFAULT].renderer.target.arch)")
  timeout $((420 * X)) $bench --profile --top 16 $SEARCH --write-schedules "$OUT/$arch.json" > "$OUT/search.txt" 2>&1
  timeout $((100 * X)) $bench --steps $T --skip-sample --schedules "$OUT/$arch.json" > "$OUT/bench_pinned.txt" 2>&1
  for f in search bench_pinned; do echo "$f: $(tail -1 "$OUT/$f.txt" | cut -c1-300)"; done
  echo "copy $OUT/$arch.json to harness/schedules/$arch.json: train.py pins it for the base preset on this GPU"
fi
