#!/usr/bin/env bash
# Create the consortium's genesis and keys, then the ConfigMap and per-organization Secrets the
# manifests mount. In a real consortium each organization runs the Secret step with its own key
# only; here one operator plays all four.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/generated}"
ns=fhirmament
fhirmament genesis --dir "$out" --replicas 4 \
  --peer 'org-{i}-0.fhirmament-peers.fhirmament.svc.cluster.local:7000' \
  --api 'http://org-{i}-0.fhirmament-peers.fhirmament.svc.cluster.local:8080/fhir'
kubectl apply -f "$here/namespace.yaml"
kubectl -n "$ns" create configmap fhirmament-genesis --from-file=genesis.json="$out/genesis.json"
for i in 0 1 2 3; do
  kubectl -n "$ns" create secret generic "fhirmament-key-$i" --from-file=replica.key="$out/replica-$i.key"
  # Each organization's key-encryption key seals its records at rest (see README).
  fhirmament kek generate --out "$out/kek-$i.json"
  kubectl -n "$ns" create secret generic "fhirmament-kek-$i" --from-file=kek.json="$out/kek-$i.json"
done
kubectl apply -f "$here/services.yaml" -f "$here/policy.yaml" -f "$here/replicas.yaml"
