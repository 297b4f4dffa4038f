#!/bin/sh
# Run the trekeys drills, then prune old report folders, for a scheduler.
#
# The exit status is the drills' own: 0 only when every drill passed, so that
# systemd marks the service failed and cron's wrapper can alert. A failed prune
# turns a passing run into status 1 as well, because reports would pile up.
#
# Settings come from the environment (systemd's EnvironmentFile, or cron):
#   TREKEYS              the trekeys command (default: trekeys on PATH)
#   TREKEYS_LAB          the TRE folder the drills run against
#   TREKEYS_REPORTS      the reports folder
#   TREKEYS_KEEP         how many run folders to keep (default 12)
#   TREKEYS_SHARE_FILES  custodian share files, ':'-separated (read by trekeys)
# Extra arguments go to 'trekeys drill', for example drill names.
set -u

trekeys=${TREKEYS:-trekeys}
lab=${TREKEYS_LAB:?set TREKEYS_LAB to the TRE folder}
reports=${TREKEYS_REPORTS:?set TREKEYS_REPORTS to the reports folder}
keep=${TREKEYS_KEEP:-12}

"$trekeys" drill --lab "$lab" --out "$reports" "$@"
status=$?

if [ -d "$reports" ]; then
  if ! "$trekeys" report prune --out "$reports" --keep "$keep"; then
    echo "run-drills: pruning $reports failed" >&2
    [ "$status" -eq 0 ] && status=1
  fi
fi

echo "run-drills: trekeys drill exited with status $status" >&2
exit "$status"
