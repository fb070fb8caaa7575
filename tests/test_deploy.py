"""The deployment artifacts in ``deploy/`` (container, manifests, dashboards; docs/deploy.md).

Offline checks, no cluster and no Docker engine:

- the kustomize overlays are built with the real kustomize (``kubectl kustomize``
  or ``kustomize build``) and every object is validated against the Kubernetes
  OpenAPI schemas bundled by ``kubernetes-validate`` (strict: unknown fields
  fail), for the oldest and the newest Kubernetes version we claim;
- what the schemas cannot see: name references resolve, the Service targets
  only the proxy port, probes, securityContext, volumes, overlay differences;
- the ``/etc/casf`` projected volume is laid out on disk as the kubelet does
  (``..<timestamp>`` directory, ``..data`` symlink) and the config is loaded
  from it with the container's environment; then the sidecar is started from
  that layout with the container's own arguments and answers its probes,
  forwards a request and exposes every metric the dashboard and alerts use;
- the compose file, the Dockerfiles and ``.dockerignore`` are parsed and
  checked against each other and against the manifests;
- every metric (and label) the Grafana dashboard and the alert rules use is
  defined in ``proxy/`` (parsed from source), and the rules pass
  ``promtool check rules`` / ``promtool test rules``.

``kubectl``/``kustomize`` and ``promtool`` are external binaries: their tests
skip when the binary is missing, except in CI where they fail (tests/ci.py).
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import socket
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.ci import require_binary
from tests.waiting import poll_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
EXAMPLE = ROOT / "examples" / "clinic"
OVERLAYS = ("embedded", "production")
CONFIG_PATH = "/etc/casf/casf.yaml"
PROXY, BACKEND = "casf-proxy", "clinic-backend"
# The oldest Kubernetes minor version the manifests are meant for, and the
# newest one kubernetes-validate knows.
K8S_VERSIONS = ("1.28.0", "latest")
# Metrics the dashboard/alerts use before proxy/ defines them, with the labels
# they will have. Once a metric is defined in proxy/ it is checked
# like every other one, so this list only needs pruning, never growing.
PENDING_METRICS: dict[str, set[str]] = {}
# Labels Prometheus adds at scrape time; `le` is the histogram bucket label.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container"}


# ------------------------------------------------------------------ kustomize


@cache
def _build(directory: str) -> tuple[dict[str, Any], ...]:
    tool = require_binary("kustomize", "kubectl")
    if Path(tool).name == "kustomize":
        cmd = [tool, "build", directory]
    else:
        cmd = [tool, "kustomize", directory]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(overlay: str) -> list[dict[str, Any]]:
    return list(_build(str(K8S / "overlays" / overlay)))


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objs:
        if o["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"no container {name}"
    return found[0]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def deployment(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "Deployment", "clinic")


def data_of(obj: dict[str, Any]) -> dict[str, str]:
    """A ConfigMap's or Secret's entries as text."""
    if obj["kind"] == "Secret":
        return {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
    return dict(obj.get("data", {}))


# ------------------------------------------------------------------ copies


def test_base_keeps_identical_copies_of_the_clinic_example() -> None:
    """kustomize cannot read examples/clinic, so base/clinic holds copies: no drift."""
    copies = sorted(p.relative_to(BASE / "clinic") for p in (BASE / "clinic").rglob("*")
                    if p.is_file())
    wanted = sorted([Path("casf.yaml"), Path("keys.yaml"), Path("dev-keys/jwks.json"),
                     *(p.relative_to(EXAMPLE) for p in (EXAMPLE / "policies").rglob("*.rego"))])
    assert copies == wanted
    for rel in copies:
        assert (BASE / "clinic" / rel).read_bytes() == (EXAMPLE / rel).read_bytes(), (
            f"deploy/k8s/base/clinic/{rel} differs from examples/clinic/{rel}: "
            f"cp examples/clinic/{rel} deploy/k8s/base/clinic/{rel}")


def test_every_policy_file_is_generated_and_projected() -> None:
    objs = render("embedded")
    policies = one(objs, "ConfigMap", "casf-policies")
    rego = {p.name for p in (BASE / "clinic" / "policies").glob("*.rego")}
    assert set(policies["data"]) == rego
    for where, spec in pod_specs(objs):
        projected = _projection(spec, objs)
        assert {f"policies/{name}" for name in rego} <= set(projected), where


# ------------------------------------------------------------------ schemas


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_match_the_kubernetes_schemas(overlay: str, version: str) -> None:
    import kubernetes_validate

    if version == "latest":
        version = kubernetes_validate.latest_version()
    objs = render(overlay)
    assert objs
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} is not a valid "
                        f"Kubernetes {version} object: {exc.message} at "
                        f"{'.'.join(map(str, exc.absolute_path))}")


def test_schema_validation_rejects_a_misspelt_field() -> None:
    """The check above is strict: an unknown field (a typo) is an error."""
    import kubernetes_validate

    obj = json.loads(json.dumps(deployment(render("embedded"))))
    c = container(obj["spec"]["template"]["spec"], PROXY)
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


# ------------------------------------------------------------------ references


def _named(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert found, f"{kind} {name} is referenced but not rendered"
    return found[0]


def _projection(spec: dict[str, Any], objs: list[dict[str, Any]]) -> dict[str, str]:
    """path → content of the casf-etc projected volume, resolved from the rendered objects."""
    vols = {v["name"]: v for v in spec["volumes"]}
    files: dict[str, str] = {}
    for src in vols["casf-etc"]["projected"]["sources"]:
        kind = "ConfigMap" if "configMap" in src else "Secret"
        ref = src.get("configMap") or src["secret"]
        data = data_of(_named(objs, kind, ref["name"]))
        for item in ref["items"]:
            assert item["key"] in data, f"{kind} {ref['name']} has no key {item['key']}"
            assert item["path"] not in files, f"two sources project {item['path']}"
            files[item["path"]] = data[item["key"]]
    return files


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_configmap_and_secret_reference_resolves(overlay: str) -> None:
    objs = render(overlay)
    namespaces = {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"}
    assert namespaces == {"casf-clinic"}
    assert one(objs, "Namespace")["metadata"]["name"] == "casf-clinic"
    for where, spec in pod_specs(objs):
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    if key in ref:
                        data = data_of(_named(objs, kind, ref[key]["name"]))
                        assert ref[key]["key"] in data, f"{where}: {e['name']}"
            for ef in c.get("envFrom", []):
                for kind, key in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                    if key in ef:
                        _named(objs, kind, ef[key]["name"])
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])}, where
        _projection(spec, objs)


def test_job_and_sidecar_mount_the_same_config() -> None:
    objs = render("production")
    dep = deployment(objs)["spec"]["template"]["spec"]
    job = one(objs, "Job")["spec"]["template"]["spec"]
    assert _projection(job, objs) == _projection(dep, objs)


# ------------------------------------------------------------------ shape


def test_service_targets_only_the_proxy_traffic_port() -> None:
    for overlay in OVERLAYS:
        objs = render(overlay)
        svc = one(objs, "Service")
        spec = deployment(objs)["spec"]["template"]
        labels = spec["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        proxy = container(spec["spec"], PROXY)
        by_name = {p["name"]: p["containerPort"] for p in proxy["ports"]}
        assert by_name == {"http": 8080, "admin": 9901}
        backend = container(spec["spec"], BACKEND)
        assert not backend.get("ports"), "the backend must not advertise a port"
        for port in svc["spec"]["ports"]:
            target = port["targetPort"]
            assert by_name.get(target, target) == 8080, port
        # the backend is reachable only from inside the pod
        args = backend["args"]
        assert args[args.index("--host") + 1] == "127.0.0.1"
        assert env_of(proxy)["CLINIC_UPSTREAM"]["value"] == (
            f"http://127.0.0.1:{args[args.index('--port') + 1]}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_lifecycle_and_resources(overlay: str) -> None:
    objs = render(overlay)
    spec = deployment(objs)["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 30
    proxy = container(spec, PROXY)
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/healthz")):
        get = proxy[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in ("admin", 9901)
    assert proxy["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    backend = container(spec, BACKEND)
    # the backend outlives the proxy's preStop delay
    assert (int(backend["lifecycle"]["preStop"]["exec"]["command"][1])
            > int(proxy["lifecycle"]["preStop"]["exec"]["command"][1]))
    pre_stops = [int(c["lifecycle"]["preStop"]["exec"]["command"][1])
                 for c in spec["containers"]]
    assert max(pre_stops) < spec["terminationGracePeriodSeconds"]
    for where, pspec in pod_specs(objs):
        for c in pspec["containers"]:
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]), f"{where}/{c['name']}"
            assert {"cpu", "memory"} <= set(res["limits"]), f"{where}/{c['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged_with_read_only_root(overlay: str) -> None:
    objs = render(overlay)
    for where, spec in pod_specs(objs):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is False, where
        vols = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc["capabilities"].get("add"), where
            assert "privileged" not in sc or sc["privileged"] is False, where
            for m in c.get("volumeMounts", []):
                if m.get("readOnly"):
                    continue
                # the only writable places: emptyDirs at /tmp and /var/lib/casf
                assert m["mountPath"] in ("/tmp", "/var/lib/casf"), (where, m)
                assert "emptyDir" in vols[m["name"]], (where, m)
        proxy = [c for c in spec["containers"] if c["image"].startswith("casf-proxy")]
        assert proxy, where
        for c in proxy:
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert mounts["/etc/casf"]["readOnly"] is True
            assert "/tmp" in mounts


def test_embedded_overlay_is_one_replica_without_redis_or_postgres() -> None:
    objs = render("embedded")
    dep = deployment(objs)
    assert dep["spec"]["replicas"] == 1
    assert not [o for o in objs if o["kind"] in ("Job", "PodDisruptionBudget")]
    for _, spec in pod_specs(objs):
        for c in spec["containers"]:
            assert not {"REDIS_URL", "PG_DSN"} & set(env_of(c)), c["name"]
    for o in objs:
        if o["kind"] == "Secret":
            assert not {"REDIS_URL", "PG_DSN"} & set(o.get("data", {}))
    proxy = container(dep["spec"]["template"]["spec"], PROXY)
    assert env_of(proxy)["CASF_AUDIT_PATH"]["value"].startswith("/var/lib/casf/")


def test_production_overlay_shares_state_and_migrates_the_audit_schema() -> None:
    objs = render("production")
    dep = deployment(objs)
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    template = dep["spec"]["template"]
    proxy = container(template["spec"], PROXY)
    env = env_of(proxy)
    state_secrets = set()
    for name in ("REDIS_URL", "PG_DSN"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        state_secrets.add(ref["name"])
        assert data_of(_named(objs, "Secret", ref["name"]))[ref["key"]]
    # one chain per pod: CASF_CHAIN_ID is the pod's name
    assert env["CASF_CHAIN_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert pdb["spec"].get("maxUnavailable", 0) == 1 or pdb["spec"].get("minAvailable") == 2

    job = one(objs, "Job")
    jspec = job["spec"]["template"]["spec"]
    (migrate,) = jspec["containers"]
    assert migrate["image"] == proxy["image"]
    assert [*migrate["command"], *migrate["args"]] == [
        "casf-proxy", "audit", "migrate", "-c", CONFIG_PATH]
    owner = migrate["env"][0]["valueFrom"]["secretKeyRef"]
    assert migrate["env"][0]["name"] == "PG_DSN"
    # the schema owner's DSN is the Job's alone, and not the proxies' login
    assert owner["name"] not in state_secrets
    owner_dsn = data_of(_named(objs, "Secret", owner["name"]))["PG_DSN"]
    writer = env["PG_DSN"]["valueFrom"]["secretKeyRef"]
    writer_dsn = data_of(_named(objs, "Secret", writer["name"]))["PG_DSN"]
    assert urlsplit(owner_dsn).username != urlsplit(writer_dsn).username
    assert urlsplit(owner_dsn).hostname == urlsplit(writer_dsn).hostname
    referenced = json.dumps(dep)
    assert owner["name"] not in referenced


def test_generated_secrets_hold_obviously_dev_values() -> None:
    objs = render("production")
    secret_values = [v for o in objs if o["kind"] == "Secret" and o["metadata"]["name"]
                     != "casf-identity" for v in data_of(o).values()]
    assert secret_values
    for value in secret_values:
        if value.startswith("redis://") and "@" not in value:
            continue  # no credential in it
        assert "CHANGE-ME" in value and "dev-only" in value, value


# ------------------------------------------------------------------ the command


def _parse_cli(args: list[str]) -> Any:
    from proxy import cli

    return cli.build_parser().parse_args(args)


def test_container_command_is_the_one_the_tests_run() -> None:
    """`casf-proxy run -c /etc/casf/casf.yaml`, the path a projected casf.yaml."""
    from proxy import cli

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    # casf-proxy is proxy.cli:main: the tests' `python -m proxy.cli run -c FILE`
    assert scripts["casf-proxy"] == "proxy.cli:main"
    for overlay in OVERLAYS:
        spec = deployment(render(overlay))["spec"]["template"]["spec"]
        proxy = container(spec, PROXY)
        assert [*proxy["command"], *proxy["args"]] == ["casf-proxy", "run", "-c", CONFIG_PATH]
        args = _parse_cli(proxy["args"])
        assert args.func is cli.cmd_run and args.config == CONFIG_PATH
        mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
        rel = Path(CONFIG_PATH).relative_to(mounts["casf-etc"]).as_posix()
        projected = _projection(spec, render(overlay))
        assert projected[rel] == (EXAMPLE / "casf.yaml").read_text()
    entry, cmd = _dockerfile_command(DEPLOY / "Dockerfile")
    assert [*entry, *cmd] == ["casf-proxy", "run", "-c", CONFIG_PATH]
    compose = _compose()
    assert compose["services"]["proxy"]["command"] == ["run", "-c", CONFIG_PATH]


# ------------------------------------------------------------------ the config, as mounted


def _pod_env(c: dict[str, Any], objs: list[dict[str, Any]], pod: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            out[e["name"]] = str(e["value"])
            continue
        ref = e["valueFrom"]
        if "fieldRef" in ref:
            assert ref["fieldRef"]["fieldPath"] == "metadata.name"
            out[e["name"]] = pod
        else:
            kind, key = (("Secret", "secretKeyRef") if "secretKeyRef" in ref
                         else ("ConfigMap", "configMapKeyRef"))
            out[e["name"]] = data_of(_named(objs, kind, ref[key]["name"]))[ref[key]["key"]]
    return out


def _materialise(files: dict[str, str], mount: Path) -> None:
    """Write a projected volume the way the kubelet's atomic writer does."""
    stamp = mount / "..2026_01_01_00_00_00.000000001"
    for rel, content in files.items():
        target = stamp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    (mount / "..data").symlink_to(stamp.name)
    for top in {rel.split("/")[0] for rel in files}:
        (mount / top).symlink_to(f"..data/{top}")


