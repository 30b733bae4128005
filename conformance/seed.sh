#!/usr/bin/env bash
# Seed a running Fhirmament for a conformance run, by this suite or by real Inferno: a patient
# with a DocumentReference and a deceased one of the same family, a patient user, the public
# client "inferno", a backend-services client with a key made here, an admin and a practitioner
# token, and the Inferno presets filled in for this server.
#
#   conformance/seed.sh <fhirmament binary> <data dir> <FHIR base URL> <out dir>
#
# The base URL is what clients (Inferno's container) use; set SEED_API to reach the server
# from here when that differs (e.g. base http://host.docker.internal:8080/fhir, SEED_API
# http://127.0.0.1:8080/fhir). Writes <out>/seed.env (shell assignments: patient, doc,
# password, admin, practitioner, backend_key), <out>/backend.pem, <out>/backend-jwks.json and
# <out>/inferno/*.json.
set -euo pipefail
bin="$(realpath "$1")"
data="$2"
base="${3%/}"
out="$4"
api="${SEED_API:-$base}"
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$out/inferno"

admin=$("$bin" token --data-dir "$data" --base-url "$base" --scope 'system/*.cruds' --sub conformance-admin)
practitioner=$("$bin" token --data-dir "$data" --base-url "$base" --scope 'user/*.rs' \
  --fhir-user Practitioner/conformance-dr --sub conformance-dr --client-id conformance-ehr)
# A day-long read token for Inferno's US Core kit, which takes a token rather than launching.
reader=$("$bin" token --data-dir "$data" --base-url "$base" --scope 'system/*.rs' --sub inferno-us-core \
  --client-id inferno --ttl-seconds 86400)
post() {
  curl -sf -X POST "$api/$1" -H "Authorization: Bearer $admin" -H 'Content-Type: application/fhir+json' -d "$2"
}
id_of() { python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'; }
patient=$(post Patient '{"resourceType":"Patient","identifier":[{"system":"urn:oid:1.2.36.146.595.217.0.1","value":"CONF-12345"}],"name":[{"family":"Conformance","given":["Carol"]}],"gender":"female","birthDate":"1987-02-20"}' | id_of)
# A second patient of the same family who has died, for the death-date search.
deceased=$(post Patient '{"resourceType":"Patient","identifier":[{"system":"urn:oid:1.2.36.146.595.217.0.1","value":"CONF-12346"}],"name":[{"family":"Conformance","given":["Dora"]}],"gender":"female","birthDate":"1931-07-04","deceasedDateTime":"2023-05-01T08:30:00Z"}' | id_of)
doc=$(post DocumentReference "{\"resourceType\":\"DocumentReference\",\"status\":\"current\",\"subject\":{\"reference\":\"Patient/$patient\"},\"type\":{\"coding\":[{\"system\":\"http://loinc.org\",\"code\":\"18842-5\",\"display\":\"Discharge summary\"}]},\"category\":[{\"coding\":[{\"system\":\"http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category\",\"code\":\"clinical-note\"}]}],\"date\":\"2024-03-01T10:00:00Z\",\"content\":[{\"attachment\":{\"contentType\":\"text/plain\",\"data\":\"RGlzY2hhcmdlZCBpbiBnb29kIGhlYWx0aC4=\"}}]}" | id_of)
password="conformance-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
FHIRMAMENT_PASSWORD="$password" "$bin" users add --data-dir "$data" --username conformance-patient \
  --role patient --fhir-user "Patient/$patient" >/dev/null
"$bin" clients add --data-dir "$data" --client-id inferno --public \
  --redirect-uri http://localhost:4567/custom/smart/redirect --redirect-uri http://localhost/custom/smart/redirect \
  --scope 'launch launch/patient openid fhirUser offline_access patient/*.rs user/*.rs' >/dev/null

# A backend-services client (private_key_jwt, ES384) with a key made here.
python3 - "$out" <<'PY'
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
"$bin" clients add --data-dir "$data" --client-id conformance-backend --jwks "$out/backend-jwks.json" \
  --scope 'system/*.rs' >/dev/null

# The presets, with this server's URL, the seeded patient and the reader token filled in.
python3 - "$here/inferno" "$out/inferno" "$base" "$patient,$deceased" "$reader" <<'PY'
import json, os, sys
src, dst, base, patient, token = sys.argv[1:]
for name in sorted(os.listdir(src)):
    if not name.endswith(".json"):
        continue
    preset = json.load(open(os.path.join(src, name)))
    for field in preset["inputs"]:
        if field["name"] == "url":
            field["value"] = base
        elif field["name"] == "patient_ids":
            field["value"] = patient
        elif field["name"] == "smart_credentials":
            field["value"] = json.dumps({"access_token": token})
    json.dump(preset, open(os.path.join(dst, name), "w"), indent=2)
PY

cat >"$out/seed.env" <<ENV
patient='$patient'
doc='$doc'
password='$password'
admin='$admin'
practitioner='$practitioner'
backend_key='$out/backend.pem'
ENV
