#!/usr/bin/env bash
# The one prepared script a session lent a GPU machine runs in one go (one H100/H200; 15 minutes of device time
# in all, at most 10 a command). Every step has its own timeout, so the whole script ends within
# TOTAL_LIMIT_S (printed by --dry-run) and a failing or hanging step does not stop the ones after it.
# Everything is written under $OUT (default out/gpu_session): one log per step, summary.tsv (step, exit code,
# seconds), the block calibration, the netbench report.
#
#   bash benchmarks/gpu_session.sh --dry-run      # print the steps and their timeouts; runs nothing
#   bash benchmarks/gpu_session.sh                # on the GPU machine, from the repository root
#
# The device image holds torch, numpy, scipy, networkx, rich, pyyaml, matplotlib, pytest, pytest-timeout and
# hypothesis, but not simpy: carry its wheel in .whl/ (README: "The GPU session" says how to fetch it);
# any .whl/*.whl is installed into /tmp/site first and put on PYTHONPATH. PY (default python3) is the
# interpreter.
#
# The all-reduce step: NCCL refuses two ranks on one GPU, so on a one-GPU machine it is a one-rank sanity run
# (the nccl process group, device placement, the checked sum and CUDA timing; busbw is 0 and there is no link
# to save). With two or more GPUs it is a real ring over all of them and writes nccl_topology.json.
set -u

DRY=0
case "${1:-}" in
  --dry-run|-n) DRY=1 ;;
  "") ;;
  -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
  *) echo "gpu_session.sh: unknown argument '$1'; use --dry-run or no argument" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.." || exit 2
PY=${PY:-python3}
OUT=${OUT:-out/gpu_session}
export PYTHONUNBUFFERED=1

STEPS=()
TIMEOUTS=()
COMMANDS=()
add() {  # add NAME TIMEOUT_S COMMAND...: a step runs COMMAND (a bash line) under its own timeout
  STEPS+=("$1"); TIMEOUTS+=("$2"); COMMANDS+=("$3")
}

if [ "$DRY" = 1 ]; then
  NGPU=${NGPU:-1}
else
  mkdir -p "$OUT" || exit 2
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      > "$OUT/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  NGPU=${NGPU:-$(timeout 60 $PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)}
  case "$NGPU" in ''|*[!0-9]*) NGPU=0 ;; esac
fi

add versions 25 "$PY -c 'import sys, torch; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version()); print(\"nccl\", torch.cuda.nccl.version() if torch.cuda.is_available() else None); print(\"gpus\", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])' && { nvidia-smi || true; }"
add test_gpu 200 "$PY -m pytest -q -p no:cacheprovider tests/test_gpu.py --timeout=120 --junitxml=$OUT/test_gpu.xml"
add profile_blocks 120 "$PY -m pipetwin profile --blocks gpt3-1.3b --blocks llama3-8b --tp 1,2,4,8 --microbatch-size 1,2,4 --device cuda --new-table -o $OUT/blocks_calibration.json"
add bench_blocks 60 "$PY benchmarks/bench_blocks.py --device cuda"
if [ "$NGPU" -ge 2 ]; then
  add netbench_nccl 45 "$PY -m pipetwin netbench --mode allreduce --backend nccl --workers $NGPU --timeout 40 --json -o $OUT/nccl_topology.json > $OUT/netbench_nccl.json"
else  # one GPU: a one-rank sanity run (NCCL refuses two ranks on one GPU)
  add netbench_nccl 45 "$PY -m pipetwin netbench --mode allreduce --backend nccl --workers 1 --timeout 40 --json > $OUT/netbench_nccl.json"
fi

TOTAL=0
for t in "${TIMEOUTS[@]}"; do TOTAL=$((TOTAL + t + 5)); done  # + the 5 s grace before a kill

if [ "$DRY" = 1 ]; then
  echo "gpu_session: ${#STEPS[@]} steps, TOTAL_LIMIT_S=$TOTAL (each step's timeout + 5 s kill grace), OUT=$OUT, GPUs=$NGPU"
  for i in "${!STEPS[@]}"; do
    printf '%s\t%s\t%s\n' "${STEPS[$i]}" "${TIMEOUTS[$i]}" "${COMMANDS[$i]}"
  done
  exit 0
fi

printf 'step\texit\tseconds\n' > "$OUT/summary.tsv"
FAILED=0
for i in "${!STEPS[@]}"; do
  name=${STEPS[$i]}
  echo "== $name (timeout ${TIMEOUTS[$i]} s): ${COMMANDS[$i]}"
  start=$(date +%s)
  timeout -k 5 "${TIMEOUTS[$i]}" bash -c "${COMMANDS[$i]}" > "$OUT/$name.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  printf '%s\t%s\t%s\n' "$name" "$rc" "$secs" >> "$OUT/summary.tsv"
  tail -n 25 "$OUT/$name.log"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "== $name: timed out after ${TIMEOUTS[$i]} s"
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
done
echo "== summary ($OUT/summary.tsv)"
cat "$OUT/summary.tsv"
[ "$FAILED" = 0 ]
