#!/bin/sh
# Render the Alertmanager template from the environment (see alertmanager.yml), POSIX sh + awk only
# (runs in the busybox-based prom/alertmanager image).
#   render-alertmanager.sh TEMPLATE OUTPUT            render only
#   render-alertmanager.sh TEMPLATE OUTPUT -- ARGS... render, then exec alertmanager --config.file=OUTPUT ARGS
set -eu
template=${1:?usage: render-alertmanager.sh TEMPLATE OUTPUT [-- ALERTMANAGER_ARGS...]}
output=${2:?usage: render-alertmanager.sh TEMPLATE OUTPUT [-- ALERTMANAGER_ARGS...]}
shift 2
awk '
{
  line = $0
  if (match(line, /# if:[A-Z_]+/)) {
    name = substr(line, RSTART + 5, RLENGTH - 5)
    if (ENVIRON[name] == "") next
    sub(/[ \t]*# if:[A-Z_]+/, "", line)
  }
  out = ""
  while (match(line, /\$\{[A-Z_]+\}/)) {
    value = ENVIRON[substr(line, RSTART + 2, RLENGTH - 3)]
    gsub(/\\/, "\\\\", value)   # values land inside double-quoted YAML strings
    gsub(/"/, "\\\"", value)
    out = out substr(line, 1, RSTART - 1) value
    line = substr(line, RSTART + RLENGTH)
  }
  print out line
}' "$template" > "$output"
if [ "${1:-}" = "--" ]; then
  shift
  exec alertmanager --config.file="$output" "$@"
fi
