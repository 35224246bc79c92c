#!/usr/bin/env bash
# The CUDA path's check on a GPU machine, as one command with a deadline.
#
#   here:        scripts/gpu-pack.sh gpu-pack            # build, write gpu-pack/ (<= 60 MiB)
#   on the GPU:  scripts/gpu-check.sh --pack gpu-pack    # the tree plus gpu-pack/, carried over
#   on a CPU:    scripts/gpu-check.sh --dry-run          # the same stages, tiny, no CUDA binary
#
# Stages, in order of value; each one runs under its own time cap inside one overall deadline:
#   prereq     the pack's sha256s, its binaries unpacked, `ldd` of each against the CUDA
#              libraries found, a visible GPU, the data subset laid out. A failure stops here.
#   tests      cuda_agreement, then cuda_trajectory, with MIXBENCH_REQUIRE_GPU=1. Unless they
#              pass, every later stage is skipped.
#   bench      runner bench on cuda:0, ResNet-18, batch 100, vanilla and MixUp, f32/tf32/bf16.
#   pytorch    bench/reference.py bench --step-only on the same device, shapes and precisions.
#   resnext50  the same two for ResNeXt-50 32x4d (tf32, bf16).
#   epoch      one ResNet-18 MixUp epoch on the real-data subset (5,000 train, 1,000 test).
# The JSON summary (see docs/performance.md, "Running the GPU check") goes to stdout and to
# OUT/summary.json on every exit path: done, failed prerequisite, deadline, SIGTERM/SIGINT.
# Logs and results are under OUT ($OUT when set, else gpu-check-out/). Everything else this
# script prints goes to stderr. Exit status: 0 when every stage is ok or skipped by choice or
# for lack of PyTorch, 1 when a stage failed or ran out of time, 2 when a prerequisite failed.
#
# Options:
#   --pack DIR         the folder scripts/gpu-pack.sh wrote (binaries, data subset, manifest)
#   --dry-run          CPU stand-in: the CPU runner (target/release/runner or --runner), width-8
#                      networks, 300/100 images (a prefix of --data / $CIFAR10_DIR / the pack's
#                      subset, else synthetic files). The tests stage runs --agreement-bin /
#                      --trajectory-bin when given (without MIXBENCH_REQUIRE_GPU), else
#                      `runner --check-config` on the epoch stage's config and data.
#   --deadline S       overall deadline in seconds (default 300; 180 with --dry-run). The stage
#                      caps below scale with it; a stage gets min(cap, time left - 5 s).
#   --budget STAGE=S   cap one stage at S seconds (repeatable)
#   --skip LIST        comma list of stages not to run (tests,bench,pytorch,resnext50,epoch)
#   --runner PATH      runner binary, plain, .gz or .xz (instead of the pack's)
#   --agreement-bin PATH, --trajectory-bin PATH   the two CUDA test binaries, likewise
#   --data DIR         CIFAR-10 .bin folder; a prefix of it is used (instead of the pack's)
#   --lib-dir DIR      one more folder of CUDA libraries to search first (repeatable)
#   --steps N          timed steps per bench (default 10; 1 with --dry-run)
#   --python PATH      the Python with PyTorch (default python3)
#   --out DIR          where summary.json and the logs go
# Test-only: GPU_CHECK_TEST_HANG=STAGE replaces that stage's first command by one that hangs
# (a shell and a child `sleep`, their pids in its log), to check that the cap is enforced.
set -uo pipefail

self_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$self_dir/.." && pwd)
cd "$repo" || exit 2
helper=(python3 "$repo/scripts/gpu-check-helper.py")
epoch_config=configs/cifar10/r18/mix_modemixup/r18_mixups_CE_none_alpha1_ep400.json