POD_NAME = "clinic-5d8f7c9b6-x7k2p"


def _mounted(tmp_path: Path, overlay: str) -> tuple[Path, dict[str, str], dict[str, Any]]:
    objs = render(overlay)
    spec = deployment(objs)["spec"]["template"]["spec"]
    proxy = container(spec, PROXY)
    mount = tmp_path / "etc-casf"
    mount.mkdir()
    _materialise(_projection(spec, objs), mount)
    return mount, _pod_env(proxy, objs, POD_NAME), proxy


def _clean_env() -> dict[str, str]:
    drop = ("CASF_", "REDIS_URL", "PG_DSN", "CLINIC_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def test_config_loads_from_the_projected_volume_with_the_pod_environment(
        tmp_path: Path) -> None:
    from proxy.config import load_config
    from proxy.settings import Environment

    mount, env, _ = _mounted(tmp_path, "embedded")
    cfg = load_config(mount / "casf.yaml", Environment(env))
    assert (cfg.traffic.host, cfg.traffic.port) == ("0.0.0.0", 8080)
    assert (cfg.admin.host, cfg.admin.port) == ("0.0.0.0", 9901)
    assert cfg.upstream.url == "http://127.0.0.1:3000"
    assert str(cfg.audit.sqlite_path) == "/var/lib/casf/casf-audit.db"
    assert cfg.audit.chain_id == POD_NAME
    # the bundle is read once, from the real directory (not also via ..data)
    names = [f.name for f in cfg.policy.files]
    assert names == sorted({p.name for p in (EXAMPLE / "policies").glob("*.rego")
                            if not p.name.endswith("_test.rego")})
    local = load_config(EXAMPLE / "casf.yaml", Environment({}))
    assert cfg.policy.policy_hash == local.policy.policy_hash
    # and the CLI agrees (policies compile), with exactly the pod's environment
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "validate", "-c",
                          str(mount / "casf.yaml")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={**_clean_env(), **env}, check=False)
    assert out.returncode == 0, out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait_http(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 20) -> None:
    def answers() -> bool:
        for p in procs:
            assert p.poll() is None, f"process exited with {p.returncode}"
        try:
            _get(url)
        except OSError:
            return False
        return True

    poll_until(answers, f"{url} to answer", timeout=timeout, interval=0.05)


