#!/usr/bin/env bash
# End-to-end install of the chart on a real cluster (`make e2e`; the release workflow's e2e job).
#
#   1. an image: $IMAGE, or `make image`'s (.docker/build-image) on this machine
#   2. a cluster: a new kind cluster $KIND_CLUSTER (deleted at the end unless KEEP=1), or, with
#      CLUSTER=current, whatever `kubectl` points at (the image must then be pullable there)
#   3. PostgreSQL in the namespace (tests/e2e/postgres.yaml), restricted Pod Security enforced
#   4. helm install with tests/e2e/values.yaml: the migration hook runs first, then the rollout
#   5. helm test (the chart's smoke pod), then `python -m service smoke` from a client pod
#   6. a steady request loop (tests/e2e/request_loop.py, in the cluster, through the Service)
#      across `helm upgrade` to a changed release and `helm rollback` to the first: zero
#      failed requests allowed
#
# Needs kubectl and helm (and kind unless CLUSTER=current). Variables:
#   IMAGE          image reference to test (default: build one with .docker/build-image)
#   CLUSTER        kind (default) or current
#   KIND_CLUSTER   kind cluster name (default fastapi-app-e2e); an existing one is reused
#   NAMESPACE      namespace for PostgreSQL and the release (default fastapi-app-e2e)
#   RELEASE        Helm release name (default fastapi-app)
#   TIMEOUT        per helm/rollout step (default 10m)
#   KEEP=1         keep the kind cluster (or, with CLUSTER=current, the namespace) afterwards
set -euo pipefail

cd "$(dirname "$0")/../.."
CLUSTER=${CLUSTER:-kind}
KIND_CLUSTER=${KIND_CLUSTER:-fastapi-app-e2e}
NAMESPACE=${NAMESPACE:-fastapi-app-e2e}
RELEASE=${RELEASE:-fastapi-app}
TIMEOUT=${TIMEOUT:-10m}
KEEP=${KEEP:-}
CHART=charts/fastapi-app
VALUES=tests/e2e/values.yaml
APP_SECRET=fastapi-app-e2e # existingSecret in tests/e2e/values.yaml

step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'e2e FAILED: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null || fail "$1 is not installed"; }
random_hex() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }

need kubectl
need helm
[[ $CLUSTER == kind || $CLUSTER == current ]] || fail "CLUSTER is kind or current, not $CLUSTER"
[[ $CLUSTER == current ]] || need kind

# --- diagnostics and clean-up -------------------------------------------------------------------
created_cluster=
k() { kubectl --namespace "$NAMESPACE" "$@"; }

diagnose() {
  step "diagnostics"
  k get all,jobs,pdb,networkpolicy,events --sort-by=.metadata.creationTimestamp 2>&1 | tail -n 80 || true
  for pod in $(k get pods -o name 2>/dev/null); do
    echo "--- $pod"
    k logs "$pod" --all-containers --tail=60 2>&1 || true
  done
  helm history "$RELEASE" --namespace "$NAMESPACE" 2>&1 || true
}

finish() {
  local status=$?
  ((status == 0)) || diagnose
  if [[ -n $KEEP ]]; then
    echo "KEEP=1: leaving the cluster and namespace $NAMESPACE in place"
  elif [[ -n $created_cluster ]]; then
    kind delete cluster --name "$KIND_CLUSTER" >/dev/null 2>&1 || true
  elif [[ $CLUSTER == current ]]; then
    helm uninstall "$RELEASE" --namespace "$NAMESPACE" --wait >/dev/null 2>&1 || true
    kubectl delete namespace "$NAMESPACE" --wait=false >/dev/null 2>&1 || true
  fi
  if ((status == 0)); then echo "e2e passed"; else echo "e2e FAILED (exit $status)" >&2; fi
  exit "$status"
}
trap finish EXIT

# --- 1. image -------------------------------------------------------------------------------------
if [[ -z ${IMAGE:-} ]]; then
  step "building the image (.docker/build-image)"
  IMAGE=$(.docker/build-image | tail -n 1)
fi
step "image $IMAGE"
if [[ $IMAGE == *@sha256:* ]]; then
  image_values=(--set-string "image.repository=${IMAGE%@*}" --set-string "image.digest=${IMAGE#*@}")
