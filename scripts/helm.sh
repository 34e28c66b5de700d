#!/usr/bin/env bash
# Check the Helm chart helm/streamprov with the real helm:
#   1. build helm from source with Go (cached in .tools/; the first build takes ~5 minutes on 2 cores),
#   2. values.schema.json is up to date with the config models,
#   3. helm lint --strict with every helm/streamprov/ci/*.yaml,
#   4. helm template with each of them, on the oldest and newest Kubernetes the chart supports, and
#      the manifests validated (strictly, offline) with kubernetes-validate; the ConfigMap's config
#      loaded with streamprov's loader,
#   5. every helm/testdata/bad-*.yaml is refused, with the message its "# expect:" line names.
# Usage: scripts/helm.sh [build|check]   (default: both)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

HELM_VERSION="v3.22.0"   # latest v3: go list -m -versions helm.sh/helm/v3
K8S_MINOR="37"           # helm v3.22.0 is built against k8s.io/client-go v0.37: its default kube version
KUBE_VERSIONS=("1.25.0" "1.37.0")   # the chart's kubeVersion floor and the newest kubernetes-validate knows
tools="$root/.tools"
helm="$tools/helm"
python="$root/.venv/bin/python"
chart="helm/streamprov"

build() {
  mkdir -p "$tools"
  [ -f "$tools/.gitignore" ] || printf '*\n' > "$tools/.gitignore"
  if [ -x "$helm" ] && [ "$("$helm" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]; then
    echo "helm $HELM_VERSION: cached in .tools/"
    return
  fi
  if ! command -v go >/dev/null; then
    echo "scripts/helm.sh needs Go (>= 1.24) to build helm $HELM_VERSION" >&2
    exit 1
  fi
  echo "building helm $HELM_VERSION with $(go version | cut -d' ' -f3) (Go module proxy; a few minutes) ..."
  local start=$SECONDS
  local ldflags="-w -s -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  ldflags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$K8S_MINOR"
  ldflags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$K8S_MINOR"
  GOBIN="$tools" CGO_ENABLED=0 timeout 1800 \
    go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  echo "built $("$helm" version --short) in $((SECONDS - start))s"
}

check() {
  local start=$SECONDS failures=0
  [ -x "$helm" ] || { echo "no helm in .tools/: run scripts/helm.sh build" >&2; exit 1; }
  "$python" scripts/helm_values_schema.py --check

  local out
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' RETURN
  for values in "$chart"/ci/*.yaml; do
    local name
    name="$(basename "$values" .yaml)"
    echo "--- $values"
    "$helm" lint --strict "$chart" -f "$values" --quiet
    for kube in "${KUBE_VERSIONS[@]}"; do
      "$helm" template "streamprov-ci" "$chart" -f "$values" --namespace data \
        --kube-version "$kube" --api-versions monitoring.coreos.com/v1 > "$out/$name-$kube.yaml"
    done
    cmp -s "$out/$name-${KUBE_VERSIONS[0]}.yaml" "$out/$name-${KUBE_VERSIONS[1]}.yaml" ||
      echo "  (renders differently per Kubernetes version)"
    "$python" scripts/k8s_validate.py $(printf -- '--kube-version %s ' "${KUBE_VERSIONS[@]}") \
      "$out/$name-${KUBE_VERSIONS[1]}.yaml"
  done

  echo "--- values the chart must refuse (helm/testdata/bad-*.yaml)"
  for values in helm/testdata/bad-*.yaml; do
    local expect err
    expect="$(sed -n 's/^# expect: //p' "$values" | head -n1)"
    if err="$("$helm" template "streamprov-ci" "$chart" -f "$values" 2>&1 >/dev/null)"; then
      echo "  FAIL $values: rendered, but should have been refused"
      failures=$((failures + 1))
    elif [[ "$err" != *"$expect"* ]]; then
      echo "  FAIL $values: refused, but the message lacks '$expect':"
      printf '%s\n' "$err" | sed 's/^/    /'
      failures=$((failures + 1))
    else
      echo "  refused $(basename "$values"): $(printf '%s' "$err" | grep -m1 -F -- "$expect" | sed 's/^ *//' | cut -c1-150)"
    fi
  done
  if [ "$failures" -gt 0 ]; then
    echo "helm chart: $failures problem(s)" >&2
    exit 1
  fi
  echo "helm chart checks passed in $((SECONDS - start))s"
}

case "${1:-all}" in
  build) build ;;
  check) check ;;
  all) build; check ;;
  *) echo "usage: scripts/helm.sh [build|check]" >&2; exit 2 ;;
esac
