#!/usr/bin/env bash
# Checks the module layering of ../shared/design.md §2: each module may only name the turnpike modules
# listed for it. A module is src/NAME.rs or src/NAME/. Exits non-zero and names the offending line.
set -euo pipefail
cd "$(dirname "$0")/.."

# `clock` (Unix time) sits at the bottom: every module may use it.
declare -A allowed=(
  [clock]=""
  [wire]=""
  [auth]="wire budget"
  [policy]=""
  [budget]=""
  [route]="wire metrics"
  [server]="wire auth route policy budget"
  [config]="wire auth policy server api usage dataplane fleet xdp"
  [sys]=""
  [metrics]=""
  [dataplane]="wire route policy sys metrics budget auth"
  [control]="server route sys metrics dataplane wire auth policy config budget xdp"
  [usage]="metrics sys"
  [xdp]="route sys"
  [fleet]="usage"
  [api]="auth metrics usage policy"
  [reload]="config control server metrics api"
  [service]="wire auth policy route server sys metrics dataplane control config usage api fleet xdp"
  [sim]="wire auth route policy budget server dataplane control metrics"
)

status=0
for module in "${!allowed[@]}"; do
  files=()
  [ -f "src/$module.rs" ] && files+=("src/$module.rs")
  [ -d "src/$module" ] && while IFS= read -r f; do files+=("$f"); done < <(find "src/$module" -name '*.rs')
  [ ${#files[@]} -eq 0 ] && continue
  while IFS= read -r hit; do
    used=$(sed -E 's/.*crate::([a-z_]+).*/\1/' <<<"$hit")
    [ "$used" = "$module" ] && continue
    [ "$used" = "clock" ] && continue
    if ! grep -qw -- "$used" <<<"${allowed[$module]}"; then
      echo "layering: $module may not use crate::$used: $hit"
      status=1
    fi
  done < <(grep -Hn -oE 'crate::[a-z_]+' "${files[@]}" || true)
done
[ $status -eq 0 ] && echo "layering ok"
exit $status
