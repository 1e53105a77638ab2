#!/usr/bin/env bash
# The pipeline on a real Kubernetes cluster (kind or k3d, CPU only, tiny model), end to end.
# Needs docker, kubectl, helm and kind (or k3d with E2E_CLUSTER=k3d); run from anywhere:
#   bash tests/e2e/run.sh                 # creates cluster p2r-e2e, deletes it at the end
#   E2E_KEEP=1 bash tests/e2e/run.sh      # keep the cluster for inspection
#   E2E_CONTEXT=my-ctx bash tests/e2e/run.sh   # use an existing cluster (nothing created/deleted)
# What it checks is listed in the README (section "Pipeline", "End-to-end on a cluster").
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
P2R="$ROOT/.venv/bin/p2r"
PY="$ROOT/.venv/bin/python"
CLUSTER=${E2E_CLUSTER:-kind}
NAME=p2r-e2e
NS=p2r
IMAGE=p2r-cpu:e2e
CONFIG="$ROOT/tests/e2e/pipeline-kind.yaml"
WORK=$(mktemp -d)
PIDS=()

log() { echo "e2e: $*" >&2; }
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ -z "${E2E_CONTEXT:-}" ] && [ -z "${E2E_KEEP:-}" ]; then
    if [ "$CLUSTER" = k3d ]; then k3d cluster delete "$NAME" >/dev/null 2>&1 || true
    else kind delete cluster --name "$NAME" >/dev/null 2>&1 || true; fi
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

[ -x "$P2R" ] || bash scripts/install.sh

# 1. Cluster and image ------------------------------------------------------------------------
if [ -n "${E2E_CONTEXT:-}" ]; then
  kubectl config use-context "$E2E_CONTEXT"
elif [ "$CLUSTER" = k3d ]; then
  k3d cluster create "$NAME" --wait
else
  kind create cluster --name "$NAME" --wait 180s
fi
log "building $IMAGE"
docker build -q -f docker/cpu.Dockerfile -t "$IMAGE" .
if [ -z "${E2E_CONTEXT:-}" ]; then
  if [ "$CLUSTER" = k3d ]; then k3d image import "$IMAGE" -c "$NAME"; else kind load docker-image "$IMAGE" --name "$NAME"; fi
fi

# 2. Kubeflow training operator (PyTorchJob) ---------------------------------------------------
log "installing the training operator v1.9.4"
kubectl apply --server-side -k "github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=v1.9.4"
kubectl -n kubeflow rollout status deployment/training-operator --timeout=300s

# 3. The release: role Deployments, MinIO with its generated Secret p2r-s3 (controller off: this
#    script runs it from the host, so it can kill and restart it) ------------------------------
log "installing the chart (cpu-smoke profile)"
helm upgrade --install p2r charts/p2r -n "$NS" --create-namespace -f charts/p2r/ci/cpu-smoke-values.yaml \
  --set image.repository=p2r-cpu --set image.tag=e2e --set image.pullPolicy=Never \
  --set controller.enabled=false --set networkPolicy.enabled=false --wait --timeout 20m

# 4. Synthetic data on a PVC (the trainer and eval pods mount it at /data) -----------------------
kubectl -n "$NS" apply -f - <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: p2r-e2e-data}
spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
---
apiVersion: batch/v1
kind: Job
metadata: {name: p2r-e2e-data}
spec:
  backoffLimit: 1
  template:
    spec:
      restartPolicy: Never
      securityContext: {fsGroup: 10001}
      containers:
        - name: synth
          image: $IMAGE
          imagePullPolicy: Never
          command: [sh, -c, "p2r data synth --out /data/synthetic --n 6 && p2r data synth --out /data/synthetic-eval --n 6 --seed 1"]
          volumeMounts: [{name: data, mountPath: /data}]
      volumes: [{name: data, persistentVolumeClaim: {claimName: p2r-e2e-data}}]
EOF
kubectl -n "$NS" wait --for=condition=complete job/p2r-e2e-data --timeout=600s

# 5. S3 from the host: a port-forward to the release's MinIO, keys read from its Secret into this
#    shell's environment only (never written to a file or printed) -------------------------------
kubectl -n "$NS" port-forward svc/p2r-minio 19000:9000 >/dev/null 2>&1 &
PIDS+=($!)
sleep 3
export P2R_S3_ENDPOINT=127.0.0.1:19000
AWS_ACCESS_KEY_ID=$(kubectl -n "$NS" get secret p2r-s3 -o jsonpath='{.data.AWS_ACCESS_KEY_ID}' | base64 -d)
AWS_SECRET_ACCESS_KEY=$(kubectl -n "$NS" get secret p2r-s3 -o jsonpath='{.data.AWS_SECRET_ACCESS_KEY}' | base64 -d)
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY

log "uploading the tiny model to s3://p2r/models/tiny"
"$P2R" models tiny --out "$WORK/tiny" >/dev/null
"$PY" - "$WORK/tiny" <<'EOF'
import sys
from pathlib import Path
from p2r.services.checkpoints import upload_checkpoint, write_manifest
write_manifest(Path(sys.argv[1]))
upload_checkpoint(Path(sys.argv[1]), "s3://p2r/models/tiny")
EOF

# 6. The pipeline, with the controller killed while stage 1 runs ------------------------------
log "running the pipeline (controller from this host)"
"$P2R" pipeline run --config "$CONFIG" >"$WORK/run1.log" 2>&1 &
CTRL=$!
PIDS+=("$CTRL")
for _ in $(seq 1 180); do
  kubectl -n "$NS" get pytorchjob e2e-stage1-1 >/dev/null 2>&1 && break
  sleep 5
done
kubectl -n "$NS" get pytorchjob e2e-stage1-1 >/dev/null
sleep 20
log "killing the controller mid-stage (SIGKILL) and starting a new one"
kill -9 "$CTRL"
"$P2R" pipeline run --config "$CONFIG" >"$WORK/run2.log" 2>&1 &
CTRL=$!
PIDS+=("$CTRL")
if ! wait "$CTRL"; then
  tail -50 "$WORK/run2.log" >&2
  exit 1
fi

# 7. Checks -------------------------------------------------------------------------------------
"$PY" tests/e2e/check.py --config "$CONFIG"

# 8. Cancel: a second run is cancelled while its stage 1 runs ------------------------------------
log "cancel check"
sed 's/^name: e2e$/name: e2e-cancel/' "$CONFIG" >"$WORK/cancel.yaml"
"$P2R" pipeline run --config "$WORK/cancel.yaml" >"$WORK/cancel.log" 2>&1 &
CTRL=$!
PIDS+=("$CTRL")
for _ in $(seq 1 180); do
  kubectl -n "$NS" get pytorchjob e2e-cancel-stage1-1 >/dev/null 2>&1 && break
  sleep 5
done
"$P2R" pipeline cancel --config "$WORK/cancel.yaml"
if wait "$CTRL"; then log "FAIL: a cancelled run exited 0"; exit 1; fi
"$PY" tests/e2e/check.py --config "$WORK/cancel.yaml" --cancelled

# 9. cpu-smoke as installed: the chart's own controller, nothing done by hand. The seed Job writes
#    the tiny model and the synthetic set to the release's MinIO (which creates its bucket and
#    users itself), the trainer pods fetch the set from s3://, and the controller runs
#    stage 1 -> stage 2 -> eval by itself; this only waits for its state to say eval succeeded.
log "cpu-smoke with the chart's controller (no manual step)"
helm upgrade --install p2r charts/p2r -n "$NS" -f charts/p2r/ci/cpu-smoke-values.yaml \
  --set image.repository=p2r-cpu --set image.tag=e2e --set image.pullPolicy=Never \
  --set controller.enabled=true --set networkPolicy.enabled=false --wait --wait-for-jobs --timeout 20m
state() { kubectl -n "$NS" get configmap p2r-pipeline-smoke -o jsonpath='{.data.state\.json}' 2>/dev/null || true; }
for _ in $(seq 1 360); do
  if state | "$PY" -c 'import json,sys; s=json.loads(sys.stdin.read() or "{}"); st=s.get("steps",{}).get("eval",{}).get("status"); sys.exit(0 if st=="succeeded" else 2 if s.get("status")=="failed" else 1)'; then
    break
  elif [ $? -eq 2 ]; then
    state >&2; kubectl -n "$NS" logs deploy/p2r-controller --tail=50 >&2; exit 1
  fi
  sleep 10
done
state | "$PY" -c 'import json,sys; s=json.loads(sys.stdin.read()); assert s["steps"]["eval"]["status"]=="succeeded", s'
log "cpu-smoke: stage 1 -> stage 2 -> eval finished with no manual step"
log "PASS"