STAGES=(tests bench pytorch resnext50 epoch)
# Stage caps in seconds at the default 300 s deadline (they scale with --deadline); their sum
# plus RESERVE_MS is the deadline. Expected times on an H100 are well below each cap.
declare -A CAP=([prereq]=20 [tests]=80 [bench]=50 [pytorch]=35 [resnext50]=60 [epoch]=50)
CAP_TOTAL=295
RESERVE_MS=5000 # kept for killing the last stage and writing the summary
MIN_RUN_MS=1000 # a command with less time than this is not started

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

# ---------------------------------------------------------------------------------------------
# arguments (an error is reported through the summary, like every other stop)
mode=gpu
pack="" deadline="" skip_list="" runner_src="" agreement_src="" trajectory_src="" data_src=""
steps="" python=python3 out_dir="${OUT:-$repo/gpu-check-out}" arg_error=""
lib_dirs_extra=()
declare -A BUDGET=()
bad_arg() { arg_error=${arg_error:-$1}; } # the first one is reported
while [[ $# -gt 0 ]]; do
    case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) mode=dry-run; shift; continue ;;
    --pack | --deadline | --budget | --skip | --runner | --agreement-bin | --trajectory-bin | \
        --data | --lib-dir | --steps | --python | --out)
        if [[ $# -lt 2 || -z $2 ]]; then
            bad_arg "$1 needs a value"
            shift
            continue
        fi
        case $1 in
        --pack) pack=$2 ;;
        --deadline) deadline=$2 ;;
        --budget)
            if [[ $2 =~ ^(tests|bench|pytorch|resnext50|epoch|prereq)=([0-9]+)$ ]]; then
                BUDGET[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
            else
                bad_arg "--budget $2: expected STAGE=SECONDS with STAGE one of prereq ${STAGES[*]}"
            fi
            ;;
        --skip) skip_list=$2 ;;
        --runner) runner_src=$2 ;;
        --agreement-bin) agreement_src=$2 ;;
        --trajectory-bin) trajectory_src=$2 ;;
        --data) data_src=$2 ;;
        --lib-dir) lib_dirs_extra+=("$2") ;;
        --steps) steps=$2 ;;
        --python) python=$2 ;;
        --out) out_dir=$2 ;;
        esac
        shift 2
        ;;
    *) bad_arg "unknown argument $1 (see --help)"; shift ;;
    esac
done
if [[ $mode == dry-run ]]; then
    deadline=${deadline:-180} steps=${steps:-1}
    device=cpu torch_device=cpu batch=8 rx_batch=4 width_args=(--base-width 8)
    epoch_set=(--set model.backbone.base_width=8) want_train=300 want_test=100
    # No bf16 here: the runner refuses bf16 on the CPU (it has no CPU bf16 path).
    precisions=(f32 tf32) torch_dtypes=f32 rx_precisions=(f32) rx_torch_dtypes=f32
else
    deadline=${deadline:-300} steps=${steps:-10}
    device=cuda:0 torch_device=cuda:0 batch=100 rx_batch=100 width_args=()
    epoch_set=() want_train=5000 want_test=1000
    precisions=(f32 tf32 bf16) torch_dtypes=f32,tf32,bf16 rx_precisions=(tf32 bf16)
    rx_torch_dtypes=tf32,bf16
fi
if ! [[ $deadline =~ ^[0-9]+$ && $deadline -ge 10 ]]; then
    bad_arg "--deadline $deadline: expected whole seconds >= 10"
    deadline=300
