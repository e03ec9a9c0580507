#!/usr/bin/env python3
"""Checks the deployment files in deploy/ offline, then against the real `kiln` binary.

    python3 deploy/check.py [path/to/kiln]      (or KILN_BIN; default target/release/kiln)

KILN_DEPLOY_DIR names another deploy folder (Dockerfile, kiln.toml, kubernetes/*.yaml) to
check, e.g. a copy being edited. Three groups of named checks:

- schemas: every document in kubernetes/*.yaml against the Kubernetes OpenAPI schemas of
  one fixed version (kubernetes-validate, strict: unknown fields fail; no cluster needed);
- cross-references: ports, probes, Secret/ConfigMap keys, the config mount, the data dir
  volume, the drain budget, replicas, resource requests, the Dockerfile's copies and user;
- the binary: every flag and KILN_* variable exists in `kiln serve --help`, and a real
  `kiln serve` with the ConfigMap's kiln.toml and a pod name as node id answers 200 on
  every probe path, then stops on SIGTERM within its drain timeout.

Prints `ok NAME` or `FAILED NAME: why` per check and ends with a `test result:` line that
scripts/test adds to its totals. Exits 1 when any check failed.
"""

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import yaml

# The Kubernetes version the manifests are written for (its schemas ship with
# kubernetes-validate; the manifests use nothing newer).
KUBERNETES_VERSION = "1.30.0"
# Documented in the README, read by `kiln serve` from the environment only (no flag).
ENV_ONLY = {"KILN_ADMIN_KEY"}
DEFAULT_DRAIN_TIMEOUT_MS = 30_000

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = Path(os.environ.get("KILN_DEPLOY_DIR") or ROOT / "deploy")

results = []


def check(name):
    """Runs the decorated function as check NAME: returning passes, raising fails."""

    def run(fn):
        try:
            fn()
        except Exception as e:  # any failure of a check is that check's result
            results.append(False)
            print(f"FAILED {name}: {e}", flush=True)
        else:
            results.append(True)
            print(f"ok {name}", flush=True)
        return fn

    return run


def need(cond, why):
    if not cond:
        raise AssertionError(why)


# ---- loading -------------------------------------------------------------------------

def load_documents():
    docs = []
    files = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    need(files, f"no manifests in {DEPLOY / 'kubernetes'}")
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                docs.append((f.name, doc))
    return docs


def dockerfile():
    """The Dockerfile's instructions as (KEYWORD, text), continuation lines joined."""
    out, buf = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def exec_form(text):
    return json.loads(text) if text.startswith("[") else shlex.split(text)


DOCS = []
try:
    DOCS = load_documents()
except Exception as e:
    print(f"FAILED load_manifests: {e}")
    results.append(False)


def one(kind):
    found = [d for _, d in DOCS if d.get("kind") == kind]
    need(len(found) == 1, f"want one {kind} in kubernetes/*.yaml, found {len(found)}")
    return found[0]


def pod_spec():
    return one("Deployment")["spec"]["template"]["spec"]


def kiln_container():
    cs = pod_spec()["containers"]
    need(len(cs) == 1, f"want one container in the pod, found {len(cs)}")
    return cs[0]


def container_ports():
    return {p.get("name"): p["containerPort"] for p in kiln_container().get("ports", [])}


def resolve_port(port):
    """A probe's or Service's port (name or number) as a container port number."""
    ports = container_ports()
    if isinstance(port, int):
        need(port in ports.values(), f"port {port} is no containerPort ({ports})")
        return port
    need(port in ports, f"port {port!r} names no containerPort ({ports})")
    return ports[port]


def probes():
    c = kiln_container()
    out = {}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in c:
            need("httpGet" in c[kind], f"{kind} is not an httpGet probe")
            out[kind] = c[kind]["httpGet"]
    return out


def arg_value(args, flag):
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def env_value(name):
    for e in kiln_container().get("env", []):
        if e["name"] == name:
            return e.get("value")
    return None


def config_text():
    data = one("ConfigMap").get("data", {})
    need("kiln.toml" in data, "the ConfigMap has no kiln.toml key")
    return data["kiln.toml"]


def prestop_seconds():
    pre = kiln_container().get("lifecycle", {}).get("preStop")
    need(pre, "the container has no preStop hook")
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    cmd = " ".join(pre.get("exec", {}).get("command", []))
    m = re.search(r"\bsleep\s+(\d+)\b", cmd)
    need(m, f"preStop {cmd!r} is no sleep")
    return int(m.group(1))


