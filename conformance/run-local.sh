#!/usr/bin/env bash
# Run the conformance suite against a freshly started Fhirmament: a new data directory, seeded
# by seed.sh (a patient with a DocumentReference, a patient user, a practitioner token, the
# public client "inferno", a backend client and the Inferno presets filled in). Usage: conformance/run-local.sh <path to the fhirmament binary> [junit.xml]
# With CONFORMANCE_MUTATE=<mutations> the suite talks to the server through mutating_proxy.py,
# which breaks those behaviours on purpose (the suite's own test), and CONFORMANCE_EXPECT_FAIL
# lists the check ids that must then fail — exactly those.
set -euo pipefail
bin="$(realpath "$1")"
junit="${2:-}"
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port/fhir"
data="$work/data"
export FHIRMAMENT_LOG=warn
listen_port=$port
proxy=""
if [ -n "${CONFORMANCE_MUTATE:-}" ]; then
  listen_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  python3 "$here/mutating_proxy.py" "$port" "$listen_port" "$CONFORMANCE_MUTATE" &
  proxy=$!
fi
"$bin" serve --listen "127.0.0.1:$listen_port" --data-dir "$data" --base-url "$base" >"$work/server.log" 2>&1 &
server=$!
trap 'kill $server $proxy 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 200); do
  curl -sf "$base/metadata" >/dev/null && break
  sleep 0.1
done
curl -sf "$base/metadata" >/dev/null || { cat "$work/server.log"; exit 1; }

"$here/seed.sh" "$bin" "$data" "$base" "$work/seed"
# shellcheck disable=SC1091
. "$work/seed/seed.env"

CONFORMANCE_PASSWORD="$password" CONFORMANCE_ADMIN_TOKEN="$admin" CONFORMANCE_PRACTITIONER_TOKEN="$practitioner" \
  python3 "$here/suite.py" --base "$base" --patient-user conformance-patient \
  --backend-client-id conformance-backend --backend-key "$backend_key" \
  --verifier "$bin verify --genesis $data/ledger/genesis.json" --inferno-presets "$work/seed/inferno" \
  ${junit:+--junit "$junit"} \
  ${CONFORMANCE_EXPECT_FAIL:+--expect-fail "$CONFORMANCE_EXPECT_FAIL"}
