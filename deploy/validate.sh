#!/usr/bin/env bash
# Offline validation of deploy/ (tests/run.sh runs it; no cluster, no network).
#
# 1. Every Kubernetes manifest under deploy/kubernetes (core resources and
#    examples/) against the Kubernetes OpenAPI schemas with
#    `kubernetes-validate --strict` (unknown fields are errors), for each
#    version in KUBERNETES_VERSIONS. A core file whose kind has no schema
#    (a misspelt apiVersion) is an error, not a warning.
# 2. Custom resources (monitoring/: the Prometheus operator's ServiceMonitor)
#    cannot be schema-checked without their CRDs: kubernetes-validate must
#    report exactly "no schema" for them, and step 3 checks their contents.
# 3. Cross-references: kustomization.yaml lists existing files and every
#    manifest is either listed or under examples/ or monitoring/; Services
#    select pods that exist; every ConfigMap and Secret a pod uses exists
#    (with the keys it uses); ServiceMonitors select a Service and name its
#    ports. With kubectl installed, `kubectl kustomize` must render too.
# 4. The config.yaml inside the ConfigMap, and deploy/config.example.yaml,
#    pass `switchyard-control-plane --check-config` in a clean environment
#    holding only the Secret's variables (dummy values): a ${NAME} the Secret
#    does not provide fails here. (In the pod, one in `router_api_key` stops
#    the start, exit 2; one in `api_keys` is only a warning and that backend
#    gets no key, so here the warning is made an error.)
#
# Environment:
#   VENV                 venv with kubernetes-validate (pip install
#                        kubernetes-validate). Default: $ROOT/.venv if it has
#                        it, else `kubernetes-validate` on PATH.
#   SWITCHYARD_CP_BIN    control-plane binary. Default:
#                        target/debug/switchyard-control-plane (build it with
#                        `cargo build -p switchyard-control-plane`).
#   KUBERNETES_VERSIONS  space-separated, default "1.30.0 <latest the tool knows>".
#                        1.30 is the oldest supported: native sidecar
#                        containers (examples/) need 1.29+.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
K8S=deploy/kubernetes

fail() {
  echo "validate.sh: FAIL: $*" >&2
  exit 1
}

# --- tools ---------------------------------------------------------------
VENV=${VENV:-}
if [ -z "$VENV" ] && [ -x "$ROOT/.venv/bin/kubernetes-validate" ]; then
  VENV=$ROOT/.venv
fi
if [ -n "$VENV" ]; then
  KV=$VENV/bin/kubernetes-validate
  PY=$VENV/bin/python
  [ -x "$KV" ] || fail "no kubernetes-validate in VENV=$VENV (run: $VENV/bin/pip install kubernetes-validate)"
else
  KV=$(command -v kubernetes-validate) || fail "kubernetes-validate not found: set VENV or pip install kubernetes-validate"
  # The interpreter kubernetes-validate runs with has PyYAML (its dependency).
  PY=$(head -n1 "$KV" | sed -e 's/^#!//' -e 's/ .*$//')
fi
"$PY" -c 'import yaml, kubernetes_validate' 2>/dev/null || fail "$PY cannot import yaml and kubernetes_validate"

CP_BIN=${SWITCHYARD_CP_BIN:-$ROOT/target/debug/switchyard-control-plane}
[ -x "$CP_BIN" ] || fail "control-plane binary $CP_BIN not found (cargo build -p switchyard-control-plane, or set SWITCHYARD_CP_BIN)"

if [ -z "${KUBERNETES_VERSIONS:-}" ]; then
  LATEST=$("$PY" -c 'import kubernetes_validate.utils as u; print(u.latest_version())')
  KUBERNETES_VERSIONS="1.30.0 $LATEST"
