#!/usr/bin/env bash
# The first call of a GPU loan: what issue 21 needs measured, in order, in at most 9 minutes on one
# H100/H200 -- inside one call of the device tool (10 minutes at most), with a 15-minute loan's start
# and a short second call still to spare.
#
#   bash benches/gpu_session.sh "$OUT"                   # on the lent machine ($OUT: what comes back)
#   FASTSFM_SMOKE=1 bash benches/gpu_session.sh DIR      # the same sequence, tiny, on CPU (in the tests)
#
# Each part runs under its own time limit, so the call returns before the tool's limit and its files
# come back even when a part hangs or runs long:
#   1. install this checkout without dependencies (the machine's torch, Triton and timm);
#   2. the environment and every CUDA-only test (gpu_check.py --only "pytest -m gpu"): the CUDA-graph
#      step, fused Adam and the three-launch loss have not run on a GPU since they changed;     <= 150 s
#   3. profile_step.py --compile: where a step's time goes (stages, top kernels, IEEE vs TF32,
#      eager vs compiled backbone, CUDA-graph step, SDPA backends), which picks the defaults;   <= 240 s
#   4. gpu_check.py's distillation benchmark: SFM vs LGM at C = 100, SFM at C = 1000 IPC 1 and 10
#      (the issue's targets), each row printed as it finishes;                            the rest
# DIR gets session.log (everything printed), check/ and distill/ (gpu_check reports) and
# profile_step.json: eight files at most, as the device tool returns.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR}
py=${PYTHON:-python3}
deadline=${FASTSFM_SESSION_SECONDS:-540}
smoke=() compile=(--compile)
[[ -n "${FASTSFM_SMOKE:-}" ]] && smoke=(--smoke) compile=()  # no compiler run on the CPU rehearsal
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

part() {  # part NAME SECONDS COMMAND...: run COMMAND for at most SECONDS (and never past the deadline)
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit <= 0)); then
        echo "== $name: skipped, the session's ${deadline} s are spent"
        return
    fi
    echo "== $name (at ${SECONDS} s, at most ${limit} s)"
    timeout -k 10 "$limit" "$@"
    echo "== $name: exit $? after ${SECONDS} s"
}

session() {
    if [[ -z "${FASTSFM_SMOKE:-}" ]]; then
        part install 120 "$py" -m pip install -q --no-deps --no-build-isolation -e .
    fi
    part "gpu tests" 150 "$py" benches/gpu_check.py "${smoke[@]}" --only "pytest -m gpu" --out "$out/check"
    part "step profile" 240 "$py" benches/profile_step.py "${smoke[@]}" "${compile[@]}" \
        --out "$out/profile_step.json"
    part "distillation benchmark" "$deadline" "$py" benches/gpu_check.py "${smoke[@]}" \
        --only "distill benchmark" --budget $((deadline - SECONDS)) --out "$out/distill"
    echo "== session done after ${SECONDS} s"
}

session 2>&1 | tee "$out/session.log"
