#!/usr/bin/env bash
# Run the conformance suite against a freshly started Fhirmament: a new data directory, a
# seeded patient (with a DocumentReference), a patient user, a practitioner token and the
# public client "inferno". Usage: conformance/run-local.sh <path to the fhirmament binary> [junit.xml]
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

admin=$("$bin" token --data-dir "$data" --base-url "$base" --scope 'system/*.cruds' --sub conformance-admin)
practitioner=$("$bin" token --data-dir "$data" --base-url "$base" --scope 'user/*.rs' \
  --fhir-user Practitioner/conformance-dr --sub conformance-dr --client-id conformance-ehr)
post() {
  curl -sf -X POST "$base/$1" -H "Authorization: Bearer $admin" -H 'Content-Type: application/fhir+json' -d "$2"
}
patient=$(post Patient '{"resourceType":"Patient","identifier":[{"system":"urn:oid:1.2.36.146.595.217.0.1","value":"CONF-12345"}],"name":[{"family":"Conformance","given":["Carol"]}],"gender":"female","birthDate":"1987-02-20"}' \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
post DocumentReference "{\"resourceType\":\"DocumentReference\",\"status\":\"current\",\"subject\":{\"reference\":\"Patient/$patient\"},\"type\":{\"coding\":[{\"system\":\"http://loinc.org\",\"code\":\"18842-5\",\"display\":\"Discharge summary\"}]},\"category\":[{\"coding\":[{\"system\":\"http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category\",\"code\":\"clinical-note\"}]}],\"date\":\"2024-03-01T10:00:00Z\",\"content\":[{\"attachment\":{\"contentType\":\"text/plain\",\"data\":\"RGlzY2hhcmdlZCBpbiBnb29kIGhlYWx0aC4=\"}}]}" >/dev/null
password="conformance-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
FHIRMAMENT_PASSWORD="$password" "$bin" users add --data-dir "$data" --username conformance-patient \
  --role patient --fhir-user "Patient/$patient" >/dev/null
"$bin" clients add --data-dir "$data" --client-id inferno --public \
  --redirect-uri http://localhost:4567/custom/smart/redirect \
  --scope 'launch launch/patient openid fhirUser offline_access patient/*.rs user/*.rs' >/dev/null

# A backend-services client (private_key_jwt, ES384) with a key made here.
python3 - "$work" <<'PY'
import json, sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
import jwt
key = ec.generate_private_key(ec.SECP384R1())
open(f"{sys.argv[1]}/backend.pem", "wb").write(key.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
public.update({"kid": "conformance-1", "alg": "ES384", "use": "sig"})
json.dump({"keys": [public]}, open(f"{sys.argv[1]}/backend-jwks.json", "w"))
PY
"$bin" clients add --data-dir "$data" --client-id conformance-backend --jwks "$work/backend-jwks.json" \
  --scope 'system/*.rs' >/dev/null

CONFORMANCE_PASSWORD="$password" CONFORMANCE_ADMIN_TOKEN="$admin" CONFORMANCE_PRACTITIONER_TOKEN="$practitioner" \
  python3 "$here/suite.py" --base "$base" --patient-user conformance-patient \
  --backend-client-id conformance-backend --backend-key "$work/backend.pem" ${junit:+--junit "$junit"} \
  ${CONFORMANCE_EXPECT_FAIL:+--expect-fail "$CONFORMANCE_EXPECT_FAIL"}
