#!/usr/bin/env bash
# Run the GPU tests (tests/gpu) and the GPU benchmark (benchmarks/gpu.py) on a CUDA machine with no network,
# e.g. an air-gapped cluster node or a lent GPU box that has PyTorch and Lightning but not the rest of the stack.
#
#   tools/gpu_offline.sh wheels [DIR] [PYVER]   # on a machine with the package index: the missing wheels -> DIR
#   tools/gpu_offline.sh check [DIR]            # there: which packages are missing (installs nothing)
#   tools/gpu_offline.sh run OUT [tests|bench|all] [DIR]   # there: install DIR, run, results -> OUT
#
# DIR defaults to the repository's .whl (git-ignored), PYVER to 3.12 (the target's Python: `check` there prints it
# with the toolchain DeepSpeed's op builds need), OUT must be writable. `run` writes at most 6 files into OUT:
# env.txt, gpu_tests.log, gpu_tests.json (the summary.json of every test, keyed by test), gpu_tests.xml (junit),
# bench.log and gpu_<gpu name>.json; the runs themselves
# (checkpoints) stay under $TMPDIR. Each step has its own time limit (TESTS_S, BENCH_S seconds; CASE_S per benchmark
# case; BENCH_ARGS go to benchmarks/gpu.py, e.g. "--steps 30 --cases bare,dtrain") so one that hangs still leaves
# the other's results; the defaults (230 + 330 s, the compiled benchmark cases last) fit `run OUT all` into one
# 10-minute command. Copy gpu_<gpu name>.json into benchmarks/results/ and commit it.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# IMAGE: the distributions the GPU paths import that the target image is expected to have (a CUDA PyTorch image;
# tests/unit/test_gpu_benchmark.py checks that the paths import nothing beyond IMAGE and PACKAGES).
IMAGE=(torch torchvision triton cuda-bindings cuda-pathfinder lightning lightning-utilities torchmetrics numpy scipy
       scikit-learn joblib threadpoolctl matplotlib cycler fonttools kiwisolver pyparsing python-dateutil six pillow
       narwhals sympy mpmath fsspec regex rich pygments colorama tqdm pyyaml psutil msgpack einops packaging
       setuptools attrs cloudpickle certifi charset-normalizer pytest pluggy iniconfig)
# PACKAGES: what such an image may lack, carried as wheels, with what they need. Versions: the ones CI installs
# (pyproject.toml's ranges; ../shared/ENVIRONMENT.md). deepspeed has no wheel on PyPI: `pip wheel` builds a pure
# one (no ops; DeepSpeed compiles the ones it needs at run time with ninja). wandb and webdataset are not needed
# (the GPU runs log to CSV and read in-memory or sklearn data).
PACKAGES=(deepspeed==0.19.8 hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
          typing-inspection==0.4.2 typing-extensions==4.16.0 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2
          torch-fidelity==0.4.0 braceexpand==0.1.7)
MODULES=(deepspeed hjson pydantic pydantic_core annotated_types typing_inspection typing_extensions omegaconf
         antlr4 torch_fidelity braceexpand)
PY="${PYTHON:-python3}"

die() { echo "tools/gpu_offline.sh: $*" >&2; exit 2; }

