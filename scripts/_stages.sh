# Sourced by speedrun.sh and cpu_demo.sh: `stage NAME command args...` runs the command unless $STATE_DIR/NAME.done
# exists, then marks it, so a crashed run restarts where it stopped (delete $STATE_DIR or pass --fresh to run all
# again). STOP_AFTER=NAME: exit once stage NAME is done. DRY_RUN=1: print the commands.

stage() {
  local name="$1"; shift
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "[$PIPELINE] $name: $*"; return 0; fi
  if [ -f "$STATE_DIR/$name.done" ]; then
    echo "[$PIPELINE] skip $name (done $(cat "$STATE_DIR/$name.done"))"
    if [ "${STOP_AFTER:-}" = "$name" ]; then exit 0; fi
    return 0
  fi
  echo "[$PIPELINE] ==> $name"
  echo "[$PIPELINE]     $*"
  local t0=$SECONDS
  "$@"
  mkdir -p "$STATE_DIR"
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - t0))s" > "$STATE_DIR/$name.done"
  echo "[$PIPELINE] <== $name done in $((SECONDS - t0))s (total ${SECONDS}s)"
  if [ "${STOP_AFTER:-}" = "$name" ]; then echo "[$PIPELINE] stopping after $name (--stop-after)"; exit 0; fi
}