# ---- schemas -------------------------------------------------------------------------

for file, doc in DOCS:
    name = f"schema {file} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"

    @check(name)
    def _(doc=doc):
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path) or "(top)"
            raise AssertionError(f"{where}: {e.message}") from None
        except kubernetes_validate.SchemaNotFoundError as e:
            raise AssertionError(e.message) from None


# ---- cross-references ----------------------------------------------------------------

@check("replicas")
def _():
    n = one("Deployment")["spec"].get("replicas")
    need(n == 3, f"replicas is {n}, want 3")


@check("resource_requests")
def _():
    req = kiln_container().get("resources", {}).get("requests", {})
    need("cpu" in req and "memory" in req, f"requests {req} lack cpu or memory")


@check("service_selects_pods")
def _():
    labels = one("Deployment")["spec"]["template"]["metadata"].get("labels", {})
    sel = one("Service")["spec"].get("selector", {})
    need(sel and all(labels.get(k) == v for k, v in sel.items()),
         f"Service selector {sel} does not match pod labels {labels}")


@check("service_target_port")
def _():
    for p in one("Service")["spec"]["ports"]:
        resolve_port(p.get("targetPort", p["port"]))


@check("listen_port")
def _():
    listen = arg_value(kiln_container().get("args", []), "--listen")
    need(listen, "the container args set no --listen")
    host, _, port = listen.rpartition(":")
    need(host == "0.0.0.0", f"--listen {listen}: want 0.0.0.0, or other pods cannot reach it")
    resolve_port(int(port))


@check("probe_ports")
def _():
    ps = probes()
    need("readinessProbe" in ps and "livenessProbe" in ps, f"want readiness and liveness probes, have {sorted(ps)}")
    for kind, get in ps.items():
        try:
            resolve_port(get["port"])
        except AssertionError as e:
            raise AssertionError(f"{kind}: {e}") from None


@check("probe_paths")
def _():
    ps = probes()
    need(ps["readinessProbe"]["path"] == "/readyz", f"readiness on {ps['readinessProbe']['path']}, want /readyz")
    need(ps["livenessProbe"]["path"] == "/healthz", f"liveness on {ps['livenessProbe']['path']}, want /healthz")


@check("env_refs")
def _():
    secrets_ = {d["metadata"]["name"]: set(d.get("data", {})) | set(d.get("stringData", {}))
                for _, d in DOCS if d.get("kind") == "Secret"}
    maps = {d["metadata"]["name"]: set(d.get("data", {})) | set(d.get("binaryData", {}))
            for _, d in DOCS if d.get("kind") == "ConfigMap"}
    c = kiln_container()
    for e in c.get("env", []):
        src = e.get("valueFrom", {})
        for ref, known, what in (("secretKeyRef", secrets_, "Secret"), ("configMapKeyRef", maps, "ConfigMap")):
            if ref in src:
                r = src[ref]
                need(r["name"] in known, f"{e['name']}: no {what} {r['name']!r} in the manifests")
                need(r["key"] in known[r["name"]], f"{e['name']}: {what} {r['name']} has no key {r['key']!r}")
    for e in c.get("envFrom", []):
        for ref, known in (("secretRef", secrets_), ("configMapRef", maps)):
            if ref in e:
                need(e[ref]["name"] in known, f"envFrom names no {e[ref]['name']!r}")
    for v in pod_spec().get("volumes", []):
        if "configMap" in v:
            name = v["configMap"]["name"]
            need(name in maps, f"volume {v['name']}: no ConfigMap {name!r}")
            for item in v["configMap"].get("items", []):
                need(item["key"] in maps[name], f"volume {v['name']}: ConfigMap {name} has no key {item['key']!r}")


@check("config_toml")
def _():
    tomllib.loads(config_text())
    path = arg_value(kiln_container().get("args", []), "--config")
    need(path, "the container args pass no --config")
    vols = {v["name"]: v for v in pod_spec().get("volumes", [])}
    for m in kiln_container().get("volumeMounts", []):
        v = vols.get(m["name"], {})
        if "configMap" not in v:
            continue
        items = v["configMap"].get("items") or [{"key": "kiln.toml", "path": "kiln.toml"}]
        for item in items:
            if item["key"] == "kiln.toml":
                mounted = m["mountPath"].rstrip("/") + "/" + item["path"]
                need(mounted == path, f"kiln.toml is mounted at {mounted}, --config reads {path}")
                return
    raise AssertionError(f"no volume mounts the ConfigMap's kiln.toml at {path}")