wheels() {  # DIR PYVER
    local dir="${1:-$ROOT/.whl}" pyver="${2:-3.12}" pure=() bin=() p
    mkdir -p "$dir" || die "cannot create $dir"
    rm -f "$dir"/*.whl  # one version of each (pydantic-core is built per Python version): pip refuses two
    for p in "${PACKAGES[@]}"; do [[ $p == deepspeed* ]] && pure+=("$p") || bin+=("$p"); done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dir" "${bin[@]}" || die "pip download failed (versions above; the index must be reachable)"
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "${pure[@]}" \
        || die "building the deepspeed wheel failed (needs torch installed here)"
    ls -l "$dir"/*.whl
    du -ch "$dir"/*.whl | tail -1
}

check() {  # DIR: the modules the target cannot import (nothing installed)
    local m missing=() dir="${1:-$ROOT/.whl}"
    "$PY" -V
    for m in "${MODULES[@]}"; do "$PY" -c "import $m" 2>/dev/null || missing+=("$m"); done
    echo "missing here: ${missing[*]:-none}"
    [[ -d "$dir" ]] && echo "carried wheels: $(ls "$dir" | tr '\n' ' ')"
    toolchain
    return 0
}

toolchain() {  # what DeepSpeed's run-time op builds (cpu_adam for optimizer offload) need
    echo "ninja: $(ninja --version 2>&1 | head -1)"
    echo "c++: $(c++ --version 2>&1 | head -1)"
    "$PY" -c 'import pathlib, sysconfig; h = pathlib.Path(sysconfig.get_paths()["include"], "Python.h")
print("Python.h:", h, "found" if h.is_file() else "MISSING")'
}

install() {  # DIR: into $SITE, first on PYTHONPATH (only packages this image lacks are carried)
    local dir="${1:-$ROOT/.whl}"
    SITE="${SITE:-${TMPDIR:-/tmp}/dtrain_site}"
    if compgen -G "$dir/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$dir"/*.whl || die "installing the wheels in $dir failed"
    else
        echo "tools/gpu_offline.sh: no wheels in $dir: using this machine's packages only" >&2
    fi
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
}

run() {  # OUT WHAT DIR
    local out="${1:-}" what="${2:-all}" dir="${3:-$ROOT/.whl}" runs rc=0
    [[ -n "$out" ]] || die "run needs OUT, a folder for the results"
    [[ $what =~ ^(tests|bench|all)$ ]] || die "run: WHAT must be tests, bench or all, not '$what'"
    mkdir -p "$out" && [[ -w "$out" ]] || die "OUT '$out' is not a writable folder"
    out="$(cd "$out" && pwd)"  # absolute: the steps run in the repository root
    install "$dir"
    cd "$ROOT" || exit 2
    export WANDB_MODE=offline PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/torch_ext}"
    runs="${TMPDIR:-/tmp}/dtrain_gpu_runs"
    {
        date -u; nvidia-smi 2>&1 | head -20; toolchain
        "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for m in ("torch", "lightning", "deepspeed", "omegaconf", "torchmetrics", "dtrain"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), mod.__file__)
    except Exception as e:  # noqa: BLE001 - a report, not a program
        print(m, "NOT IMPORTABLE:", repr(e))
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))
EOF
    } >"$out/env.txt" 2>&1
    cat "$out/env.txt"
    if [[ $what != bench ]]; then
        rm -rf "$runs"
        DTRAIN_GPU_OUT="$runs" timeout -k 15 "${TESTS_S:-230}" "$PY" -m pytest -q -p no:cacheprovider tests/gpu \
            --junitxml="$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log" || rc=1
        "$PY" - "$runs" "$out/gpu_tests.json" <<'EOF'
import json, pathlib, sys
runs = pathlib.Path(sys.argv[1])
found = {p.parent.name: json.loads(p.read_text()) for p in sorted(runs.glob("*/summary.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(found, indent=1, default=str) + "\n")
print(f"{len(found)} test summaries -> {sys.argv[2]}")
EOF
    fi
    if [[ $what != tests ]]; then
        # shellcheck disable=SC2086  # BENCH_ARGS: several words
        timeout -k 15 "${BENCH_S:-330}" "$PY" benchmarks/gpu.py --timeout "${CASE_S:-150}" ${BENCH_ARGS:-} 2>&1 \
            | tee "$out/bench.log" || rc=1
        find benchmarks/results -name 'gpu_*.json' -newer "$out/env.txt" -exec cp {} "$out/" \;
    fi
    return $rc
}

case "${1:-}" in
    wheels | check | run) "$@" ;;  # each takes its arguments' defaults
    *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
