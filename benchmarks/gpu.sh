#!/usr/bin/env bash
# Every check that needs a GPU, as one command (repository root, virtual environment active):
#
#   bash benchmarks/gpu.sh                         # CUDA: tests, check, benchmark eager + compiled, large sizes
#   bash benchmarks/gpu.sh --device cpu --quick    # the same steps at tiny sizes on the CPU: a smoke test
#
# Options: --device cuda|cpu (default cuda), --quick (tiny sizes, no CPU memory subprocesses),
#          --out DIR (default benchmarks/out/gpu-DEVICE[-quick]), --no-compile (skip the torch.compile runs),
#          --steps a,b,... (a subset of the steps below, in their order; default all: split a session's work
#          across calls, e.g. --steps tests,check,eager then --steps compiled then --steps large-float32,...).
# Environment: PYTHON (default python).
#
# Steps; each one's output is tee'd to DIR/<step>.log, and a failing step does not stop the others:
#   1. tests     python -m pytest -k cuda                          the CUDA cases of the test suite
#   2. check     python -m pml_triplets check                      adapter vs reference, every device and dtype
#   3. eager     bench_loss.py, the default grid, every method     -> DIR/eager/results.md (and .png)
#   4. compiled  bench_loss.py --compile only, the configurations the targets read, methods floor, pml_triplets
#                (and, uncompiled, pml_triplets[eager]), pml_triplets[fullgraph], fused, info-nce-pytorch -> DIR/compiled/
#   5. large     N=8192, M=64, d=768, per-anchor and in-batch, float32 then bfloat16, eager and compiled,
#                methods floor, pml_triplets, pml_triplets[fullgraph], fused, info-nce-pytorch -> DIR/large-DTYPE/
# At the end: each step's exit status, and every results.md's targets. Exit status 1 if any step failed.
set -uo pipefail

DEVICE=cuda QUICK=0 COMPILE=1 OUT="" STEPS="tests,check,eager,compiled,large-float32,large-bfloat16"
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=${2:?--device needs a value}; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --no-compile) COMPILE=0; shift ;;
        --out) OUT=${2:?--out needs a value}; shift 2 ;;
        --steps) STEPS=${2:?--steps needs a value}; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
for s in ${STEPS//,/ }; do
    case "$s" in
        tests|check|eager|compiled|large-float32|large-bfloat16) ;;
        *) echo "gpu.sh: unknown step '$s' in --steps (see --help)" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
[ -n "$OUT" ] || OUT="benchmarks/out/gpu-$DEVICE$([ "$QUICK" = 1 ] && echo -quick)"
mkdir -p "$OUT"
BENCH=(benchmarks/bench_loss.py --device "$DEVICE")
FAST="floor,pml_triplets,pml_triplets[fullgraph],fused,info-nce-pytorch"
if [ "$QUICK" = 1 ]; then
    # Tiny sizes, one repeat, no CPU memory subprocesses: every step runs, in about 2 minutes of 2-core CPU time.
    SIZES=(--d 16 --repeats 1 --many 1 --no-memory --threads 1)
    GRID=(--config pa:16:2 --config ib:8:2 --config ib:8:2:4dir)
    TARGET_GRID=(--config pa:16:2)
    LARGE=(--config pa:16:2 --d 16 --repeats 1 --many 1 --no-memory --threads 1)
    FAST="floor,pml_triplets[fullgraph]"
    LARGE_METHODS="floor,pml_triplets"
else
    SIZES=(--repeats 10)
    GRID=()
    # The compiled run is limited to the configurations some target reads: compiling costs seconds per graph.
    TARGET_GRID=()
    for c in pa:128:4 pa:512:4 pa:512:32 pa:2048:8 pa:2048:32 pa:4096:32 pa:4096:64 pa:16384:16:d256 ib:256:8 \
        ib:1024:8 ib:2048:8 ib:1024:8:4dir ib:1024:8:hardness ib:1024:8:guide; do
        TARGET_GRID+=(--config "$c")
    done
    LARGE=(--config pa:8192:64 --config ib:8192:64 --d 768 --repeats 5)
    LARGE_METHODS=$FAST
fi

declare -A STATUS
ORDER=()
step() {  # step NAME COMMAND...: run it (if --steps has it), tee its output to OUT/NAME.log, record its status
    local name=$1
    shift
    [[ ",$STEPS," == *",$name,"* ]] || return 0
    ORDER+=("$name")
    echo "=== $name: $*" | tee "$OUT/$name.log"
    local start=$SECONDS
    "$@" 2>&1 | tee -a "$OUT/$name.log"
    STATUS[$name]=${PIPESTATUS[0]}
    echo "=== $name: exit ${STATUS[$name]} after $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
}

{
    echo "gpu.sh --device $DEVICE$([ "$QUICK" = 1 ] && echo ' --quick'), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    git rev-parse --short HEAD 2>/dev/null && git status --porcelain pml_triplets benchmarks 2>/dev/null
    "$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| devices',
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
    command -v nvidia-smi >/dev/null && nvidia-smi
} 2>&1 | tee "$OUT/environment.log"

step tests "$PY" -m pytest -k cuda -p no:cacheprovider -q -rs
step check "$PY" -m pml_triplets check
step eager "$PY" "${BENCH[@]}" "${SIZES[@]}" "${GRID[@]}" --out "$OUT/eager"
if [ "$COMPILE" = 1 ]; then
    step compiled "$PY" "${BENCH[@]}" "${SIZES[@]}" "${TARGET_GRID[@]}" --compile only --methods "$FAST" \
        --out "$OUT/compiled"
fi
for dtype in float32 bfloat16; do
    step "large-$dtype" "$PY" "${BENCH[@]}" "${LARGE[@]}" --dtype "$dtype" --methods "$LARGE_METHODS" \
        --compile "$([ "$COMPILE" = 1 ] && echo both || echo off)" --out "$OUT/large-$dtype"
done

failed=0
for name in "${ORDER[@]}"; do
    [ "${STATUS[$name]}" = 0 ] || failed=1
done
{
    echo
    echo "=== summary ($OUT)"
    for name in "${ORDER[@]}"; do
        echo "$name: exit ${STATUS[$name]}"
    done
    for md in "$OUT"/*/results.md; do
        [ -f "$md" ] || continue
        echo
        echo "--- $md"
        sed -n '/^## Targets/,/^## Compile errors/p' "$md" | grep '^|' | grep -v 'n/a (not measured'
    done
} 2>&1 | tee "$OUT/summary.log"
exit $failed