@check("config_matches_image")
def _():
    image = (DEPLOY / "kiln.toml").read_text()
    need(config_text().strip() == image.strip(),
         "the ConfigMap's kiln.toml differs from deploy/kiln.toml (the image's default)")


@check("data_dir_volume")
def _():
    data_dir = arg_value(kiln_container().get("args", []), "--data-dir") or env_value("KILN_DATA_DIR")
    need(data_dir, "neither --data-dir nor KILN_DATA_DIR is set")
    vols = {v["name"]: v for v in pod_spec().get("volumes", [])}
    for m in kiln_container().get("volumeMounts", []):
        if m["mountPath"].rstrip("/") == data_dir.rstrip("/"):
            need("emptyDir" in vols.get(m["name"], {}), f"{data_dir} is mounted from {m['name']}, not an emptyDir")
            need(not m.get("readOnly"), f"{data_dir} is mounted read-only")
            return
    raise AssertionError(f"nothing is mounted at the data dir {data_dir}")


@check("grace_period")
def _():
    grace = pod_spec().get("terminationGracePeriodSeconds", 30)
    drain = tomllib.loads(config_text()).get("drain_timeout_ms", DEFAULT_DRAIN_TIMEOUT_MS) / 1000
    sleep = prestop_seconds()
    need(grace > sleep + drain,
         f"terminationGracePeriodSeconds {grace} <= preStop sleep {sleep} + drain_timeout_ms/1000 {drain}")


@check("non_root")
def _():
    pod = pod_spec().get("securityContext", {})
    ctr = kiln_container().get("securityContext", {})
    need(pod.get("runAsNonRoot") or ctr.get("runAsNonRoot"), "runAsNonRoot is not set")
    user = [t for k, t in dockerfile() if k == "USER"]
    need(user, "the Dockerfile sets no USER")
    uid = user[-1].split(":")[0]
    need(uid.isdigit() and uid != "0", f"USER {user[-1]}: want a numeric non-root uid (runAsNonRoot needs one)")
    want = pod.get("runAsUser", ctr.get("runAsUser"))
    need(want is None or str(want) == uid, f"runAsUser {want} differs from the image's USER {uid}")


@check("dockerfile_cmd")
def _():
    ins = dockerfile()
    entry = [exec_form(t) for k, t in ins if k == "ENTRYPOINT"]
    cmd = [exec_form(t) for k, t in ins if k == "CMD"]
    need(entry and entry[-1] == ["kiln"], f"ENTRYPOINT {entry[-1] if entry else None}, want [\"kiln\"]")
    need(cmd and cmd[-1][0] == "serve", "CMD does not run `serve`")
    need(arg_value(cmd[-1], "--listen") == "0.0.0.0:8080", "CMD does not listen on 0.0.0.0:8080")
    args = kiln_container().get("args")
    need(args is None or args == cmd[-1], f"container args {args} differ from the image's CMD {cmd[-1]}")
    exposed = [int(p.split("/")[0]) for k, t in ins if k == "EXPOSE" for p in t.split()]
    need(8080 in exposed and 8080 in container_ports().values(), f"EXPOSE {exposed} / containerPort must be 8080")
    # The preStop hook runs `sleep` inside the image: the runtime stage needs a shell's tools.
    base = [t.split()[0] for k, t in ins if k == "FROM"][-1]
    need(not re.search(r"scratch|distroless", base), f"runtime stage {base} has no `sleep` for preStop")


@check("dockerfile_copies")
def _():
    copied = set()
    for k, t in dockerfile():
        if k != "COPY" or "--from=" in t:
            continue
        *srcs, _ = [w for w in shlex.split(t) if not w.startswith("--")]
        for s in srcs:
            need((ROOT / s).exists(), f"COPY {s}: no such path in the repository")
            copied.add(s.rstrip("/"))
    members = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]
    for m in members + ["Cargo.toml", "Cargo.lock"]:
        need(m in copied, f"{m} (cargo loads it) is not copied into the build stage")


# ---- against the binary --------------------------------------------------------------

BIN = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("KILN_BIN") or ROOT / "target/release/kiln")


