# Shared by the benchmarks (bench.sh, bench-guest.sh, bench-ports.sh, bench-tls.sh); sourced,
# not run.
#
# The caller sets ROOT (the checkout). Provides:
#   bench_workdir NAME           makes the scratch directory WORK and the list PIDS of background
#                                processes: at exit they are killed and WORK removed (kept, and
#                                named, when BENCH_KEEP is set)
#   TCK                          clock ticks per second (/proc/PID/stat counts in ticks)
#   cpu_ticks PID                utime + stime of a process, all threads; 0 when it is gone
#   run_leg NAME PIDFILE TIMEOUT -- run-guest.sh args...
#                                ($RUN_GUEST, when set, is the command run instead of run-guest.sh,
#                                split on spaces: e.g. a wrapper that enters a network namespace)
#                                boots the test guest; streams its console prefixed with [NAME]
#                                into $WORK/NAME.console; at each "BENCH-MARK m" line the guest
#                                prints, appends "m backend-ticks qemu-ticks" to $WORK/NAME.marks
#                                (the backend's pid read from PIDFILE). Returns run-guest.sh's status.
#   mark_seconds NAME FROM TO    backend CPU seconds between two marks ("n/a" when one is missing)
#   per A B / ratio A B          A/B with two decimals, "n/a" when either is n/a or B is 0

TCK="$(getconf CLK_TCK)"

bench_workdir() {
    BENCH_NAME="$1"
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/netfence-$1.XXXXXX")"
    PIDS=()
    trap bench_cleanup EXIT
}

bench_cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${BENCH_KEEP:-}" ]; then echo "$BENCH_NAME.sh: kept $WORK"; else rm -rf "$WORK"; fi
}

cpu_ticks() { [ -n "$1" ] || { echo 0; return; }; awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }

run_leg() {
    local name="$1" pidfile="$2" timeout="$3"
    shift 4
    local qpid="$WORK/$name.qemu.pid"
    : >"$WORK/$name.marks"
    local cmd=("$ROOT/scripts/run-guest.sh")
    [ -n "${RUN_GUEST:-}" ] && read -r -a cmd <<<"$RUN_GUEST"
    set +e
    "${cmd[@]}" --timeout "$timeout" --qemu-pidfile "$qpid" "$@" 2>&1 |
        while IFS= read -r line; do
            line="${line%$'\r'}" # the serial console ends lines with CR LF
            printf '%s\n' "$line" >>"$WORK/$name.console"
            printf '  [%s] %s\n' "$name" "$line"
            case "$line" in
                *BENCH-MARK*)
                    local m="${line##*BENCH-MARK }"
                    echo "$m $(cpu_ticks "$(cat "$pidfile" 2>/dev/null)") $(cpu_ticks "$(cat "$qpid" 2>/dev/null)")" >>"$WORK/$name.marks"
                    ;;
            esac
        done
    local rc=${PIPESTATUS[0]}
    set -e
    return "$rc"
}

mark_seconds() {
    awk -v from="$2" -v to="$3" -v tck="$TCK" '
        $1 == from { a = $2; f = 1 }
        $1 == to   { b = $2; t = 1 }
        END { if (f && t) printf "%.2f\n", (b - a) / tck; else print "n/a" }' "$WORK/$1.marks" 2>/dev/null ||
        echo "n/a"
}

per() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "n/a" || b == "n/a" || b == 0) print "n/a"; else printf "%.2f", a / b }'; }
ratio() { per "$@"; }
