#!/usr/bin/env bash
# Time and accuracy of the opt-in algorithms on the Fashion-MNIST quick-start model (3 epochs each, real data).
#
#   bash benchmarks/optins.sh OUT_DIR
#
# Training variants of experiments/fashion_mnist/cls_mdeq_quick.yaml (which already stops on the relative
# residual, DEQ.STOP_MODE rel):
#   base     the config as shipped
#   abs      DEQ.STOP_MODE abs (the original's absolute tolerance)
#   phantom  DEQ.BACKWARD phantom (phantom gradient instead of the implicit adjoint solve)
#   jacreg   LOSS.JAC_LOSS_WEIGHT 0.4 LOSS.JAC_LOSS_FREQ 0.05 (Jacobian regularisation)
# then evaluation-only variants of the trained base model with tools/cls_valid.py:
#   eval_base, eval_thres4 (DEQ.EVAL_F_THRES 4), eval_warm (DEQ.WARM_START True).
# Each run's log goes to OUT_DIR/NAME.log; OUT_DIR/summary.txt gets one line per run (accuracy, seconds).
# Environment: PYTHON (default python3), VARIANTS (default: all of the above, in this order).
set -u
out=${1:?usage: bash benchmarks/optins.sh OUT_DIR}
py=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
cfg="$root/experiments/fashion_mnist/cls_mdeq_quick.yaml"
mkdir -p "$out"
summary="$out/summary.txt"

accuracy() { grep "Test:" "$1" | tail -n 1 | sed -E 's/.*Accuracy@1 ([0-9.]+).*/\1/'; }

train() {  # name, overrides...
    local name=$1
    shift
    local start=$(date +%s)
    "$py" "$root/tools/cls_train.py" --cfg "$cfg" --modelDir "$out/$name/model" --logDir "$out/$name/log" "$@" \
        >"$out/$name.log" 2>&1
    local rc=$?
    local took=$(grep "training took" "$out/$name.log" | sed -E 's/.*training took ([0-9.]+) s.*/\1/')
    local steps=$(grep "Test:" "$out/$name.log" | tail -n 1 | sed -E 's/.*forward nstep ([0-9.]+).*/\1/')
    echo "$name exit=$rc accuracy=$(accuracy "$out/$name.log") train_s=${took:-?} eval_nstep=${steps:-?} wall_s=$(( $(date +%s) - start )) opts=$*" >>"$summary"
}

evaluate() {  # name, overrides...
    local name=$1
    shift
    local model
    model=$(find "$out/base/model" -name final_state.pth.tar | head -n 1)
    "$py" "$root/tools/cls_valid.py" --cfg "$cfg" --testModel "$model" --modelDir "$out/$name/model" \
        --logDir "$out/$name/log" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    local line=$(grep "Test:" "$out/$name.log" | tail -n 1)
    local secs=$(echo "$line" | sed -E 's/.*Time ([0-9.]+).*/\1/')
    local steps=$(echo "$line" | sed -E 's/.*forward nstep ([0-9.]+).*/\1/')
    echo "$name exit=$rc accuracy=$(accuracy "$out/$name.log") eval_s=${secs:-?} eval_nstep=${steps:-?} opts=$*" >>"$summary"
}

for v in ${VARIANTS:-base abs phantom jacreg eval_base eval_thres4 eval_warm}; do
    case $v in
        base) train base ;;
        abs) train abs DEQ.STOP_MODE abs ;;
        phantom) train phantom DEQ.BACKWARD phantom ;;
        jacreg) train jacreg LOSS.JAC_LOSS_WEIGHT 0.4 LOSS.JAC_LOSS_FREQ 0.05 ;;
        eval_base) evaluate eval_base ;;
        eval_thres4) evaluate eval_thres4 DEQ.EVAL_F_THRES 4 ;;
        eval_warm) evaluate eval_warm DEQ.WARM_START True ;;
        *) echo "unknown variant $v" >&2; exit 2 ;;
    esac
done
cat "$summary"