def clean_env():
    """The environment without KILN_* and AWS_* (they would change what the server does)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "AWS_"))}


HELP = None


def serve_help():
    global HELP
    if HELP is None:
        need(BIN.is_file(), f"no kiln binary at {BIN}")
        HELP = subprocess.run([str(BIN), "serve", "--help"], env=clean_env(), capture_output=True,
                              text=True, timeout=30, check=True).stdout
    return HELP


@check("flags_exist")
def _():
    known = set(re.findall(r"(--[a-z][a-z0-9-]*)", serve_help()))
    cmd = [exec_form(t) for k, t in dockerfile() if k == "CMD"][-1]
    used = [a.split("=")[0] for a in cmd + kiln_container().get("args", []) if a.startswith("--")]
    unknown = sorted(set(used) - known)
    need(not unknown, f"{unknown} not in `kiln serve --help`")


@check("env_vars_known")
def _():
    names = {e["name"] for e in kiln_container().get("env", [])}
    names |= {t.split("=")[0].split()[0] for k, t in dockerfile() if k == "ENV"}
    mentioned = set(re.findall(r"\b((?:KILN|AWS)_[A-Z0-9_]+)", serve_help()))
    readme = (ROOT / "README.md").read_text()
    unknown = []
    for n in sorted(names):
        if not n.startswith(("KILN_", "AWS_")) or n in mentioned:
            continue
        if n in ENV_ONLY and n in readme:
            continue
        unknown.append(n)
    need(not unknown, f"{unknown}: neither in `kiln serve --help` nor a documented variable")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def run_server():
    """Starts `kiln serve` with the ConfigMap's kiln.toml on a loopback port."""
    need(BIN.is_file(), f"no kiln binary at {BIN}")
    tmp = Path(tempfile.mkdtemp(prefix="kiln-deploy-check-"))
    (tmp / "kiln.toml").write_text(config_text())
    port = free_port()
    env = clean_env() | {"KILN_ADMIN_KEY": secrets.token_hex(16), "KILN_NODE_ID": POD_NAME}
    log = open(tmp / "server.log", "w+")
    proc = subprocess.Popen([str(BIN), "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp / "data"),
                             "--config", str(tmp / "kiln.toml")], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            get(f"http://127.0.0.1:{port}/healthz")
            return proc, port, tmp, log
        except OSError:
            time.sleep(0.2)
    exited = proc.poll() is not None
    if not exited:
        proc.kill()
    proc.wait()
    log.seek(0)
    tail = log.read()[-2000:]
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)
    why = f"exited with {proc.returncode}" if exited else "did not answer within 60 s"
    raise AssertionError(f"kiln serve {why}:\n{tail}")


SERVER = None
# What the downward API gives KILN_NODE_ID: a pod name of the Deployment (template hash,
# random suffix).
POD_NAME = "kiln-7d4b9c6f5d-x2x8q"


@check("server_starts")
def _():
    global SERVER
    SERVER = run_server()


def probe_checks():
    try:
        ps = probes()
    except Exception:
        return
    for kind, g in ps.items():
        @check(f"probe {kind} {g['path']}")
        def _(g=g):
            need(SERVER, "no server")
            status, body = get(f"http://127.0.0.1:{SERVER[1]}{g['path']}")
            if status == 404:
                raise AssertionError(f"404: {g['path']} is no route of kiln serve")
            need(status == 200, f"{status} {body[:200]}")


probe_checks()


@check("node_id_is_pod_name")
def _():
    need(SERVER, "no server")
    env = [e for e in kiln_container().get("env", []) if e["name"] == "KILN_NODE_ID"]
    need(env and env[0].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
         "KILN_NODE_ID does not come from the pod name (fieldRef metadata.name)")
    status, body = get(f"http://127.0.0.1:{SERVER[1]}/readyz")
    node = json.loads(body).get("node") if status == 200 else None
    need(node == POD_NAME, f"/readyz names node {node!r} ({status}), want the pod name {POD_NAME!r}")


@check("sigterm_stops_within_drain")
def _():
    need(SERVER, "no server")
    proc, _, _, log = SERVER
    drain = tomllib.loads(config_text()).get("drain_timeout_ms", DEFAULT_DRAIN_TIMEOUT_MS) / 1000
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=drain + 5)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {drain + 5:.0f} s after SIGTERM") from None
    log.seek(0)
    need(code == 0, f"exit {code} after SIGTERM:\n{log.read()[-2000:]}")


if SERVER:
    proc, _, tmp, log = SERVER
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)

passed, failed = results.count(True), results.count(False)
word = "ok" if failed == 0 else "FAILED"
print(f"test result: {word}. {passed} passed; {failed} failed; 0 ignored")
sys.exit(0 if failed == 0 else 1)