fi
KV_ARGS=(--strict)
for v in $KUBERNETES_VERSIONS; do KV_ARGS+=(-k "$v"); done

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# --- 1 + 2: schemas ------------------------------------------------------
mapfile -t CORE < <(cd "$K8S" && "$PY" -c '
import yaml
k = yaml.safe_load(open("kustomization.yaml"))
for r in k["resources"]:
    print(r)
')
mapfile -t EXAMPLES < <(cd "$K8S" && find examples -name '*.yaml' | sort)
mapfile -t CUSTOM < <(cd "$K8S" && find monitoring -name '*.yaml' | sort)

echo "== kubernetes-validate ${KV_ARGS[*]} ($("$KV" --version))"
for f in "${CORE[@]}" "${EXAMPLES[@]}"; do
  [ -f "$K8S/$f" ] || fail "kustomization.yaml lists $f, which does not exist"
  if ! out=$(cd "$K8S" && "$KV" "${KV_ARGS[@]}" "$f" 2>&1); then
    echo "$out"
    fail "$f does not validate"
  fi
  echo "$out"
  if grep -qv '^INFO ' <<<"$out"; then
    fail "$f: unexpected warnings (a core manifest must have a known schema)"
  fi
done
for f in "${CUSTOM[@]}"; do
  out=$(cd "$K8S" && "$KV" "${KV_ARGS[@]}" "$f" 2>&1) || { echo "$out"; fail "$f does not validate"; }
  echo "$out"
  # Only "no schema for this custom kind" is acceptable here.
  if grep -v "^WARN $f Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1 " <<<"$out" | grep -q .; then
    fail "$f: unexpected output from kubernetes-validate"
  fi
done

# --- 3: cross-references, and the config extracted for step 4 -------------
echo "== cross-references"
"$PY" - "$K8S" "$WORK" <<'PYEOF'
import os, sys, yaml

k8s, work = sys.argv[1], sys.argv[2]
errors = []

def load(rel):
    with open(os.path.join(k8s, rel)) as f:
        return [d for d in yaml.safe_load_all(f) if d]

kustomization = yaml.safe_load(open(os.path.join(k8s, "kustomization.yaml")))
core_files = list(kustomization["resources"])
all_files = sorted(
    os.path.relpath(os.path.join(d, f), k8s)
    for d, _, fs in os.walk(k8s) for f in fs if f.endswith((".yaml", ".yml"))
)
for f in all_files:
    if f == "kustomization.yaml" or f in core_files:
        continue
    if not (f.startswith("examples/") or f.startswith("monitoring/")):
        errors.append(f"{f}: not listed in kustomization.yaml (nor under examples/ or monitoring/)")

docs = [(f, d) for f in core_files for d in load(f)]
example_docs = [(f, d) for f in all_files if f.startswith("examples/") for d in load(f)]
custom_docs = [(f, d) for f in all_files if f.startswith("monitoring/") for d in load(f)]

def named(kind, pool):
    return {(d["metadata"].get("namespace", "switchyard"), d["metadata"]["name"]): d
            for _, d in pool if d["kind"] == kind}

ns_of = lambda d: d["metadata"].get("namespace", "switchyard")
configmaps = named("ConfigMap", docs + example_docs)
secrets = named("Secret", docs)
services = named("Service", docs + example_docs)
workloads = [(f, d) for f, d in docs + example_docs if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]

for f, d in docs:
    if d["kind"] != "Namespace" and ns_of(d) != kustomization.get("namespace"):
        errors.append(f"{f}: {d['kind']}/{d['metadata']['name']} is not in namespace {kustomization.get('namespace')}")

binaries = {"switchyard-control-plane", "switchyard-sidecar", "switchyard"}
for f, w in workloads:
    ns, name = ns_of(w), w["metadata"]["name"]
    spec = w["spec"]["template"]["spec"]
    sel = w["spec"]["selector"]["matchLabels"]
    labels = w["spec"]["template"]["metadata"]["labels"]
    if any(labels.get(k) != v for k, v in sel.items()):
        errors.append(f"{f}: {name}: selector {sel} does not match pod labels {labels}")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for v in volumes.values():
        if "configMap" in v:
            cm = configmaps.get((ns, v["configMap"]["name"]))
            if cm is None:
                errors.append(f"{f}: {name}: ConfigMap {v['configMap']['name']} not found")
            else:
                for item in v["configMap"].get("items", []):
                    if item["key"] not in cm.get("data", {}):
                        errors.append(f"{f}: {name}: ConfigMap {cm['metadata']['name']} has no key {item['key']}")
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        cmd = c.get("command", [])
        if c["image"].startswith("switchyard") and (not cmd or cmd[0] not in binaries):
            errors.append(f"{f}: {name}/{c['name']}: command {cmd} is not one of {sorted(binaries)}")
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                errors.append(f"{f}: {name}/{c['name']}: mounts unknown volume {m['name']}")
        for e in c.get("envFrom", []):
            if "secretRef" in e and (ns, e["secretRef"]["name"]) not in secrets:
                errors.append(f"{f}: {name}/{c['name']}: Secret {e['secretRef']['name']} not found")
        if "--config" in c.get("args", []):
            path = c["args"][c["args"].index("--config") + 1]
            mounted = [m["mountPath"] for m in c.get("volumeMounts", [])]
            if not any(path.startswith(mp.rstrip("/") + "/") for mp in mounted):
                errors.append(f"{f}: {name}/{c['name']}: --config {path} is not under a mounted volume")

def pods_matching(ns, selector):
    return [w for _, w in workloads if ns_of(w) == ns
            and all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items())]

def container_ports(w):
    spec = w["spec"]["template"]["spec"]
    return {p.get("name") for c in spec.get("containers", []) + spec.get("initContainers", [])
            for p in c.get("ports", [])}

for (ns, name), s in services.items():
    targets = pods_matching(ns, s["spec"]["selector"])
    if not targets:
        errors.append(f"Service {name}: selector {s['spec']['selector']} matches no workload")
    for p in s["spec"]["ports"]:
        tp = p.get("targetPort")
        if isinstance(tp, str) and not all(tp in container_ports(w) for w in targets):
            errors.append(f"Service {name}: targetPort {tp} is not a named port of the selected pods")

