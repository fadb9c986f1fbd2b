#!/usr/bin/env bash
# A GPU loan's two calls (issue 34): 12 minutes of lent time, ordered by value, every part's JSON
# written as it finishes, each part under its own limit so a call returns before the device tool's.
#
#   bash benches/gpu_session.sh "$OUT" 1     # first call: at most 540 s
#   bash benches/gpu_session.sh "$OUT" 2     # second call (a fresh machine: it installs again): at most 200 s
#   FASTSFM_SMOKE=1 bash benches/gpu_session.sh DIR 1    # the same sequence, tiny, on CPU (in the tests)
#
# Call 1:  install this checkout without dependencies (the machine's torch, Triton and timm); a
#          failed install stops the session (the rest would measure the old code);
#   (a) profile_loss.py: the loss's kernels and the whole loss graph-replayed at N = 1k/10k/50k
#       beside the HBM floor, then the class sums' bandwidth per IPC, order and dtype -> loss.json;
#   (b) profile_step.py --compile: the step at C = 1000 and 100, eager and as a CUDA graph, its
#       stages and top kernels, the backbone eager vs torch.compile, the SDPA backends, TF32 vs
#       IEEE on the real side and in the render/crop -> profile_step.json (which picks the defaults).
# Call 2:  install; (c) SFM vs LGM at C = 100 (gpu_check "sfm vs lgm") -> sfm_vs_lgm/;
#   (d) benches/bench_gca.py (fused vs dense GCA, rows 4096 and 16384, D 128) -> gca.json;
#   (e) benches/profile_offload.py (offloaded vs resident chunked steps per optimizer state) -> the log;
#   then every CUDA-only test, each under a time limit, results written as they finish -> tests/.
# DIR gets session<call>.log and the parts' files: at most eight files, as the device tool returns.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR [1|2]}
call=${2:-1}
py=${PYTHON:-python3}
smoke=() compile=(--compile) gca=(--rows 4096,16384 --dims 128 --compile-max-rows 4096)
[[ -n "${FASTSFM_SMOKE:-}" ]] && smoke=(--smoke) compile=() gca=()  # no compiler run on the CPU rehearsal
skip_install=${FASTSFM_SKIP_INSTALL:-${FASTSFM_SMOKE:+1}}  # the CPU rehearsal runs the installed checkout
case $call in
    1) deadline=${FASTSFM_SESSION_SECONDS:-540} ;;
    2) deadline=${FASTSFM_SESSION_SECONDS:-200} ;;
    *) echo "gpu_session.sh: the call is 1 or 2, got '$call'" >&2; exit 2 ;;
esac
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

part() {  # part NAME SECONDS COMMAND...: run COMMAND for at most SECONDS (never past the deadline); its exit
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit <= 0)); then
        echo "== $name: skipped, the call's ${deadline} s are spent"
        return 0
    fi
    echo "== $name (at ${SECONDS} s, at most ${limit} s)"
    timeout -k 10 "$limit" "$@"
    local code=$?
    echo "== $name: exit $code after ${SECONDS} s"
    return $code
}

install() {
    [[ -n "$skip_install" && "$skip_install" != 0 ]] && return 0
    if ! part install 90 "$py" -m pip install -q --no-deps --no-build-isolation -e .; then
        echo "== install failed: the session stops here (every later part would measure the code installed before)"
        return 1
    fi
}

first() {
    install || return 1
    part "loss (a)" 150 "$py" benches/profile_loss.py "${smoke[@]}" --out "$out/loss.json"
    part "step profile (b)" "$deadline" "$py" benches/profile_step.py "${smoke[@]}" "${compile[@]}" \
        --out "$out/profile_step.json"
}

second() {
    install || return 1
    part "sfm vs lgm (c)" 90 "$py" benches/gpu_check.py "${smoke[@]}" --only "sfm vs lgm" \
        --budget 80 --out "$out/sfm_vs_lgm"
    part "gca (d)" 45 "$py" benches/bench_gca.py "${smoke[@]}" "${gca[@]}" --out "$out/gca.json"
    part "offload streams (e)" 30 "$py" benches/profile_offload.py "${smoke[@]}"  # its table: in the log
    part "gpu tests" "$deadline" "$py" benches/gpu_check.py "${smoke[@]}" --only "pytest -m gpu" \
        --budget $((deadline - SECONDS - 15)) --out "$out/tests"
}

session() {
    if [[ $call == 1 ]]; then first; else second; fi
    local code=$?
    echo "== call $call done after ${SECONDS} s (exit $code)"
    return $code
}

session 2>&1 | tee "$out/session$call.log"
exit "${PIPESTATUS[0]}"
