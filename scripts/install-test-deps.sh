#!/usr/bin/env bash
# System pieces the tests use for real: unixODBC with the SQLite driver (the ODBC result store
# and ODBC ingestion), PostgreSQL with its ODBC driver (the result store against a real server),
# Azurite from npm (Blob/Queue storage), Chromium with its WebDriver (the report opened in a real
# browser). Installs only what is missing; retries transient failures.
set -euo pipefail
cd "$(dirname "$0")/.."

retry() {  # retry CMD...: three attempts, a few seconds apart
  local attempt
  for attempt in 1 2 3; do
    "$@" && return 0
    echo "attempt $attempt of: $* failed" >&2
    [ "$attempt" = 3 ] || sleep $((attempt * 5))
  done
  return 1
}

need_apt=()
for pkg in unixodbc libsqliteodbc odbc-postgresql postgresql chromium chromium-driver; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  as_root=()
  [ "$(id -u)" = 0 ] || as_root=(sudo -n)
  if command -v apt-get >/dev/null 2>&1 && { [ ${#as_root[@]} = 0 ] || sudo -n true 2>/dev/null; }; then
    echo "installing ${need_apt[*]} with apt-get"
    retry "${as_root[@]}" apt-get update -qq
    retry "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "warning: ${need_apt[*]} missing and apt-get unavailable: ODBC and browser tests will be skipped" >&2
  fi
fi

if [ ! -x node_modules/.bin/azurite-blob ]; then
  if command -v npm >/dev/null 2>&1; then
    echo "installing azurite with npm"
    retry npm ci --no-audit --no-fund --silent >/dev/null
  else
    echo "warning: npm missing: Azurite tests will be skipped" >&2
  fi
fi