for f, m in custom_docs:
    if m.get("apiVersion") != "monitoring.coreos.com/v1" or m.get("kind") != "ServiceMonitor":
        errors.append(f"{f}: expected monitoring.coreos.com/v1 ServiceMonitor, got {m.get('apiVersion')} {m.get('kind')}")
        continue
    ns = ns_of(m)
    sel = m["spec"]["selector"]["matchLabels"]
    matched = [s for (sns, _), s in services.items() if sns in m["spec"].get("namespaceSelector", {}).get("matchNames", [ns])
               and all(s["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
    if not matched:
        errors.append(f"{f}: {m['metadata']['name']}: selector {sel} matches no Service")
    for ep in m["spec"]["endpoints"]:
        for s in matched:
            if ep["port"] not in {p["name"] for p in s["spec"]["ports"]}:
                errors.append(f"{f}: {m['metadata']['name']}: Service {s['metadata']['name']} has no port {ep['port']}")
        cred = ep.get("authorization", {}).get("credentials")
        if cred:
            secret = secrets.get((ns, cred["name"]))
            if secret is None or cred["key"] not in secret.get("stringData", {}) | secret.get("data", {}):
                errors.append(f"{f}: {m['metadata']['name']}: Secret {cred['name']} key {cred['key']} not found")

# The config and the Secret's variable names, for step 4.
cm = configmaps.get(("switchyard", "switchyard-config"))
if cm is None or "config.yaml" not in cm.get("data", {}):
    errors.append("ConfigMap switchyard-config with key config.yaml not found")
else:
    with open(os.path.join(work, "config.yaml"), "w") as out:
        out.write(cm["data"]["config.yaml"])
secret = secrets.get(("switchyard", "switchyard-api-keys"))
if secret is None:
    errors.append("Secret switchyard-api-keys not found")
else:
    with open(os.path.join(work, "secret-vars"), "w") as out:
        for key in sorted(set(secret.get("stringData", {})) | set(secret.get("data", {}))):
            out.write(key + "\n")

for e in errors:
    print("ERROR " + e)
if errors:
    sys.exit(1)
print(f"ok: {len(all_files)} files, {len(docs)} core resources, "
      f"{len(example_docs)} example resources, {len(custom_docs)} custom resources")
PYEOF

if command -v kubectl >/dev/null 2>&1; then
  echo "== kubectl kustomize $K8S"
  kubectl kustomize "$K8S" > "$WORK/rendered.yaml" || fail "kubectl kustomize $K8S failed"
  out=$("$KV" "${KV_ARGS[@]}" "$WORK/rendered.yaml" 2>&1) || { echo "$out"; fail "rendered kustomization does not validate"; }
  if grep -qv '^INFO ' <<<"$out"; then echo "$out"; fail "rendered kustomization: unexpected warnings"; fi
  echo "ok: $(grep -c '^INFO ' <<<"$out") resource checks passed on the rendered output"
else
  echo "== kubectl not installed: skipping the kustomize render check"
fi

echo "== docker-compose.yml and Dockerfile"
"$PY" - <<'PYEOF'
import os, re, sys, yaml

errors = []
binaries = {"switchyard-control-plane", "switchyard-sidecar", "switchyard"}
compose = yaml.safe_load(open("deploy/docker-compose.yml"))
for name, svc in compose["services"].items():
    argv = svc.get("entrypoint") or svc.get("command")
    if not argv or argv[0] not in binaries:
        errors.append(f"docker-compose.yml: service {name}: runs {argv!r}, not one of {sorted(binaries)}")
    for vol in svc.get("volumes", []):
        src = vol.split(":")[0]
        if src.startswith(".") and not os.path.exists(os.path.join("deploy", src)):
            errors.append(f"docker-compose.yml: service {name}: mounts missing file {src}")
    build = svc.get("build")
    if build and not os.path.exists(os.path.join("deploy", build["context"], build["dockerfile"])):
        errors.append(f"docker-compose.yml: service {name}: no Dockerfile at {build}")
dockerfile = open("deploy/Dockerfile").read()
for b in sorted(binaries):
    if not re.search(rf"--bin {re.escape(b)}(\s|$)", dockerfile):
        errors.append(f"Dockerfile: does not build {b}")
    if f"target/release/{b}" not in dockerfile:
        errors.append(f"Dockerfile: does not copy {b}")
for e in errors:
    print("ERROR " + e)
if errors:
    sys.exit(1)
print(f"ok: {len(compose['services'])} compose services; the image builds and ships {len(binaries)} binaries")
PYEOF

# --- 4: the configs ------------------------------------------------------
check_config() { # FILE, then VAR=value pairs
  local file=$1
  shift
  echo "== switchyard-control-plane --check-config --config $file"
  local out
  out=$(env -i PATH="$PATH" "$@" "$CP_BIN" --check-config --config "$file" 2>&1) \
    || { echo "$out"; fail "$file: --check-config failed"; }
  echo "$out"
  if grep -q 'warning: .*environment variable .* not set' <<<"$out"; then
    fail "$file: references a variable the Secret does not provide"
  fi
}
SECRET_ENV=()
while read -r var; do
  [ -n "$var" ] && SECRET_ENV+=("$var=dummy-$var")
done < "$WORK/secret-vars"
check_config "$WORK/config.yaml" "${SECRET_ENV[@]}"
check_config deploy/config.example.yaml

echo "deploy/ is valid"
