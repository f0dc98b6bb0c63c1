"""The deployment recipes of deploy/ (docs/deploy.md), each checked with the real tool.

- Kubernetes: ``kubectl kustomize`` renders the folder (keys made by the real CLI), every
  object is validated against the Kubernetes OpenAPI schemas (``kubernetes-validate``,
  strict: an unknown field fails), and the objects are cross-checked: selectors, ports,
  probes, scrape annotations, Secrets, GPU placement, grace periods. ``kubectl apply
  --dry-run=client`` is not used: even with ``--validate=false`` it asks a cluster for
  its API groups, and there is none here.
- systemd: ``systemd-analyze verify`` on the units, with ExecStart pointed at this
  checkout's ``workerpool``.
- Slurm: the sbatch script runs for real under stand-ins for ``scontrol`` and ``srun``,
  on loopback: a router and two nodes, a router crash, then SIGTERM drains it all.
- Docker: the Dockerfile's install steps against the Makefile's. Building it needs a
  Docker daemon, which CI lacks; ``WORKERPOOL_TEST_DOCKER=1`` with one builds it.

Every ``workerpool`` command line of every recipe is parsed by the real CLI (click's
``make_context``, so an unknown or misspelled flag fails), with the files it names taken
from where the recipe puts them: the pod's mounted ConfigMap and Secrets, deploy/systemd.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
import uuid
import warnings
from pathlib import Path

import click
import pytest

from ipc import curve
from router.listener import ROUTES
from tests.conftest import ROOT, _env
from workerpool import Client
from workerpool.config import PoolConfig, SecurityConfig, parse_http_address
from workerpool.errors import WorkerPoolError

pytestmark = pytest.mark.timeout(90)

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
SBATCH = DEPLOY / "slurm" / "workerpool.sbatch"
DOCKERFILE = DEPLOY / "Dockerfile"
GPU = "nvidia.com/gpu"


# -- the real CLI, parsing only ---------------------------------------------------------------
def parse_cli(argv: list[str]) -> click.Context:
    """Parse ``workerpool ARGV...`` as the real CLI does, down to the subcommand, without
    running it: types, choices, ``exists`` checks and callbacks apply, so an unknown or
    misspelled flag raises ``click.UsageError``. Returns the subcommand's context."""
    from workerpool.cli import main

    ctx = main.make_context("workerpool", list(argv), resilient_parsing=False)
    cmd: click.Command = main
    while isinstance(cmd, click.Group):
        with warnings.catch_warnings():  # protected_args: deprecated, still the way in 8.x
            warnings.simplefilter("ignore", DeprecationWarning)
            rest = [*ctx.protected_args, *ctx.args]
        assert rest, f"no subcommand in {argv}"
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        ctx = cmd.make_context(name, rest, parent=ctx, resilient_parsing=False)
    return ctx


def test_parse_cli_refuses_a_misspelled_flag(tmp_path):
    """The check the recipes rely on: a flag the CLI does not have fails, as does a
    --config file that is not there."""
    assert parse_cli(["router", "--frontend", "tcp://0.0.0.0:5555"]).params["frontend"]
    with pytest.raises(click.UsageError, match="--fronted"):
        parse_cli(["router", "--fronted", "tcp://0.0.0.0:5555"])
    with pytest.raises(click.UsageError):
        parse_cli(["worker", "--node", "a"])  # --router is required
    with pytest.raises(click.BadParameter):
        parse_cli(["worker", "--router", "tcp://a:1", "--config", str(tmp_path / "none.toml")])


def tcp_port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


# -- Dockerfile -----------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        instr, _, rest = pending.strip().partition(" ")
        out.append((instr.upper(), rest.strip()))
        pending = ""
    return out


def image_entrypoint() -> list[str]:
    return json.loads(next(a for i, a in dockerfile() if i == "ENTRYPOINT"))