fi
[[ $steps =~ ^[0-9]+$ && $steps -ge 1 ]] || bad_arg "--steps $steps: expected a positive number"
for s in ${skip_list//,/ }; do
    [[ " ${STAGES[*]} " == *" $s "* ]] || bad_arg "--skip $s: not one of ${STAGES[*]}"
done

# ---------------------------------------------------------------------------------------------
# bookkeeping
now_ms() { local t=${EPOCHREALTIME//[.,]/}; echo $((10#$t / 1000)); }
t0_ms=$(now_ms)
deadline_ms=$((t0_ms + deadline * 1000))
secs() { printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); } # ms -> seconds text
log() { printf 'gpu-check: [%ss] %s\n' "$(secs $(($(now_ms) - t0_ms)))" "$*" >&2; }
clean() { local s=${1//$'\t'/ }; s=${s//$'\r'/}; printf '%s' "${s//$'\n'/ }"; }

if ! mkdir -p "$out_dir"; then # no folder for the summary: it goes to stdout alone
    echo "gpu-check: cannot create the output folder $out_dir" >&2
    printf '{"ok": false, "exit_code": 2, "error": "cannot create the output folder %s"}\n' "$(clean "${out_dir//\"/\'}")"
    exit 2
fi
out_dir=$(cd "$out_dir" && pwd)
rm -rf "$out_dir/state" "$out_dir/logs" "$out_dir/results" "$out_dir/epoch" "$out_dir/summary.json"
mkdir -p "$out_dir/state" "$out_dir/logs" "$out_dir/results" "$out_dir/epoch"
scratch=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
meta() { printf '%s\t%s\n' "$1" "$(clean "$2")" >>"$out_dir/state/meta.tsv"; }
meta mode "$mode"
meta deadline_s "$deadline"

declare -A stage_done=()
cur_stage="" cur_pid="" cur_run="" stop_reason="" interrupted="" last_status=""
hang_armed=${GPU_CHECK_TEST_HANG:-}
stage_t0=0 stage_end_ms=0 stage_budget_ms=0 n_ok=0 n_failed=0 n_oot=0 stage_reason=""

record_stage() { # STAGE STATUS SECONDS BUDGET REASON
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(clean "$5")" >>"$out_dir/state/stages.tsv"
    stage_done[$1]=1
}
record_run() { # STAGE NAME KIND STATUS RC SECONDS BUDGET LOG RESULT REASON
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$8" "$9" \
        "$(clean "${10}")" >>"$out_dir/state/runs.tsv"
    case $4 in
    ok) n_ok=$((n_ok + 1)) ;;
    failed) n_failed=$((n_failed + 1)) ;;
    "out of time") n_oot=$((n_oot + 1)) ;;
    esac
}

cap_ms() { # a stage's cap: --budget, else its share of the deadline
    if [[ -n ${BUDGET[$1]:-} ]]; then
        echo $((BUDGET[$1] * 1000))
    else
        echo $((CAP[$1] * (deadline * 1000 - RESERVE_MS) / CAP_TOTAL))
    fi
}

stage_begin() { # STAGE
    cur_stage=$1 stage_t0=$(now_ms) n_ok=0 n_failed=0 n_oot=0 stage_reason=""
    local cap left
    cap=$(cap_ms "$1")
    left=$((deadline_ms - RESERVE_MS - stage_t0))
    ((left < 0)) && left=0
    stage_budget_ms=$((cap < left ? cap : left))
    stage_end_ms=$((stage_t0 + stage_budget_ms))
    log "stage $1 (up to $(secs "$stage_budget_ms") s)"
}

stage_finish() { # [STATUS REASON]: the status of its runs unless given
    local status=${1:-} reason=${2:-$stage_reason}
    if [[ -z $status ]]; then
        if ((n_failed > 0)); then status=failed
        elif ((n_oot > 0)); then status="out of time"
        elif ((n_ok > 0)); then status=ok
        else status=skipped
        fi
    fi
    record_stage "$cur_stage" "$status" "$(secs $(($(now_ms) - stage_t0)))" \
        "$(secs "$stage_budget_ms")" "$reason"
    log "stage $cur_stage: $status${reason:+ ($reason)}"
    cur_stage="" last_status=$status
}

# run STAGE-RUN-NAME KIND SHARE LOG RESULT -- COMMAND...: runs COMMAND under `timeout` with
# (time left in the stage) / SHARE seconds, SHARE being the number of runs the stage has left,
# so that a hung command leaves the stage's other commands their part. `timeout` puts the
# command in its own process group and signals the whole group at the cap. RESULT (when not
# empty) receives stdout; LOG receives stderr (and stdout when RESULT is empty).
run() {
    local name=$1 kind=$2 share=$3 logf=$4 result=$5
    shift 6
    local start budget rc status reason=""
    start=$(now_ms)
    budget=$(((stage_end_ms - start) / share))
    ((budget < 0)) && budget=0
    if ((budget < MIN_RUN_MS)); then
        record_run "$cur_stage" "$name" "$kind" "out of time" "" 0 "$(secs "$budget")" "" "" \
            "not started: $(secs "$budget") s left for it"
        log "  $name: out of time (not started)"
        return 1
    fi
    if [[ $hang_armed == "$cur_stage" ]]; then
        hang_armed=""
        set -- bash -c 'sleep 3600 & echo "gpu-check test hang: pids $$ $!" >&2; wait'
    fi
    if [[ -n $result ]]; then
        timeout -k 2 "$(secs "$budget")" "$@" >"$out_dir/$result" 2>"$out_dir/$logf" &
    else
        timeout -k 2 "$(secs "$budget")" "$@" >"$out_dir/$logf" 2>&1 &
    fi
    cur_pid=$! cur_run="$name|$kind|$start|$budget|$logf|$result"
    wait "$cur_pid"
    rc=$?
    cur_pid="" cur_run=""
    local took=$(($(now_ms) - start))
    if ((rc == 0)); then
        status=ok
    elif ((rc == 124 || (rc == 137 && took >= budget))); then
        status="out of time" reason="killed at its $(secs "$budget") s cap"
    else
        status=failed reason="exit status $rc"
    fi
    record_run "$cur_stage" "$name" "$kind" "$status" "$rc" "$(secs "$took")" "$(secs "$budget")" \
        "$logf" "$result" "$reason"
    log "  $name: $status ($(secs "$took") s)"
    [[ $status == ok ]]
}

# shellcheck disable=SC2317 # called from the traps
kill_current() { # the running command's whole process group: TERM, then KILL after 2 s
    [[ -n $cur_pid ]] || return 0
    kill -TERM -- "-$cur_pid" 2>/dev/null || kill -TERM "$cur_pid" 2>/dev/null
    local i
    for ((i = 0; i < 20; i++)); do
        kill -0 "$cur_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$cur_pid" 2>/dev/null
    wait "$cur_pid" 2>/dev/null
    local name kind start budget logf result
    IFS='|' read -r name kind start budget logf result <<<"$cur_run"
    record_run "$cur_stage" "$name" "$kind" "out of time" "" "$(secs $(($(now_ms) - start)))" \
        "$(secs "$budget")" "$logf" "$result" "interrupted by $interrupted"
    cur_pid=""
}

# shellcheck disable=SC2317 # called from the traps
finish() {
    local rc=$?
    trap - EXIT TERM INT HUP
    kill_current
    [[ -n $interrupted ]] && stop_reason=${stop_reason:-"interrupted by $interrupted"} && meta interrupted "$interrupted"
    if [[ -n $cur_stage ]]; then
        # A stage cut short by a signal did not finish, whatever its finished runs said.
        if [[ -n $interrupted ]] && ((n_failed == 0)); then
            stage_finish "out of time" "$stop_reason"
        else
            stage_finish "" "$stop_reason"
        fi
    fi
    local s
    for s in prereq "${STAGES[@]}"; do
        [[ -n ${stage_done[$s]:-} ]] || record_stage "$s" skipped "" "" "${stop_reason:-not reached (exit $rc)}"
    done
    meta elapsed_s "$(secs $(($(now_ms) - t0_ms)))"
    local code
    timeout 30 "${helper[@]}" summary "$out_dir" >"$out_dir/summary.json" 2>"$out_dir/state/summary.log"
    code=$?
    if ((code > 2)) || ! [[ -s $out_dir/summary.json ]]; then
        # The helper failed (no python3?): the stage statuses alone, so that something is said.
        {
            printf '{"error": "summary helper failed (exit %s), see state/summary.log", "stages": {' "$code"
            local first=1 st status
            while IFS=$'\t' read -r st status _; do
                ((first)) || printf ', '
                first=0
                printf '"%s": "%s"' "$st" "$status"
            done <"$out_dir/state/stages.tsv"
            printf '}}\n'
        } >"$out_dir/summary.json"
        code=1
    fi
    cat "$out_dir/summary.json"
    rm -rf "$scratch"
    log "done, exit $code; summary in $out_dir/summary.json"
    exit "$code"
}
# shellcheck disable=SC2317 # called from the traps
on_signal() { interrupted=$1; exit 1; }
trap finish EXIT
trap 'on_signal SIGTERM' TERM
trap 'on_signal SIGINT' INT
trap 'on_signal SIGHUP' HUP

prereq_fail() { # one clear line, the summary says the same, nothing else runs
    log "PREREQUISITE FAILED: $1"
    stop_reason="prerequisites failed"
    stage_finish failed "$1"
    exit 2
}

# ---------------------------------------------------------------------------------------------
# prereq
stage_begin prereq
prereq_log="$out_dir/logs/prereq.log"
[[ -z $arg_error ]] || prereq_fail "$arg_error"
# One prerequisite step, bounded at 20 s: its output goes to the prereq log and into $out,
# its last line into $last.
bounded() {
    local rc
    out=$(timeout -k 2 20 "$@" 2>&1)
    rc=$?
    printf '$ %s\n%s\n' "$*" "$out" >>"$prereq_log"
    last=$(printf '%s\n' "$out" | sed '/^$/d' | tail -n 1)
    return "$rc"
}
out="" last=""

if [[ -n $pack ]]; then
    [[ -d $pack ]] || prereq_fail "--pack $pack: no such folder (make it with scripts/gpu-pack.sh)"
    pack=$(cd "$pack" && pwd)
    bounded "${helper[@]}" manifest-verify "$pack" || prereq_fail "${last:-manifest check failed}"
    IFS=$'\t' read -r commit describe features < <(python3 -c 'import json, sys
m = json.load(open(sys.argv[1]))
print(m.get("commit", ""), m.get("describe", ""), m.get("features", ""), sep="\t")' "$pack/manifest.json")
    meta pack_dir "$pack"
    meta pack_commit "${commit:-}"
    meta pack_describe "${describe:-}"
    meta pack_features "${features:-}"
    log "pack $pack: manifest ok (${describe:-?}, features ${features:-?})"
fi

mkdir -p "$scratch/bin"
unpack() { # SRC NAME: prints the path of the runnable binary; .gz / .xz (or not executable)
    local src=$1 dst="$scratch/bin/$2"
    [[ -f $src ]] || return 1
    case $src in
    *.gz) gzip -dc "$src" >"$dst" ;;
    *.xz) xz -dc "$src" >"$dst" 2>/dev/null ||
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$src" >"$dst" ;;
    *)
        if [[ -x $src ]]; then
            echo "$(cd "$(dirname "$src")" && pwd)/$(basename "$src")"
            return 0
        fi
        cp "$src" "$dst"
        ;;
    esac || return 1
    chmod +x "$dst" && echo "$dst"
}
pick() { # explicit source, else the pack's bin/NAME.xz / .gz / plain
    local given=$1 name=$2 ext
    if [[ -n $given ]]; then echo "$given"; return; fi
    [[ -n $pack ]] || return 0
    for ext in .xz .gz ""; do
        [[ -f $pack/bin/$name$ext ]] && { echo "$pack/bin/$name$ext"; return; }
    done
}