def test_sidecar_starts_from_the_manifest_and_answers_its_probes(tmp_path: Path) -> None:
    """The container's args, its environment and its /etc/casf, run as a process.

    Only the listen addresses (loopback, free ports), the upstream port and the
    SQLite path are changed, so that it runs beside other tests.
    """
    mount, env, proxy = _mounted(tmp_path, "embedded")
    backend_port, port, admin = _free_port(), _free_port(), _free_port()
    env.update(CASF_HOST="127.0.0.1", CASF_ADMIN_HOST="127.0.0.1", CASF_PORT=str(port),
               CASF_ADMIN_PORT=str(admin), CASF_DECISIONS_PORT=str(_free_port()),
               CLINIC_UPSTREAM=f"http://127.0.0.1:{backend_port}",
               CASF_AUDIT_PATH=str(tmp_path / "casf-audit.db"))
    args = [a.replace(str(Path(CONFIG_PATH).parent), str(mount)) for a in proxy["args"]]
    log = tmp_path / "proxy.log"
    procs: list[subprocess.Popen[bytes]] = []
    with log.open("wb") as out:
        try:
            procs.append(subprocess.Popen(
                [sys.executable, str(EXAMPLE / "backend.py"), "--host", "127.0.0.1",
                 "--port", str(backend_port)], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
            procs.append(subprocess.Popen([sys.executable, "-m", "proxy.cli", *args],
                                          cwd=tmp_path, env={**_clean_env(), **env},
                                          stdout=out, stderr=subprocess.STDOUT))
            admin_url = f"http://127.0.0.1:{admin}"
            _wait_http(f"{admin_url}/health", procs)
            _wait_http(f"http://127.0.0.1:{backend_port}/healthz", procs)
            for probe in ("livenessProbe", "readinessProbe"):
                status, body = _get(admin_url + proxy[probe]["httpGet"]["path"])
                assert status == 200, (probe, body)
            status, body = _get(f"http://127.0.0.1:{port}/appointments",
                                {"X-API-Key": "demo-receptionist"})
            assert status == 200, body
            status, _ = _get(f"http://127.0.0.1:{port}/appointments")
            assert status == 401
            status, text = _get(f"{admin_url}/metrics")
            assert status == 200
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    missing = {m for m in _referenced_metrics()
               if _family(m, families) is None and m not in PENDING_METRICS}
    assert not missing, f"used by deploy/grafana or deploy/prometheus, not in /metrics: {missing}"


# ------------------------------------------------------------------ compose


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    return data


def test_compose_wires_redis_postgres_backend_and_proxy() -> None:
    c = _compose()
    services = c["services"]
    assert set(services) == {"redis", "postgres", "migrate", "backend", "proxy"}
    here = DEPLOY / "compose"
    proxy, backend = services["proxy"], services["backend"]
    for name in ("proxy", "migrate", "backend"):
        build = services[name]["build"]
        assert (here / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).is_file()
    assert services["proxy"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert proxy["image"] == services["migrate"]["image"]
    env = proxy["environment"]
    # the config: examples/clinic itself, read-only at /etc/casf
    for name in ("proxy", "migrate"):
        mounts = [v.split(":") for v in services[name]["volumes"]]
        etc = [m for m in mounts if m[1] == "/etc/casf"]
        assert etc and etc[0][2] == "ro"
        assert (here / etc[0][0]).resolve() == EXAMPLE
        assert (here / etc[0][0] / Path(CONFIG_PATH).name).is_file()
    # dependencies are addressed by service name, on the ports they serve
    assert urlsplit(env["REDIS_URL"]).hostname == "redis"
    pg = urlsplit(env["PG_DSN"])
    assert (pg.hostname, pg.port, pg.path) == ("postgres", 5432, "/casf")
    upstream = urlsplit(env["CLINIC_UPSTREAM"])
    bargs = backend["command"]
    assert upstream.hostname == "backend"
    assert str(upstream.port) == bargs[bargs.index("--port") + 1]
    assert bargs[bargs.index("--host") + 1] == "0.0.0.0"
    assert "ports" not in backend, "the backend must only be reachable through the proxy"
    assert env["CASF_HOST"] == env["CASF_ADMIN_HOST"] == "0.0.0.0"
    published = {p.rsplit(":", 1)[1]: p for p in proxy["ports"]}
    assert published[env["CASF_PORT"]] == f"{env['CASF_PORT']}:{env['CASF_PORT']}"
    assert published[env["CASF_ADMIN_PORT"]].startswith("127.0.0.1:")
    # the proxy's login is not the schema owner; the migrate job uses the owner
    owner = services["postgres"]["environment"]
    assert pg.username != owner["POSTGRES_USER"]
    init = (here / "postgres-init.sql").read_text()
    assert f"CREATE ROLE {pg.username} LOGIN PASSWORD '{pg.password}'" in init
    mig = urlsplit(services["migrate"]["environment"]["PG_DSN"])
    assert (mig.username, mig.password) == (owner["POSTGRES_USER"], owner["POSTGRES_PASSWORD"])
    assert services["migrate"]["command"] == ["audit", "migrate", "-c", CONFIG_PATH]
    _parse_cli(services["migrate"]["command"])
    # start order, and every awaited health state has a healthcheck
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, name
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], dep
    assert proxy["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert {"redis", "postgres", "backend"} <= set(proxy["depends_on"])
    # hardened like the pod
    assert proxy["read_only"] is True and "/tmp" in proxy["tmpfs"]
    assert proxy["user"].split(":")[0] == str(_dockerfile_uid(DEPLOY / "Dockerfile"))
    assert proxy["cap_drop"] == ["ALL"]
    # `${VAR}` interpolations all have defaults: `up` works without an .env file
    text = (here / "compose.yaml").read_text()
    for var in re.findall(r"\$\{([^}]*)\}", text):
        assert ":-" in var, var


def test_compose_and_manifests_use_the_same_images() -> None:
    images = {c["image"] for _, spec in pod_specs(render("production"))
              for c in spec["containers"]}
    compose = {s["image"] for s in _compose()["services"].values() if "build" in s}
    assert images == compose


# ------------------------------------------------------------------ Dockerfiles


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        op, _, rest = full.partition(" ")
        out.append((op.upper(), rest.strip()))
    assert not pending
    return out


def _final_stage(path: Path) -> list[tuple[str, str]]:
    ins = _instructions(path)
    last = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last:]


def _dockerfile_command(path: Path) -> tuple[list[str], list[str]]:
    stage = dict(_final_stage(path))
    return json.loads(stage["ENTRYPOINT"]), json.loads(stage["CMD"])


def _dockerfile_uid(path: Path) -> int:
    user = dict(_final_stage(path))["USER"]
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER must be numeric: {user}"
    return int(user.split(":")[0])


def test_proxy_dockerfile() -> None:
    path = DEPLOY / "Dockerfile"
    ins = _instructions(path)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for op, a in ins if op == "ARG" and "=" in a}
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", args["PYTHON_IMAGE"])
    assert all(a.split()[0] == "${PYTHON_IMAGE}" for op, a in ins if op == "FROM")
    assert "HEALTHCHECK" not in {op for op, _ in ins}
    runs = " ".join(a for op, a in ins if op == "RUN")
    # the runtime lock with hashes first, then the package with nothing more resolved
    assert "pip install --require-hashes -r requirements/runtime.lock" in runs
    assert re.search(r"pip install --no-deps \.(\s|$)", runs), "installs the package, no extras"
    assert "[dev]" not in runs
    final = _final_stage(path)
    env = " ".join(a for op, a in final if op == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    uid = _dockerfile_uid(path)
    assert uid >= 10000
    assert sorted(dict(final)["EXPOSE"].split()) == ["8080", "9901"]
    # the manifests run it as the image's user
    for _, spec in pod_specs(render("production")):
        for c in spec["containers"]:
            if c["image"].startswith("casf-proxy"):
                assert c["securityContext"]["runAsUser"] == uid


def test_backend_dockerfile() -> None:
    path = DEPLOY / "Dockerfile.clinic-backend"
    final = dict(_final_stage(path))
    uid = _dockerfile_uid(path)
    assert uid >= 10000
    assert "HEALTHCHECK" not in final
    assert "examples/clinic/backend.py" in final["COPY"]
    entry, cmd = json.loads(final["ENTRYPOINT"]), json.loads(final["CMD"])
    assert entry[-1].endswith("backend.py") and "--port" in cmd
    spec = deployment(render("embedded"))["spec"]["template"]["spec"]
    assert container(spec, BACKEND)["securityContext"]["runAsUser"] == uid


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.removeprefix("!").strip("/")
        regex = re.escape(pat).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_images_copy() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    sources: list[str] = []
    for dockerfile in (DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.clinic-backend"):
        for op, arg in _instructions(dockerfile):
            if op == "COPY" and not arg.startswith("--from"):
                sources += arg.split()[:-1]
    assert sources
    for src in sources:
        files = ([p for p in (ROOT / src).rglob("*") if p.is_file()] if (ROOT / src).is_dir()
                 else [ROOT / src])
        assert files, src
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if "__pycache__" in rel or rel.endswith(".pyc"):
                continue
            assert not _dockerignored(rel, patterns), f"{rel} is excluded by .dockerignore"
    for rel in (".venv/bin/python", ".git/HEAD", "tests/test_deploy.py",
                "proxy/__pycache__/cli.cpython-311.pyc", "examples/clinic/casf-audit.db"):
        assert _dockerignored(rel, patterns), rel


# ------------------------------------------------------------------ metrics


def _defined_metrics() -> dict[str, tuple[str, set[str]]]:
    """name → (type, label names) for every prometheus_client metric created in proxy/."""
    kinds = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
    out: dict[str, tuple[str, set[str]]] = {}
    for path in (ROOT / "proxy").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            kind = (func.id if isinstance(func, ast.Name)
                    else func.attr if isinstance(func, ast.Attribute) else "")
            if kind not in kinds or not node.args:
                continue
            first = node.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                continue
            labels_node = node.args[2] if len(node.args) > 2 else next(
                (k.value for k in node.keywords if k.arg == "labelnames"), None)
            labels: set[str] = set()
            if isinstance(labels_node, ast.List | ast.Tuple):
                labels = {e.value for e in labels_node.elts
                          if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            out[first.value] = (kind.lower(), labels)
    return out


def _exposed(defined: dict[str, tuple[str, set[str]]]) -> dict[str, tuple[str, set[str]]]:
    """Sample names /metrics shows → (family, labels), per prometheus_client's rules."""
    out: dict[str, tuple[str, set[str]]] = {}
    for name, (kind, labels) in defined.items():
        if kind == "counter":
            base = name.removesuffix("_total")
            names = {f"{base}_total": labels, f"{base}_created": labels}
        elif kind == "histogram":
            names = {f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels,
                     f"{name}_count": labels, f"{name}_created": labels}
        elif kind == "summary":
            names = {name: labels | {"quantile"}, f"{name}_sum": labels,
                     f"{name}_count": labels}
        elif kind == "info":
            names = {f"{name}_info": labels}
        else:
            names = {name: labels}
        for sample, lbl in names.items():
            out[sample] = (name, lbl)
    return out


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DEPLOY / "grafana" / "casf-proxy.json").read_text())
    return data


def _alerts() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    return data


def _expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every dashboard target, template variable and alert rule."""
    out: list[tuple[str, str]] = []
    dash = _dashboard()
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", t["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", var["definition"])
            assert m, var["definition"]
            out.append((f"variable {var['name']}", m.group(1)))
    for group in _alerts()["groups"]:
        for rule in group["rules"]:
            out.append((f"alert {rule['alert']}", rule["expr"]))
    return out


def _referenced_metrics() -> set[str]:
    return {m for _, expr in _expressions() for m in re.findall(r"\bcasf_[a-z0-9_]+", expr)}


def _family(sample: str, families: dict[str, str]) -> str | None:
    """The /metrics family (from # TYPE lines) a sample name belongs to."""
    if sample in families:
        return sample
    for suffix in ("_bucket", "_sum", "_count", "_created", "_total", "_info"):
        base = sample.removesuffix(suffix)
        if base != sample and base in families:
            return base
    return None


def test_dashboard_and_alerts_use_only_metrics_the_proxy_defines() -> None:
    exposed = _exposed(_defined_metrics())
    assert "casf_requests_total" in exposed and "casf_request_duration_seconds_bucket" in exposed
    referenced = _referenced_metrics()
    unknown = referenced - set(exposed) - set(PENDING_METRICS)
    assert not unknown, f"not defined in proxy/: {sorted(unknown)}"
    assert set(PENDING_METRICS) <= referenced, "prune PENDING_METRICS"
    # the stable metric families (docs/operations.md) all appear on the dashboard
    for name in ("casf_requests_total", "casf_request_duration_seconds_bucket", "casf_in_flight",
                 "casf_fail_closed_total", "casf_replay_hit_total", "casf_replay_mismatch_total",
                 "casf_rate_limited_total", "casf_shadow_denied_total", "casf_audit_events_total",
                 "casf_upstream_duration_seconds_bucket", "casf_budget_warning_total"):
        assert name in referenced, name


def test_dashboard_and_alerts_use_only_labels_the_metrics_have() -> None:
    exposed = _exposed(_defined_metrics())
    labels_of = {name: lbl for name, (_, lbl) in exposed.items()}
    for name, lbl in PENDING_METRICS.items():
        labels_of.setdefault(name, lbl)
    for where, expr in _expressions():
        expr = expr.replace("$__rate_interval", "5m")
        allowed: set[str] = set(TARGET_LABELS)
        for metric, selector in re.findall(r"\b(casf_[a-z0-9_]+)(\{[^}]*\})?", expr):
            own = labels_of[metric] | TARGET_LABELS
            allowed |= own
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
                assert label in own, f"{where}: {metric} has no label {label!r}"
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in allowed, f"{where}: no metric in it has label {label!r}"


def test_dashboard_structure() -> None:
    dash = _dashboard()
    assert dash["uid"] == "casf-proxy"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job"} <= variables
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("decision", "latency", "fail-closed", "replay", "rate-limited", "shadow",
                  "audit", "upstream", "in flight", "budget"):
        assert topic in titles, topic
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}"
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert 'job=~"$job"' in t["expr"], (p["title"], t["expr"])
    quantiles = {q for p in dash["panels"] for t in p.get("targets", [])
                 for q in re.findall(r"histogram_quantile\((0\.\d+)", t["expr"])
                 if "casf_request_duration_seconds" in t["expr"]}
    assert {"0.5", "0.95", "0.99"} <= quantiles


def test_alert_rules_cover_what_operators_watch() -> None:
    rules = {r["alert"]: r for g in _alerts()["groups"] for r in g["rules"]}
    assert "casf_fail_closed_total" in rules["CasfFailClosed"]["expr"]
    assert "casf_replay_mismatch_total" in rules["CasfReplayMismatchSpike"]["expr"]
    p95 = rules["CasfHighLatencyP95"]["expr"]
    assert "histogram_quantile(0.95" in p95 and p95.rstrip().endswith("> 0.05")
    assert "casf_audit_errors_total" in rules["CasfAuditErrors"]["expr"]
    assert 'casf_config_reload_total{result="error"}' in rules["CasfConfigReloadFailed"]["expr"]
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name


def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    promtool = require_binary("promtool")
    here = DEPLOY / "prometheus"
    for args in (["check", "rules", "alerts.yaml"], ["test", "rules", "alerts_test.yaml"]):
        out = subprocess.run([promtool, *args], cwd=here, capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}{out.stderr}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each dashboard query, with Grafana's variables filled in, as a recording rule."""
    promtool = require_binary("promtool")
    rules = [{"record": f"casf_dashboard:query{i}",
              "expr": expr.replace("$__rate_interval", "5m").replace("$job", ".+")}
             for i, (where, expr) in enumerate(_expressions()) if where.startswith("panel")]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------ docs


def test_deploy_doc_names_only_existing_files() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    paths = set(re.findall(r"\b((?:deploy|examples|docs)/[\w./-]*[\w/])", text))
    assert "deploy/k8s/overlays/embedded" in paths
    assert "deploy/k8s/overlays/production" in paths
    for rel in paths:
        if any(ch in rel for ch in "*"):
            continue
        assert (ROOT / rel).exists(), f"docs/deploy.md names {rel}, which does not exist"
    assert "kubectl apply -k deploy/k8s/overlays/embedded" in text


# ------------------------------------------------------------------ dependency locks


def _locked(path: Path) -> dict[str, list[str]]:
    """Package name -> its hashes, from a pip-compile --generate-hashes file."""
    pins: dict[str, list[str]] = {}
    name = ""
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line)
        if m:
            name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
            pins[name] = []
        elif (h := re.search(r"--hash=sha256:([0-9a-f]{64})", line)) and name:
            pins[name].append(h.group(1))
    return pins


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", r)[0]).lower()  # type: ignore[index]
            for r in reqs}


def test_locks_pin_every_dependency_with_hashes() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _requirement_names(project["dependencies"])
    dev = _requirement_names(project["optional-dependencies"]["dev"])
    for lock, wanted in ((ROOT / "requirements" / "runtime.lock", runtime),
                         (ROOT / "requirements" / "dev.lock", runtime | dev)):
        pins = _locked(lock)
        assert wanted <= set(pins), (lock.name, sorted(wanted - set(pins)))
        assert all(pins.values()), [n for n, h in pins.items() if not h]  # every pin hashed
        text = lock.read_text()
        assert "--index-url" not in text and "--find-links" not in text  # no machine paths
    # the image runs the versions the tests ran with
    versions = {lock: dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)",
                                      (ROOT / "requirements" / lock).read_text(), re.M))
                for lock in ("runtime.lock", "dev.lock")}
    for name, version in versions["runtime.lock"].items():
        assert versions["dev.lock"].get(name) == version, name
    boot = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert "--require-hashes -r requirements/dev.lock" in boot
    assert "--no-deps -e ." in boot

