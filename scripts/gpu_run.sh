#!/usr/bin/env bash
# Everything a GPU run needs, in one call: install, GPU tests, benchmarks. Logs and JSON go to $1.
#   scripts/gpu_run.sh OUT_DIR [stage ...]      stages: tests bench models rl vp convergence examples (default: all)
# BENCH_ARGS / MODEL_ARGS pass extra arguments to the benchmark and the model step; TESTS_TIMEOUT and
# EXAMPLE_TIMEOUT bound the tests and each example (seconds).
# Peer wheels (cut-cross-entropy, liger-kernel) are taken from .whl/ when it is there (README, "Benchmarks").
set -uo pipefail
out=${1:?usage: scripts/gpu_run.sh OUT_DIR [stage ...]}
shift
stages=${*:-tests bench models rl vp convergence examples}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
python3 - <<'EOF' | tee "$out/env.txt"
import datetime, torch, triton
print(datetime.datetime.now(datetime.timezone.utc).isoformat(), torch.cuda.get_device_name(),
      "torch", torch.__version__, "triton", triton.__version__)
EOF

status=0
for stage in $stages; do
    echo "=== $stage"
    case $stage in
        tests) timeout "${TESTS_TIMEOUT:-1200}" python3 -m pytest -q -ra --durations=15 -p no:cacheprovider -m gpu tests 2>&1 \
                   | tee "$out/gpu_tests.log"; status=$((status | PIPESTATUS[0])) ;;
        bench) python3 -m benchmarks.lce_bench --out "$out/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
               python3 -m benchmarks.plot "$out/bench.json" --out "$out/bench.png" ;;
        models) python3 -m benchmarks.model_step --out "$out/model_step.json" ${MODEL_ARGS:-} 2>&1 | tee "$out/model_step.log" ;;
        rl) python3 -m benchmarks.rl_bench --out "$out/rl.json" 2>&1 | tee "$out/rl.log" ;;
        vp) python3 -m benchmarks.vocab_parallel_bench --out "$out/vp.json" 2>&1 | tee "$out/vp.log" ;;
        convergence) python3 examples/convergence.py --out "$out" 2>&1 | tee "$out/convergence.log" ;;
        examples) for ex in quickstart hf_causal_lm nanogpt classifier explain_model grpo; do
                      echo "--- examples/$ex.py (GPU size)"; timeout "${EXAMPLE_TIMEOUT:-300}" python3 "examples/$ex.py" || status=1
                  done 2>&1 | tee "$out/examples.log" ;;
        *) echo "unknown stage $stage"; status=1 ;;
    esac
done
exit $status