def test_dockerfile_installs_what_the_makefile_does():
    """Same torch pin first, then the project with the Makefile's extras less ``dev``
    (pytest and ruff have no place in a serving image), from the packages pyproject.toml
    lists; a non-root user; the CMD parses."""
    steps = dockerfile()
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    assert next(a for i, a in steps if i == "FROM") == "python:3.11-slim"
    runs = [re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), a)
            for i, a in steps if i == "RUN"]
    installs = [r for r in runs if "pip install" in r]

    make = [line.strip() for line in (ROOT / "Makefile").read_text().splitlines()
            if "pip install" in line]
    pin = re.search(r"torch==([\w.+]+)", next(m for m in make if "torch==" in m)).group(1)
    extras = set(re.search(r"\.\[([\w,]+)\]", make[-1]).group(1).split(","))
    assert "--upgrade pip" in make[0] and any("--upgrade pip" in r for r in installs)

    torch_step = next(n for n, r in enumerate(installs) if "torch==" in r)
    assert re.search(r"torch==([\w.+]+)", installs[torch_step]).group(1) == pin
    project_step = next(n for n, r in enumerate(installs) if re.search(r"'\.\[", r))
    assert torch_step < project_step, "torch must be installed, pinned, before the project"
    image_extras = set(re.search(r"\.\[([\w,]+)\]", installs[project_step]).group(1).split(","))
    assert image_extras == extras - {"dev"}, (image_extras, extras)
    assert "cpu" in args["TORCH_INDEX_URL"]  # the CUDA build is a --build-arg away

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {Path(src).name for i, a in steps if i == "COPY" for src in a.split()[:-1]}
    packages = {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}
    assert packages | {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    ignored = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "deploy/kubernetes/keys"} <= ignored
    assert not copied & ignored

    user = next(a for i, a in steps if i == "USER").split(":")[0]
    assert user not in ("root", "0")
    assert image_entrypoint() == ["workerpool"]
    cmd = json.loads(next(a for i, a in steps if i == "CMD"))
    assert parse_cli(cmd).info_name == "up"


@pytest.mark.timeout(1800)
@pytest.mark.skipif(os.environ.get("WORKERPOOL_TEST_DOCKER") != "1",
                    reason="builds a multi-GB image: set WORKERPOOL_TEST_DOCKER=1 (needs a "
                           "Docker daemon, which CI lacks)")
def test_docker_image_builds_and_runs():
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.skip("docker info fails: no Docker daemon")
    tag = f"workerpool-test:{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "build", "-f", str(DOCKERFILE), "-t", tag, str(ROOT)], check=True)
    try:
        out = subprocess.run(["docker", "run", "--rm", tag, "router", "--help"],
                             capture_output=True, text=True, check=True).stdout
        assert "--frontend" in out
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)