elif [[ ${IMAGE##*/} == *:* ]]; then
  image_values=(--set-string "image.repository=${IMAGE%:*}" --set-string "image.tag=${IMAGE##*:}")
else
  image_values=(--set-string "image.repository=$IMAGE" --set-string image.tag=latest)
fi
image_values+=(--set-string image.pullPolicy=IfNotPresent)

# --- 2. cluster -----------------------------------------------------------------------------------
if [[ $CLUSTER == kind ]]; then
  if kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER"; then
    step "reusing kind cluster $KIND_CLUSTER"
  else
    step "creating kind cluster $KIND_CLUSTER"
    kind create cluster --name "$KIND_CLUSTER" --wait 120s
    created_cluster=1
  fi
  kubectl config use-context "kind-$KIND_CLUSTER" >/dev/null
  step "loading the image into the cluster's node"
  if command -v docker >/dev/null && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    kind load docker-image "$IMAGE" --name "$KIND_CLUSTER"
  elif command -v podman >/dev/null && podman image exists "$IMAGE"; then
    archive=$(mktemp --suffix=.tar)
    podman save --format docker-archive --output "$archive" "$IMAGE"
    kind load image-archive "$archive" --name "$KIND_CLUSTER"
    rm -f "$archive"
  else
    fail "$IMAGE is in neither docker's nor podman's image store"
  fi
fi
kubectl version 2>/dev/null | sed 's/^/  /' || true

# --- 3. namespace, PostgreSQL, secrets ------------------------------------------------------------
step "namespace $NAMESPACE (restricted Pod Security enforced) and PostgreSQL"
kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label namespace "$NAMESPACE" --overwrite \
  pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/warn=restricted >/dev/null
db_password=$(random_hex)
gateway_secret=$(random_hex)
k create secret generic postgres --from-literal=password="$db_password" \
  --dry-run=client -o yaml | k apply -f - >/dev/null
k apply -f tests/e2e/postgres.yaml
k rollout status deployment/postgres --timeout "$TIMEOUT"
database_url="postgresql://app:${db_password}@postgres:5432/app"
k create secret generic "$APP_SECRET" \
  --from-literal=DATABASE_URL="$database_url" \
  --from-literal=DATABASE_MIGRATION_URL="$database_url" \
  --from-literal=GATEWAY_SHARED_SECRET="$gateway_secret" \
  --dry-run=client -o yaml | k apply -f - >/dev/null

sql() { k exec deployment/postgres -- psql --username app --dbname app -tAc "$1"; }

# --- 4. install: migration hook first, then the rollout -------------------------------------------
helm_args=(--namespace "$NAMESPACE" --values "$VALUES" "${image_values[@]}" --wait --wait-for-jobs
  --timeout "$TIMEOUT")
step "helm install (pre-install hook: migrations)"
[[ -z $(sql "SELECT to_regclass('public.alembic_version')") ]] || fail "the database is not empty"
helm upgrade --install "$RELEASE" "$CHART" "${helm_args[@]}"
fullname=$(k get deployment -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=api" \
  -o jsonpath='{.items[0].metadata.name}')
[[ -n $fullname ]] || fail "no api Deployment for release $RELEASE"
k rollout status "deployment/$fullname" --timeout "$TIMEOUT"
schema=$(sql "SELECT version_num FROM alembic_version")
[[ -n $schema ]] || fail "the migration hook did not run"
echo "schema at $schema; the app never migrates, so the hook ran before the pods became ready"

# --- 5. helm test and smoke -----------------------------------------------------------------------
step "API key for the smoke checks (the image's create-api-key)"
api_key=$(k exec "deployment/$fullname" -- python -m service create-api-key --owner e2e-smoke \
  --scopes tasks:read,tasks:write | tail -n 1)
k create secret generic "$fullname-smoke" --from-literal=api-key="$api_key" \
  --dry-run=client -o yaml | k apply -f - >/dev/null

step "helm test"
helm test "$RELEASE" --namespace "$NAMESPACE" --timeout 5m --logs

# A pod of the app's image in the namespace, admitted by the API's NetworkPolicy, restricted.
#   client_pod NAME COMMAND_JSON ARGS_JSON
client_pod() {
  k apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $1
  labels:
    app.kubernetes.io/part-of: fastapi-app-e2e
    $fullname-client: "true"
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 10001
    seccompProfile:
      type: RuntimeDefault
  containers:
    - name: client
      image: $IMAGE
      imagePullPolicy: IfNotPresent
      command: $2
      args: $3
      env:
        - name: API_KEY
          valueFrom:
            secretKeyRef: {name: $fullname-smoke, key: api-key}
        - name: GATEWAY_SHARED_SECRET
          valueFrom:
            secretKeyRef: {name: $APP_SECRET, key: GATEWAY_SHARED_SECRET}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities:
          drop: ["ALL"]
      volumeMounts:
        - {name: tmp, mountPath: /tmp}
        - {name: loop, mountPath: /e2e, readOnly: true}
  volumes:
    - name: tmp
      emptyDir: {}
    - name: loop
      configMap:
        name: e2e-request-loop
EOF
}

# Wait for a client pod to finish; its logs are printed, its exit status returned.
finished() {
  local pod=$1 phase='' deadline=$((SECONDS + 300))
  until [[ $phase == Succeeded || $phase == Failed ]]; do
    ((SECONDS < deadline)) || break
    sleep 2
    phase=$(k get "pod/$pod" -o jsonpath='{.status.phase}')
  done
  k logs "pod/$pod"
  [[ $phase == Succeeded ]]
}

k create configmap e2e-request-loop --from-file=tests/e2e/request_loop.py \
  --dry-run=client -o yaml | k apply -f - >/dev/null
service_url="http://$fullname:8000"
step "python -m service smoke (a client pod through the Service)"
k delete pod e2e-smoke --ignore-not-found >/dev/null
client_pod e2e-smoke '["python", "-m", "service"]' \
  "[\"smoke\", \"--url\", \"$service_url\", \"--api-key\", \"\$(API_KEY)\", \"--header\", \"X-Gateway-Secret: \$(GATEWAY_SHARED_SECRET)\"]"
finished e2e-smoke || fail "smoke"

# --- 6. upgrade and rollback under a steady request loop ------------------------------------------
step "request loop (in the cluster, through the Service)"
k delete pod e2e-loop --ignore-not-found >/dev/null
client_pod e2e-loop '["python", "/e2e/request_loop.py"]' "[\"--url\", \"$service_url\"]"
k wait pod/e2e-loop --for=condition=Ready --timeout 2m >/dev/null
loop_progress() { k logs pod/e2e-loop 2>/dev/null | tail -n 1; }
deadline=$((SECONDS + 120))
until [[ $(loop_progress) == *'"requests": '[1-9]* ]]; do
  ((SECONDS < deadline)) || fail "the request loop never got going: $(loop_progress)"
  sleep 2
done
echo "loop: $(loop_progress)"

wait_for_replicas() { # only the current ReplicaSet's pods remain (the old ones have drained)
  local want
  want=$(k get "deployment/$fullname" -o jsonpath='{.spec.replicas}')
  local deadline=$((SECONDS + 300))
  until [[ $(k get pods -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=api" \
    -o name | wc -l) -eq $want ]]; do
    ((SECONDS < deadline)) || fail "old pods did not go away"
    sleep 2
  done
}

step "helm upgrade to a changed release (new config: the pods roll) under load"
helm upgrade "$RELEASE" "$CHART" "${helm_args[@]}" \
  --set-string config.LOG_LEVEL=WARNING
k rollout status "deployment/$fullname" --timeout "$TIMEOUT"
wait_for_replicas
[[ $(k get configmap "$fullname" -o jsonpath='{.data.LOG_LEVEL}') == WARNING ]] || fail "upgrade did not apply"
echo "loop: $(loop_progress)"

step "helm rollback to revision 1 under load"
helm rollback "$RELEASE" 1 --namespace "$NAMESPACE" --wait --timeout "$TIMEOUT"
k rollout status "deployment/$fullname" --timeout "$TIMEOUT"
wait_for_replicas
[[ $(k get configmap "$fullname" -o jsonpath='{.data.LOG_LEVEL}') == INFO ]] || fail "rollback did not apply"
helm history "$RELEASE" --namespace "$NAMESPACE"

step "stopping the request loop: zero failed requests allowed"
k exec pod/e2e-loop -- python -c "open('/tmp/stop', 'w').close()"
finished e2e-loop || fail "requests failed during the upgrade or the rollback"

step "smoke after the rollback"
k delete pod e2e-smoke --ignore-not-found >/dev/null
client_pod e2e-smoke '["python", "-m", "service"]' \
  "[\"smoke\", \"--url\", \"$service_url\", \"--api-key\", \"\$(API_KEY)\", \"--header\", \"X-Gateway-Secret: \$(GATEWAY_SHARED_SECRET)\"]"
finished e2e-smoke || fail "smoke after rollback"