if [[ $mode == gpu ]]; then
    runner_src=$(pick "$runner_src" runner)
    agreement_src=$(pick "$agreement_src" cuda_agreement)
    trajectory_src=$(pick "$trajectory_src" cuda_trajectory)
    [[ -n $runner_src ]] || prereq_fail "no CUDA runner: give --pack DIR (made by scripts/gpu-pack.sh) or --runner PATH"
    [[ -n $agreement_src ]] || prereq_fail "no cuda_agreement test binary: give --pack DIR or --agreement-bin PATH"
    [[ -n $trajectory_src ]] || prereq_fail "no cuda_trajectory test binary: give --pack DIR or --trajectory-bin PATH"
else
    runner_src=${runner_src:-$repo/target/release/runner}
    [[ -x $runner_src || $runner_src == *.gz || $runner_src == *.xz ]] ||
        prereq_fail "--runner $runner_src: not an executable (build it: cargo build --release -p runner)"
fi
runner=$(unpack "$runner_src" runner) || prereq_fail "--runner $runner_src: cannot read or unpack it"
agreement="" trajectory=""
if [[ -n $agreement_src ]]; then
    agreement=$(unpack "$agreement_src" cuda_agreement) || prereq_fail "$agreement_src: cannot read or unpack it"
fi
if [[ -n $trajectory_src ]]; then
    trajectory=$(unpack "$trajectory_src" cuda_trajectory) || prereq_fail "$trajectory_src: cannot read or unpack it"
