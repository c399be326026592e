#!/usr/bin/env bash
# The GPU benchmark of the README: benchmarks/bench.py for the TINY and LARGE CIFAR-10 experiments (their own batch
# sizes, solvers and thresholds), each in four variants: eager float32, torch.compile of f_theta (inductor),
# bf16 autocast (TRAIN.AMP True) and CUDA graphs for the forward solve's calls of f (DEQ.CUDA_GRAPH True). One JSON file per run in OUT_DIR, the runs' logs in OUT_DIR/log.txt.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR
#
# Environment: PYTHON (default python3), DEVICE (default cuda), STEPS (10), WARMUP (3), EVAL_IMAGES (2048),
# RUN_TIMEOUT (seconds per run, default 240), CONFIGS ("TINY LARGE"), VARIANTS ("eager bf16 compile graph"),
# PARTS (bench.py --parts, default all).
set -u
out=${1:?usage: bash benchmarks/gpu_suite.sh OUT_DIR}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
log="$out/log.txt"
{
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} >>"$log" 2>&1

status=0
for cfg in ${CONFIGS:-TINY LARGE}; do
    for variant in ${VARIANTS:-eager bf16 compile graph}; do
        flags=()
        opts=()
        case $variant in
            eager) ;;
            bf16) opts=(TRAIN.AMP True) ;;
            compile) flags=(--compile inductor) ;;
            graph) opts=(DEQ.CUDA_GRAPH True) ;;
            *) echo "unknown variant $variant (eager, bf16, compile, graph)" >&2; exit 2 ;;
        esac
        name=$(echo "${cfg}_${variant}" | tr 'A-Z' 'a-z')
        echo "== $name" >>"$log"
        start=$(date +%s)
        timeout "${RUN_TIMEOUT:-240}" "$py" "$here/bench.py" --cfg "$here/../experiments/cifar/cls_mdeq_$cfg.yaml" \
            --device "${DEVICE:-cuda}" --steps "${STEPS:-10}" --warmup "${WARMUP:-3}" \
            --eval-images "${EVAL_IMAGES:-2048}" --parts "${PARTS:-fcost,unrolled,equilibrium,eval,memory}" "${flags[@]}" --out "$out/$name.json" "${opts[@]}" \
            >/dev/null 2>>"$log"
        rc=$?
        echo "== $name: exit $rc after $(( $(date +%s) - start )) s" >>"$log"
        [ $rc -eq 0 ] || status=1
    done
done
exit $status
