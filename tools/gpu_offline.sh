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
# env.txt (versions, GPU, toolchain, and any module that does not import), gpu_tests.log, gpu_tests.json (the
# summary.json of every test, keyed by test), gpu_tests.xml (junit), bench.log and gpu_<gpu name>.json (rewritten
# after every benchmark case); the runs themselves (checkpoints) stay under $TMPDIR. One deadline, TOTAL_S seconds
# after the start (default 560: a 10-minute command with room to spare), bounds everything: the tests get TESTS_S
# (default 200; near their deadline pytest skips the tests left, a test still running at it is interrupted and
# pytest still writes its reports), the benchmark what remains (at most BENCH_S; CASE_S per case; BENCH_ARGS go to
# benchmarks/gpu.py, e.g. "--steps 30 --cases bare,dtrain"), so a step that hangs still leaves the other's
# results. Copy gpu_<gpu name>.json into benchmarks/results/ and commit.
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
# py-cpuinfo: DeepSpeedCPUAdam (optimizer offload) imports it; ninja: builds that op at run time (its wheel puts
# the binary on PATH, so the image's toolchain needs only c++ and Python.h).
PACKAGES=(deepspeed==0.19.8 hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
          typing-inspection==0.4.2 typing-extensions==4.16.0 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2
          torch-fidelity==0.4.0 braceexpand==0.1.7 py-cpuinfo==9.0.0 ninja==1.13.2)
MODULES=(deepspeed hjson pydantic pydantic_core annotated_types typing_inspection typing_extensions omegaconf
         antlr4 torch_fidelity braceexpand cpuinfo ninja)
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
    if ! compgen -G "$dir/*.whl" >/dev/null; then
        echo "tools/gpu_offline.sh: no wheels in $dir: using this machine's packages only" >&2
    elif ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$dir"/*.whl; then  # no pip (a uv venv): a wheel is a zip of what site-packages holds
        echo "tools/gpu_offline.sh: pip failed or is missing: unpacking the wheels into $SITE" >&2
        "$PY" - "$SITE" "$dir"/*.whl <<'EOF' || echo "tools/gpu_offline.sh: unpacking failed too" >&2
import glob, os, shutil, stat, sys, zipfile
site = sys.argv[1]
for whl in sys.argv[2:]:
    with zipfile.ZipFile(whl) as z:
        z.extractall(site)
os.makedirs(os.path.join(site, "bin"), exist_ok=True)
for script in glob.glob(os.path.join(site, "*.data", "scripts", "*")):  # e.g. the ninja binary: onto PATH
    dest = os.path.join(site, "bin", os.path.basename(script))
    shutil.copy2(script, dest)
    os.chmod(dest, os.stat(dest).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
EOF
    fi
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
}

run() {  # OUT WHAT DIR
    local out="${1:-}" what="${2:-all}" dir="${3:-$ROOT/.whl}" runs rc=0 left tests_s bench_s
    local deadline=$((SECONDS + ${TOTAL_S:-560}))
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
        "$PY" - "${MODULES[@]}" <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
missing = []
for m in ("torch", "lightning", "torchmetrics", "dtrain", *sys.argv[1:]):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), mod.__file__)
    except Exception as e:  # a report, not a program
        print(m, "NOT IMPORTABLE:", repr(e))
        missing.append(m)
print(*(["MISSING (make the wheels: tools/gpu_offline.sh wheels; carry .whl):", *missing] if missing else
        ["all modules import"]))
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))
EOF
    } >"$out/env.txt" 2>&1
    cat "$out/env.txt"
    if [[ $what != bench ]]; then
        rm -rf "$runs"
        left=$((deadline - SECONDS))
        tests_s=${TESTS_S:-$([[ $what == tests ]] && echo "$left" || echo 200)}  # alone: all the time there is
        ((tests_s < left)) || tests_s=$left
        ((tests_s >= 30)) || tests_s=30  # timeout 0 would mean no limit at all
        # DTRAIN_GPU_DEADLINE: tests/gpu/conftest.py skips the tests left 30 s before it (and with pytest-timeout
        # fails one still running 10 s before it). A test still running at it gets SIGINT: pytest ends with its junit
        # XML, summary line and the test's summary.json (SIGTERM killed it outside a fit, and a fit's preemption
        # handler takes it inside one); a fit on SIGINT checkpoints at its next step and exits 130 (before training,
        # Lightning's sys.exit(1)), a failure, and pytest goes on. -v: the log names each test as it starts.
        DTRAIN_GPU_OUT="$runs" DTRAIN_GPU_DEADLINE=$(($(date +%s) + tests_s)) timeout -s INT -k 15 "$tests_s" \
            "$PY" -m pytest -v -ra --durations=0 -o faulthandler_timeout=120 -p no:cacheprovider tests/gpu \
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
        left=$((deadline - SECONDS - 15)) bench_s=${BENCH_S:-330}
        ((bench_s < left)) || bench_s=$((left > 30 ? left : 30))
        echo "benchmark: at most $bench_s s (TOTAL_S deadline)" | tee "$out/bench.log"
        # shellcheck disable=SC2086  # BENCH_ARGS: several words
        timeout -k 15 "$bench_s" "$PY" benchmarks/gpu.py --timeout "${CASE_S:-150}" --out-dir "$out" ${BENCH_ARGS:-} \
            2>&1 | tee -a "$out/bench.log" || rc=1
    fi
    return $rc
}

case "${1:-}" in
    wheels | check | run) "$@" ;;  # each takes its arguments' defaults
    *) sed -n '2,/^set /s/^# \{0,1\}//p' "$0"; exit 2 ;;  # the header comment
esac
