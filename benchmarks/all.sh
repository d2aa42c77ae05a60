#!/usr/bin/env bash
# Every GPU check and benchmark on an H100/H200, in stages that each stop at their own limit.
#
#   bash benchmarks/all.sh [OUT_DIR] [STAGES...]
#
# STAGES (default: check e2e train accuracy; "check decode", "train quant" and "e2e accuracy"
# each fit one 10-minute call, "gluon" takes one of its own):
#   check     tests/ops/test_inline.py and tests/kernels compiled on the GPU (kernels inlined
#             into compiled graphs, bit-exact quantization, every GEMM recipe), less the
#             warp-specialized kernel's tests
#   gluon     tests/kernels/test_blockwise_ws.py: every tile, recipe and epilogue of the
#             warp-specialized Hopper kernel (~9 minutes on an H200, most of it compiling)
#   gemm      benchmarks/gemm.py at M = 16 and 4096 (the full sweep: run gemm.py alone)
#   gemv      benchmarks/gemv.py: the one-row GEMM on CUDA cores against the tensor cores,
#             every launch
#   swiglu    benchmarks/swiglu.py and swiglu_groups.py: the gate/up step with SiLU·mul in
#             the GEMM epilogue or not (row/tensor scales, then blockwise with h quantized in
#             1x128 groups there)
#   compile   benchmarks/compile_time.py: prefill compile time, each variant in a fresh process
#   clocks    benchmarks/clocks.py: the prefill step by each timing method, and the SM clock
#   quant     benchmarks/quant.py: each quantization kernel against a copy of the same bytes,
#             and tensorwise quantization at decode sizes by amax route (--decode)
#   decode    benchmarks/e2e.py at 16 tokens with CUDA graphs, profile of fp8hpf tensorwise fast
#   e2e       benchmarks/e2e.py without and with CUDA graphs, prefill and decode, profile of
#             the best
#   train     benchmarks/train.py without and with CUDA graphs
#   accuracy  benchmarks/accuracy.py at d=4096
#   memory    benchmarks/memory.py: weight memory of two blocks run at prefill and decode
#             under CUDA graphs, with and without release_weights (each variant a process)
# Each stage has its own time limit, so one slow stage cannot eat the others' time; a failed
# stage is reported and the next one runs.  A torchao wheel under .whl/ is installed first
# (benchmarks/README.md says how to fetch it).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-out}}"
shift || true
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(check e2e train accuracy)
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true

run() {  # run NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    grep -v -i -E "warn|^ *warnings\.warn|Failed to load" "$out/$name.log" | tail -n 40
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}

for stage in "${stages[@]}"; do
    case $stage in
        check) run check 420 python -m pytest -q -x -p no:cacheprovider tests/ops/test_inline.py \
                   tests/kernels --ignore tests/kernels/test_blockwise_ws.py ;;
        gluon) run gluon 580 python -m pytest -q -p no:cacheprovider \
                   tests/kernels/test_blockwise_ws.py ;;
        gemm) run gemm 200 python benchmarks/gemm.py --m 16 4096 --out "$out" ;;
        gemv) run gemv 300 python benchmarks/gemv.py ;;
        swiglu)
            run swiglu 150 python benchmarks/swiglu.py
            run swiglu_groups 150 python benchmarks/swiglu_groups.py --m 2048 4096 8192 ;;
        compile) run compile 300 python benchmarks/compile_time.py ;;
        clocks) run clocks 150 python benchmarks/clocks.py --out "$out" ;;
        quant)
            run quant 90 python benchmarks/quant.py --out "$out"
            run quant_decode 60 python benchmarks/quant.py --decode --out "$out" ;;
        decode) run e2e_decode 150 python benchmarks/e2e.py --mode reduce-overhead \
                    --shapes decode --profile --profile-variant "fp8hpf tensorwise fast" \
                    --only "bf16 Inductor,fp8hpf blockwise,fp8hpf tensorwise,fp8hpf tensorwise fast,fp8hpf tensorwise fast unfused,fp8hpf rowwise fast" \
                    --out "$out/e2e_decode" ;;
        e2e)
            main="bf16 Inductor,torchao rowwise,torchao tensorwise,fp8hpf blockwise"
            main="$main,fp8hpf rowwise,fp8hpf tensorwise,fp8hpf rowwise fast,fp8hpf tensorwise fast"
            run e2e_default 150 python benchmarks/e2e.py --only "$main" --out "$out/e2e_default"
            run e2e 240 python benchmarks/e2e.py --mode reduce-overhead --profile \
                --only "$main,fp8hpf blockwise unfused,fp8hpf blockwise no-swiglu,fp8hpf rowwise fast unfused,fp8hpf tensorwise fast no-swiglu" \
                --profile-variant "fp8hpf rowwise fast" --out "$out" ;;
        train)
            run train_default 150 python benchmarks/train.py --out "$out/train_default"
            run train_graphs 120 python benchmarks/train.py --mode reduce-overhead \
                --out "$out/train_graphs" ;;
        accuracy) run accuracy 60 python benchmarks/accuracy.py --d 4096 --heads 32 \
                      --ffn 14336 --tokens 4096 --seeds 2 ;;
        memory) run memory 300 python benchmarks/memory.py --blocks 2 ;;
        *) echo "unknown stage $stage (check gluon gemm gemv swiglu compile clocks quant decode e2e train accuracy memory)"; exit 2 ;;
    esac
done