# -- Kubernetes -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s(tmp_path_factory) -> dict[tuple[str, str], dict]:
    """deploy/kubernetes rendered by ``kubectl kustomize``, after the steps its
    kustomization asks for (`keys init`, `keys add ... client probe`): (kind, name) ->
    object."""
    import yaml

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it renders the kustomization offline)")
    work = tmp_path_factory.mktemp("k8s") / "kubernetes"
    shutil.copytree(K8S, work, ignore=shutil.ignore_patterns("keys"))
    curve.init_keys(work / "keys")
    curve.add_key(work / "keys", "client", "probe")
    out = subprocess.run([kubectl, "kustomize", str(work)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    objects = {}
    for obj in yaml.safe_load_all(out.stdout):
        if obj:
            objects[obj["kind"], obj["metadata"]["name"].rsplit("-", 1)[0]
                    if obj["kind"] == "ConfigMap" else obj["metadata"]["name"]] = obj
    return objects


def test_kubernetes_objects_match_the_api_schemas(k8s):
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    for obj in k8s.values():
        kubernetes_validate.validate(obj, version, strict=True)
    assert {kind for kind, _ in k8s} == {"Namespace", "ConfigMap", "Secret", "Service",
                                          "Deployment", "DaemonSet"}


def pod(k8s, kind: str, name: str) -> dict:
    return k8s[kind, name]["spec"]["template"]


def container(k8s, kind: str, name: str) -> dict:
    (c,) = pod(k8s, kind, name)["spec"]["containers"]
    return c


def argv(c: dict) -> list[str]:
    """The container's command line as Kubernetes runs it: the image's ENTRYPOINT (from
    deploy/Dockerfile) unless ``command`` replaces it, ``args`` after, each ``$(VAR)``
    expanded from its env, which must define it (Kubernetes would pass it on as text)."""
    env = {e["name"]: e.get("value", f"<{e['name']}>") for e in c.get("env", [])}

    def expand(arg: str) -> str:
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in env, f"$({var}) in {c['name']}'s args is not in its env"
            arg = arg.replace(f"$({var})", env[var])
        return arg

    return [expand(a) for a in (c.get("command") or image_entrypoint()) + c.get("args", [])]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def config_of(k8s) -> PoolConfig:
    data = k8s["ConfigMap", "workerpool-config"]["data"]["workerpool.toml"]
    return PoolConfig.model_validate(tomllib.loads(data))


def test_kubernetes_router_is_wired_to_its_service_probes_and_scrapes(k8s):
    dep = k8s["Deployment", "workerpool-router"]
    template = pod(k8s, "Deployment", "workerpool-router")
    c = container(k8s, "Deployment", "workerpool-router")
    args = argv(c)
    labels = template["metadata"]["labels"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()

    svc = k8s["Service", "workerpool-router"]
    assert svc["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for p in svc["spec"]["ports"]:
        assert p["targetPort"] in ports, f"Service port {p['name']} targets no container port"
    assert ports["frontend"] == tcp_port(flag(args, "--frontend"))
    assert ports["backend"] == tcp_port(flag(args, "--backend"))
    metrics_port = parse_http_address(flag(args, "--metrics"))[1]
    assert ports["metrics"] == metrics_port

    notes = template["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == metrics_port
    assert notes["prometheus.io/path"] in ROUTES

    ready = c["readinessProbe"]["httpGet"]
    assert ports[ready["port"]] == metrics_port and ready["path"] in ROUTES
    alive = c["livenessProbe"]["httpGet"]
    assert ports[alive["port"]] == metrics_port and alive["path"] == "/healthz" in ROUTES

    cfg = config_of(k8s)
    drain = cfg.router.drain_timeout + cfg.supervisor.stop_timeout
    assert template["spec"]["terminationGracePeriodSeconds"] > drain


def test_kubernetes_gpu_nodes_reach_the_router_through_its_service(k8s):
    ds = k8s["DaemonSet", "workerpool-worker"]
    template = pod(k8s, "DaemonSet", "workerpool-worker")
    spec = template["spec"]
    c = container(k8s, "DaemonSet", "workerpool-worker")
    args = argv(c)
    assert args[:2] == ["workerpool", "worker"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()

    # --router names the Service and its backend port, which leads to the router's --backend.
    svc = k8s["Service", "workerpool-router"]
    host, port = flag(args, "--router").removeprefix("tcp://").rsplit(":", 1)
    assert host == svc["metadata"]["name"]
    by_port = {p["port"]: p for p in svc["spec"]["ports"]}
    assert by_port[int(port)]["targetPort"] == "backend"

    # --node from the downward API: one supervisor per node, named after it.
    env = {e["name"]: e for e in c["env"]}
    node_var = re.fullmatch(r"\$\((\w+)\)", flag(c["args"], "--node")).group(1)
    assert env[node_var]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"

    assert int(c["resources"]["limits"][GPU]) >= 1
    assert any(t["key"] == GPU for t in spec["tolerations"])
    assert spec["nodeSelector"]

    for probe in ("readinessProbe", "livenessProbe"):
        cmd = c[probe]["exec"]["command"]
        assert cmd[2] == probe.removesuffix("Probe")
        host, port = flag(cmd, "--router").removeprefix("tcp://").rsplit(":", 1)
        assert host == svc["metadata"]["name"] and by_port[int(port)]["targetPort"] == "frontend"

    cfg = config_of(k8s)
    assert cfg.services[0].devices == "auto"
    assert spec["terminationGracePeriodSeconds"] > \
        cfg.router.drain_timeout + cfg.supervisor.stop_timeout


def pod_files(k8s, kind: str, name: str, root: Path) -> list[str]:
    """Write what the pod's container sees of its ConfigMap and Secret volumes under
    ``root`` (a mount at /a/b lies at root/a/b); returns the mount paths."""
    template = pod(k8s, kind, name)
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    mounts = []
    for m in container(k8s, kind, name)["volumeMounts"]:
        v = volumes[m["name"]]
        if "configMap" in v:
            obj = k8s["ConfigMap", v["configMap"]["name"].rsplit("-", 1)[0]]
            data = {k: s.encode() for k, s in obj["data"].items()}
        elif "secret" in v:
            obj = k8s["Secret", v["secret"]["secretName"]]
            data = {k: base64.b64decode(s) for k, s in obj["data"].items()}
        else:
            continue
        local = root / m["mountPath"].lstrip("/")
        if "subPath" in m:
            assert m["subPath"] in data, f"{m['mountPath']}: no {m['subPath']} in {v['name']}"
            data = {local.name: data[m["subPath"]]}
            local = local.parent
        local.mkdir(parents=True, exist_ok=True)
        for key, content in data.items():
            (local / key).write_bytes(content)
        mounts.append(m["mountPath"])
    return mounts


def localize(args: list[str], mounts: list[str], root: Path) -> list[str]:
    """``args`` with each path in, or above, a mount moved under ``root``."""
    def inside(a: str) -> bool:
        return any(a == m or a.startswith(m + "/") or m.startswith(a.rstrip("/") + "/")
                   for m in mounts)

    return [str(root / a.lstrip("/")) if a.startswith("/") and inside(a) else a for a in args]


def test_kubernetes_command_lines_parse_with_their_mounted_files(k8s, tmp_path):
    """Every `workerpool` command line of both pods parses, and the files it names exist in
    its pod and load: the config, the router's keys directory (its pair, a key in each
    role folder), and each peer's pair, which the router admits in the role it needs."""
    store = None
    for kind, name in (("Deployment", "workerpool-router"), ("DaemonSet", "workerpool-worker")):
        root = tmp_path / name
        mounts = pod_files(k8s, kind, name, root)
        c = container(k8s, kind, name)
        lines = [argv(c)] + [argv({"name": p, "command": c[p]["exec"]["command"]})
                             for p in ("readinessProbe", "livenessProbe") if "exec" in c[p]]
        for line in lines:
            line = localize(line, mounts, root)
            if line[0] == "python":  # node-probe.py, from the ConfigMap
                assert Path(line[1]).is_file(), line
                line = ["workerpool", "status", *line[3:]]  # its key flags are status's
            ctx = parse_cli(line[1:])
            p = ctx.params
            if p.get("config_path"):
                PoolConfig.load(p["config_path"])
            if ctx.info_name == "router":
                store = curve.KeyStore(p["keys_dir"])
                roles = {store.role(curve.load_public(f))
                         for f in Path(p["keys_dir"]).glob("*/*.key")}
                assert roles == set(curve.Role), roles
            else:
                keys = curve.PeerKeys.from_files(p["key"], p["router_key"])
                assert keys.server == store.public, f"{line}: another router's key"
                wanted = curve.Role.WORKER if ctx.info_name == "worker" else curve.Role.CLIENT
                assert store.role(keys.public) is wanted, f"{line}: not a {wanted.value} key"


def test_kubernetes_router_secret_key_stays_in_the_router_pod(k8s):
    """The router's secret key is in exactly one Secret, which only the router mounts; the
    GPU pods get a worker's pair, never a secret of another role but the probes' client."""
    holders = [name for (kind, name), obj in k8s.items()
               if kind == "Secret" and "router.key_secret" in obj["data"]]
    assert holders == ["workerpool-router-key"]

    def secrets(kind, name):
        return {v["secret"]["secretName"] for v in pod(k8s, kind, name)["spec"]["volumes"]
                if "secret" in v}

    assert "workerpool-router-key" in secrets("Deployment", "workerpool-router")
    (worker_secret,) = secrets("DaemonSet", "workerpool-worker")
    keys = set(k8s["Secret", worker_secret]["data"])
    assert keys == {"router.key", "worker.key_secret", "probe.key_secret"}


def test_kubernetes_pods_run_as_the_images_user(k8s):
    """runAsNonRoot needs a numeric USER in the image, and the keys' fsGroup must be the
    group that user runs with."""
    uid, _, gid = next(a for i, a in dockerfile() if i == "USER").partition(":")
    for kind, name in (("Deployment", "workerpool-router"), ("DaemonSet", "workerpool-worker")):
        ctx = pod(k8s, kind, name)["spec"]["securityContext"]
        assert ctx["runAsNonRoot"] and ctx["runAsUser"] == int(uid)
        assert ctx["runAsGroup"] == ctx["fsGroup"] == int(gid)


def load_node_probe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("node_probe", K8S / "node-probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_node_probe_verdicts():
    probe = load_node_probe()
    status = {"workers": [
        {"id": "default/gpu1/0", "state": "ready"}, {"id": "default/gpu1/1", "state": "dead"},
        {"id": "default/gpu2/0", "state": "failed"}, {"id": "default/gpu3/0", "state": "starting"},
        {"id": "default/0", "state": "ready"}]}
    assert probe.verdict("readiness", status, "gpu1")[0]
    assert not probe.verdict("readiness", status, "gpu3")[0]  # still in setup()
    assert probe.verdict("liveness", status, "gpu3")[0]
    healthy, why = probe.verdict("liveness", status, "gpu2")
    assert not healthy and "default/gpu2/0 failed" in why
    assert not probe.verdict("liveness", status, "gpu9")[0]  # the router does not know it
    assert not probe.verdict("readiness", None, "gpu1")[0]
    assert probe.verdict("liveness", None, "gpu1")[0]  # a router restart restarts no GPU pod


# -- systemd --------------------------------------------------------------------------------
def unit(name: str) -> dict[str, list[str]]:
    """``Section.Key`` -> values of a unit file (a key may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def exec_start(u: dict[str, list[str]]) -> list[str]:
    """ExecStart as systemd runs it for the files in deploy/systemd: the EnvironmentFile's
    variables expanded, ``%H`` a host name, the config path that of the example."""
    env = {}
    for path in u.get("Service.EnvironmentFile", []):
        local = SYSTEMD / Path(path.lstrip("-")).name
        assert local.is_file(), f"no example of {path} in deploy/systemd"
        for line in local.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip()
    (line,) = u["Service.ExecStart"]
    line = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], line).replace("%H", "gpu-host-1")
    return [str(SYSTEMD / Path(a).name) if a.startswith("/etc/workerpool/") else a
            for a in shlex.split(line)]


@pytest.mark.parametrize("name, command", [("workerpool-router.service", "router"),
                                           ("workerpool-worker.service", "worker")])
def test_systemd_unit_settings(name, command):
    u = unit(name)
    args = exec_start(u)
    assert Path(args[0]).name == "workerpool"
    ctx = parse_cli(args[1:])
    assert ctx.info_name == command
    cfg = PoolConfig.load(ctx.params["config_path"])
    assert isinstance(cfg.security, SecurityConfig) and (cfg.security.keys or cfg.security.key)

    assert u["Service.KillSignal"] == ["SIGTERM"]
    assert u["Service.KillMode"] == ["mixed"]  # the supervisor stops its own workers
    assert float(u["Service.TimeoutStopSec"][0]) > \
        cfg.router.drain_timeout + cfg.supervisor.stop_timeout
    # A router's drain stops every node with exit 0: a node must come back after it.
    assert u["Service.Restart"] == (["on-failure"] if command == "router" else ["always"])
    assert u["Service.User"] == ["workerpool"]
    assert u["Service.NoNewPrivileges"] == ["yes"]
    if command == "worker":
        assert "Service.PrivateDevices" not in u  # the GPUs are devices
        assert "Service.MemoryDenyWriteExecute" not in u  # CUDA JIT-compiles


def test_systemd_analyze_verifies_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (bin/system-packages installs it as root)")
    # It checks that ExecStart's program exists: point it at this checkout's environment.
    program = Path(sys.executable).with_name("workerpool")
    if not program.exists():
        program = Path(sys.executable)
    names = ["workerpool-router.service", "workerpool-worker.service"]
    for name in names:
        text = (SYSTEMD / name).read_text().replace("/opt/workerpool/bin/workerpool", str(program))
        (tmp_path / name).write_text(text)
    out = subprocess.run([analyze, "verify", "--man=no", "--generators=no",
                          "--recursive-errors=no", *(str(tmp_path / n) for n in names)],
                         capture_output=True, text=True, timeout=60)
    ours = [line for line in (out.stdout + out.stderr).splitlines()
            if any(n in line for n in names)]
    assert not ours, "\n".join(ours)


# -- Slurm ----------------------------------------------------------------------------------
STUB_SCONTROL = """#!/bin/sh
# scontrol show hostnames LIST, for a LIST written as a,b,c
[ "$1 $2" = "show hostnames" ] || { echo "stub scontrol: not stubbed: $*" >&2; exit 2; }
echo "$3" | tr ',' '\\n'
"""
STUB_SRUN = """#!/bin/sh
# srun with the options workerpool.sbatch uses: runs the step here, as on --nodelist's node
node=
while [ $# -gt 0 ]; do
  case "$1" in
    --nodelist=*) node=${1#--nodelist=} ;;
    --nodes=1|--ntasks=1|--kill-on-bad-exit=*|--cpus-per-task=*) ;;
    -*) echo "stub srun: not stubbed: $1" >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done
[ -n "$node" ] || { echo "stub srun: no --nodelist" >&2; exit 2; }
echo "$node $*" >> "$SRUN_LOG"
SLURMD_NODENAME=$node exec "$@"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manifest_pod(name: str) -> dict:
    """The pod spec of the workload in deploy/kubernetes/NAME, as written (not rendered)."""
    import yaml

    (obj,) = [o for o in yaml.safe_load_all((K8S / name).read_text())
              if o["kind"] in ("Deployment", "DaemonSet")]
    return obj["spec"]["template"]["spec"]


def marked(marker: str) -> list[int]:
    """Pids of the processes whose environment holds ``marker``: all the script started."""
    pids = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def wait_status(job: subprocess.Popen, address: str, keys: Path, predicate, what: str,
                timeout: float = 30.0) -> dict:
    """The router's STATUS once ``predicate`` holds for it, while ``job`` runs."""
    deadline = time.monotonic() + timeout
    st: dict = {}
    while time.monotonic() < deadline:
        assert job.poll() is None, f"the job exited ({job.returncode}) before {what}"
        try:
            with Client(address, keys=str(keys)) as c:
                st = c.status(timeout=2)
            if predicate(st):
                return st
        except (WorkerPoolError, curve.KeyFileError):  # not up yet; the keys not made yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last status: {st}")


def test_slurm_script_runs_a_pool_and_drains_on_sigterm(tmp_path):
    """The sbatch script for real, on loopback: it makes the keys, starts the router on
    the first node and a supervisor on each other one (srun), starts a crashed router
    again (the nodes register with it), and on SIGTERM drains and leaves no process.
    The Kubernetes probes run against its router too."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("scontrol", STUB_SCONTROL), ("srun", STUB_SRUN),
                       ("workerpool", f'#!/bin/sh\nexec {sys.executable} -m workerpool.cli "$@"\n')):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    keys = tmp_path / "shared" / "keys"
    front, back, metrics = free_port(), free_port(), free_port()
    marker = f"WORKERPOOL_DEPLOY_TEST={uuid.uuid4().hex}"
    env = _env()
    env.update({
        "PATH": f"{bindir}{os.pathsep}{env['PATH']}", "HOME": str(tmp_path),
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1,node2,node3",
        "SLURM_JOB_NUM_NODES": "3", "SLURM_CPUS_ON_NODE": "2", "SLURMD_NODENAME": "node1",
        "SRUN_LOG": str(tmp_path / "srun.log"), "WORKERPOOL_KEYS": str(keys),
        "WORKERPOOL_ROUTER_HOST": "127.0.0.1", "WORKERPOOL_BIND": "127.0.0.1",
        "WORKERPOOL_FRONTEND_PORT": str(front), "WORKERPOOL_BACKEND_PORT": str(back),
        "WORKERPOOL_METRICS_PORT": str(metrics),
        marker.split("=")[0]: marker.split("=")[1]})
    assert os.stat(SBATCH).st_mode & stat.S_IXUSR, "the script must be executable"
    log = open(tmp_path / "job.log", "w")  # noqa: SIM115
    job = subprocess.Popen([str(SBATCH), "--handler", "workerpool.handlers:Echo",
                            "--devices", "cpu", "--workers", "1"],
                           stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                           start_new_session=True)
    address = f"tcp://127.0.0.1:{front}"
    nodes = {"default/node2/0", "default/node3/0"}

    def both_ready(st):
        return {w["id"] for w in st["workers"] if w["state"] == "ready"} == nodes

    try:
        st = wait_status(job, address, keys, both_ready, "a worker on node2 and node3")
        assert {w["id"] for w in st["workers"]} == nodes  # none on the router's node1
        steps = (tmp_path / "srun.log").read_text().splitlines()
        assert sorted(s.split()[0] for s in steps) == ["node2", "node3"]

        # The Kubernetes probes, as the manifests write them, against this router.
        curve.add_key(keys, "client", "probe")
        os.kill(st["router"]["pid"], signal.SIGHUP)  # read the key folders now
        local = {"tcp://127.0.0.1:5555": address, "tcp://workerpool-router:5555": address,
                 "/keys/clients/probe.key_secret": str(keys / "clients" / "probe.key_secret"),
                 "/keys/probe.key_secret": str(keys / "clients" / "probe.key_secret"),
                 "/keys/router.key": str(keys / "router.key"), "python": sys.executable,
                 "/etc/workerpool/node-probe.py": str(K8S / "node-probe.py")}
        for manifest, mode, node, healthy in (
                ("workers.yaml", "readinessProbe", "node2", True),
                ("workers.yaml", "readinessProbe", "node9", False),
                ("workers.yaml", "livenessProbe", "node9", False)):
            (c,) = manifest_pod(manifest)["containers"]
            cmd = [local.get(a, a) for a in c[mode]["exec"]["command"]]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                                 env={**env, "WORKERPOOL_NODE": node or ""})
            assert (run.returncode == 0) == healthy, (manifest, mode, node, run.stdout, run.stderr)

        # A router that crashes is started again, and both nodes register with it.
        os.kill(st["router"]["pid"], signal.SIGKILL)
        wait_status(job, address, keys, lambda s: s["router"]["pid"] != st["router"]["pid"]
                    and both_ready(s), "both nodes back on a new router")

        job.send_signal(signal.SIGTERM)
        assert job.wait(60) == 0, (tmp_path / "job.log").read_text()[-3000:]
        deadline = time.monotonic() + 10
        while marked(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not marked(marker), "processes left behind"
    finally:
        for pid in marked(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        job.wait(10)
        log.close()