fi
meta runner "$runner_src"

if [[ $mode == gpu ]]; then
    # The CUDA libraries: --lib-dir, then the nvidia-* wheels of python3, then what the
    # environment already had.
    mapfile -t found_dirs < <(timeout 20 "${helper[@]}" libdirs 2>>"$prereq_log")
    lib_path=""
    for d in "${lib_dirs_extra[@]}" "${found_dirs[@]}"; do
        [[ -d $d ]] && lib_path=${lib_path:+$lib_path:}$d
    done
    export LD_LIBRARY_PATH=$lib_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    meta lib_dirs "$lib_path"
    log "library folders: ${lib_path:-none found (no nvidia-* wheels in python3)}"
    libs=""
    for b in "$runner" "$agreement" "$trajectory"; do
        ldd_out=$(timeout 20 ldd "$b" 2>&1)
        rc=$?
        printf '$ ldd %s\n%s\n' "$b" "$ldd_out" >>"$prereq_log"
        ((rc == 0)) || prereq_fail "$(basename "$b"): ldd failed: $(printf '%s' "$ldd_out" | head -n 1)"
        missing=$(printf '%s\n' "$ldd_out" | awk '/=> not found/ {print $1}' | sort -u | tr '\n' ' ')
        [[ -z $missing ]] || prereq_fail "$(basename "$b") cannot load: ${missing% } not found (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"
        while read -r lib path; do
            [[ ";$libs" == *";$lib="* ]] || libs="$libs$lib=$path;"
        done < <(printf '%s\n' "$ldd_out" | awk '$1 ~ /^lib(cuda|cudart|cublas|cublasLt|curand|cudnn|nvrtc)\.so/ {print $1, $3}')
    done
    # The build's link-only libcuda stub must never stand in for the driver.
    libcuda=$(tr ';' '\n' <<<"$libs" | sed -n 's/^libcuda\.so[^=]*=//p' | head -n 1)
    if [[ -n $libcuda && $(readlink -f "$libcuda") == */stubs/* ]]; then
        prereq_fail "libcuda resolves to the build's link-only stub, not the driver: $libcuda -> $(readlink -f "$libcuda")"
    fi
    meta libraries "$libs"
    log "libraries: ${libs//;/ }"

    # A visible GPU.
    case ${CUDA_VISIBLE_DEVICES-unset} in
    "" | -1) prereq_fail "CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES}' hides every GPU" ;;
    esac
    if command -v nvidia-smi >/dev/null; then
        bounded nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader ||
            prereq_fail "no CUDA device visible: nvidia-smi: ${last:-no output}"
        gpus=$(printf '%s\n' "$out" | grep -E '^[0-9]+,' | tr '\n' ';')
        [[ -n $gpus ]] || prereq_fail "no CUDA device visible: nvidia-smi lists no GPU"
        meta gpus "${gpus%;}"
        log "GPUs: ${gpus%;}"
    elif compgen -G '/dev/nvidia[0-9]*' >/dev/null; then
        meta gpus "$(ls /dev/nvidia[0-9]*) (no nvidia-smi)"
    else
        prereq_fail "no CUDA device visible: no nvidia-smi and no /dev/nvidia0"
    fi
else
    bounded "$runner" --help || prereq_fail "$runner_src does not run: $last"
fi

# The data: a prefix subset of the official files, laid out as the runner's loader wants.
subset="$scratch/subset"
if [[ -n $data_src ]] || [[ -z $pack && -n ${CIFAR10_DIR:-} ]]; then
    src=${data_src:-$CIFAR10_DIR}
    bounded "${helper[@]}" subset "$src" "$subset" --train "$want_train" --test "$want_test" ||
        prereq_fail "data: $last"
    data_source="first $want_train/$want_test records of $src"
elif [[ -n $pack ]]; then
    [[ -f $pack/data/data_batch_1.bin && -f $pack/data/test_batch.bin ]] ||
        prereq_fail "--pack $pack: no data/data_batch_1.bin and data/test_batch.bin"
    subset="$pack/data"
    data_source="pack subset"
elif [[ $mode == dry-run ]]; then
    bounded "${helper[@]}" synthetic "$subset" --train "$want_train" --test "$want_test" ||
        prereq_fail "data: $last"
    data_source="synthetic (no --data, CIFAR10_DIR or pack)"
else
    prereq_fail "no data: give --pack DIR, --data DIR or CIFAR10_DIR"
fi
data="$scratch/cifar10"
bounded "${helper[@]}" layout "$subset" "$data" || prereq_fail "data: $last"
read -r train_records test_records <<<"$last"
meta data_source "$data_source"
meta train_records "$train_records"
meta test_records "$test_records"
epoch_train=$((want_train < train_records ? want_train : train_records))
epoch_test=$((want_test < test_records ? want_test : test_records))
log "data: $data_source ($train_records train, $test_records test records)"
stage_finish ok

# ---------------------------------------------------------------------------------------------
# the stages
skipped_by_flag() { [[ ",$skip_list," == *",$1,"* ]]; }
gate() { # STAGE: 0 when it should run; otherwise records it as skipped
    if [[ -n $stop_reason ]]; then
        cur_stage=$1 stage_t0=$(now_ms) stage_budget_ms=0
        stage_finish skipped "$stop_reason"
        return 1
    fi
    if skipped_by_flag "$1"; then
        cur_stage=$1 stage_t0=$(now_ms) stage_budget_ms=0
        stage_finish skipped "--skip $1"
        return 1
    fi
    stage_begin "$1"
}
torch_why="?"
torch_missing() { # why PyTorch cannot run (empty when it can), found without importing torch
    if [[ $torch_why == "?" ]]; then
        torch_why=$("$python" -c 'import importlib.util as u
missing = [m for m in ("torch", "numpy") if u.find_spec(m) is None]
print(", ".join(missing) + " not installed" if missing else "")' 2>/dev/null) ||
            torch_why="$python does not run"
        [[ -n $torch_why ]] && torch_why="$python: $torch_why"
    fi
    echo "$torch_why"
}

if gate tests; then
    if [[ -n $agreement || -n $trajectory ]]; then
        require=()
        [[ $mode == gpu ]] && require=(MIXBENCH_REQUIRE_GPU=1)
        shares=0
        [[ -n $agreement ]] && shares=$((shares + 1))
        [[ -n $trajectory ]] && shares=$((shares + 1))
        if [[ -n $agreement ]]; then
            run cuda_agreement rust-test "$shares" logs/tests-cuda_agreement.log "" -- \
                env "${require[@]}" CIFAR10_DIR="$data" "$agreement" --test-threads=1
            shares=$((shares - 1))
        fi
        if [[ -n $trajectory ]]; then
            run cuda_trajectory rust-test "$shares" logs/tests-cuda_trajectory.log "" -- \
                env "${require[@]}" CIFAR10_DIR="$data" "$trajectory" --nocapture
        fi
    else
        # Dry run without test binaries: the runner checks the epoch stage's config, data (the
        # subset, with the epoch stage's limits) and model.
        run check-config check-config 1 logs/tests-check-config.log "" -- \
            "$runner" --config "$epoch_config" --data "$data" --epochs 1 --check-config \
            --limit-train "$epoch_train" --limit-test "$epoch_test" "${epoch_set[@]}"
    fi
    stage_finish
    [[ $last_status == ok ]] || stop_reason="tests $last_status"
fi

bench_args=(--batch "$batch" "${width_args[@]}" --steps "$steps" --device "$device")
if gate bench; then
    left=${#precisions[@]}
    for p in "${precisions[@]}"; do
        run "resnet18-$p" runner-bench "$left" "logs/bench-resnet18-$p.log" "results/bench-resnet18-$p.json" -- \
            "$runner" bench --arch resnet18 "${bench_args[@]}" --step-modes vanilla,mixup \
            --mix-modes mixup --precision "$p"
        left=$((left - 1))
    done
    stage_finish
fi

torch_args=(--mix mixup --device "$torch_device" "${width_args[@]}" --steps "$steps" --step-only)
if gate pytorch; then
    why=$(torch_missing)
    if [[ -n $why ]]; then
        record_run pytorch resnet18 pytorch-bench skipped "" 0 "" "" "" "$why"
        stage_reason=$why
    else
        run resnet18 pytorch-bench 1 logs/pytorch-resnet18.log results/pytorch-resnet18.jsonl -- \
            "$python" bench/reference.py bench --arch resnet18 --batch "$batch" "${torch_args[@]}" \
            --dtype "$torch_dtypes"
    fi
    stage_finish
fi

if gate resnext50; then
    why=$(torch_missing)
    left=$((${#rx_precisions[@]} + 1))
    for p in "${rx_precisions[@]}"; do
        run "resnext50-$p" runner-bench "$left" "logs/bench-resnext50-$p.log" "results/bench-resnext50-$p.json" -- \
            "$runner" bench --arch resnext50 --batch "$rx_batch" "${width_args[@]}" --steps "$steps" \
            --device "$device" --step-modes mixup --mix-modes mixup --precision "$p"
        left=$((left - 1))
    done
    if [[ -n $why ]]; then
        record_run resnext50 pytorch-resnext50 pytorch-bench skipped "" 0 "" "" "" "$why"
    else
        run pytorch-resnext50 pytorch-bench 1 logs/pytorch-resnext50.log results/pytorch-resnext50.jsonl -- \
            "$python" bench/reference.py bench --arch resnext50 --batch "$rx_batch" "${torch_args[@]}" \
            --dtype "$rx_torch_dtypes"
    fi
    stage_finish
fi

if gate epoch; then
    meta epoch_train_images "$epoch_train"
    meta epoch_test_images "$epoch_test"
    run resnet18-mixup epoch 1 logs/epoch.log "" -- \
        "$runner" --config "$epoch_config" --data "$data" --epochs 1 --limit-train "$epoch_train" \
        --limit-test "$epoch_test" --device "$device" --work-dir "$scratch/epoch" --quiet "${epoch_set[@]}"
    for f in "$scratch"/epoch/metrics.csv "$scratch"/epoch/result.json "$scratch"/epoch/*.log.json; do
        [[ -f $f ]] && cp "$f" "$out_dir/epoch/"
    done
    stage_finish
fi
exit 0
