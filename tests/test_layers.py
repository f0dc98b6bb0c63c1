"""The package layers: nothing imports upward, and the router process stays small."""

from __future__ import annotations

import subprocess
import sys

import workerpool
from tests.conftest import ROOT


def _modules_after(statement: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{statement}; import sys; print('\\n'.join(sys.modules))"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return set(out.stdout.split())


def test_router_loads_neither_client_nor_asyncio():
    loaded = _modules_after("import router.router")
    assert "workerpool.client" not in loaded
    assert "asyncio" not in loaded
    assert not {"workerpool.gateway", "httptools"} & loaded


def test_the_http_server_loads_only_when_a_gateway_starts():
    """The CLI and the gateway's modules load no HTTP server: gateway/server.py imports
    the HTTP protocol (httptools) and uvloop when it serves (the live tests), and checking
    the extra imports nothing."""
    loaded = _modules_after("import workerpool.cli, workerpool.gateway.server as s; "
                            "s.check_installed()")
    assert not {"uvicorn", "httptools", "uvloop", "workerpool.gateway.http11"} & loaded


def test_the_router_loads_the_metrics_listener_only_with_metrics():
    import socket

    start = ("from workerpool.config import RouterConfig as C; from router.router import Router; "
             "Router(C(frontend='inproc://f', backend='inproc://b'{})).close()")
    listener = {"prometheus_client", "http.server", "router.listener"}
    assert not listener & _modules_after(start.format(""))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert listener <= _modules_after(start.format(f", metrics='127.0.0.1:{port}'"))


def test_ipc_imports_nothing_above_it():
    loaded = _modules_after("import ipc, ipc.codec, ipc.lifecycle, ipc.transport, ipc.shm")
    above = sorted(m for m in loaded if m.split(".")[0] in ("workerpool", "router"))
    assert above == []


def test_every_public_name_is_exported_and_importable():
    for name in workerpool.__all__:
        assert getattr(workerpool, name) is not None
    assert "WorkerPoolError" in workerpool.__all__
    # Every error class is in the tree and exported from workerpool.errors.
    from workerpool import errors
    for name in errors.__all__:
        value = getattr(errors, name)
        if isinstance(value, type) and name != "RemoteTraceback":
            assert issubclass(value, errors.WorkerPoolError), name


def _imports() -> dict[str, set[str]]:
    """Each project module's top-level imports of project modules (not those made only for
    type checking, nor lazy ones inside functions)."""
    import ast

    graph: dict[str, set[str]] = {}
    for pkg in ("ipc", "router", "workerpool"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            deps: set[str] = set()
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    deps.add(node.module)
                    deps.update(f"{node.module}.{a.name}" for a in node.names)
            graph[name] = {d for d in deps if d.split(".")[0] in ("ipc", "router", "workerpool")}
    return graph


def test_no_module_imports_a_higher_layer():
    layer = {"ipc": 0, "workerpool.errors": 1, "workerpool.config": 1, "workerpool._proc": 1,
             "workerpool.logs": 1, "workerpool.histogram": 1, "router": 2}
    graph = _imports()
    modules = set(graph)
    for name, deps in graph.items():
        mine = next((v for k, v in layer.items() if name == k or name.startswith(k + ".")), None)
        if mine is None:
            continue
        for dep in deps:
            if dep not in modules:
                continue  # a name imported from a module, not a module
            theirs = next((v for k, v in layer.items() if dep == k or dep.startswith(k + ".")), 99)
            assert theirs <= mine, f"{name} (layer {mine}) imports {dep} (layer {theirs})"


def test_no_import_cycles():
    graph = _imports()
    modules = set(graph)
    # A submodule's import of its own package (``from ipc import arrays``) is how Python
    # reaches a sibling, not a dependency on the package's __init__.
    graph = {m: {d for d in deps if d in modules and d != m and not m.startswith(d + ".")}
             for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, m, d]))
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_roles_do_not_import_each_other():
    """Router, worker, supervisor, client and gateway sit side by side above the lower
    layers; only the supervisor may build on the worker (it starts workers with their
    spec), and only the gateway on the client (it is one)."""
    roles = {
        "router": "router",
        "workerpool.client": "client",
        "workerpool.worker": "worker", "workerpool.batching": "worker",
        "workerpool.replies": "worker",
        "workerpool.supervisor": "supervisor", "workerpool.children": "supervisor",
        "workerpool.respawn": "supervisor",
        "workerpool.gateway": "gateway",
    }
    allowed = {("supervisor", "worker"), ("gateway", "client")}

    def role(module: str) -> str | None:
        return next((r for k, r in roles.items() if module == k or module.startswith(k + ".")),
                    None)

    graph = _imports()
    for name, deps in graph.items():
        mine = role(name)
        for dep in deps:
            theirs = role(dep) if dep in graph else None
            if mine and theirs and mine != theirs:
                assert (mine, theirs) in allowed, f"{name} ({mine}) imports {dep} ({theirs})"


def test_every_error_that_can_cross_the_wire_comes_back_as_itself():
    from workerpool import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        if not isinstance(cls, type) or cls in (errors.FrameError, errors.IllegalTransition,
                                                errors.RemoteTraceback):
            continue  # never sent: answered as ProtocolError, or internal to the router
        err = cls("it broke", worker="default/1", code="x") if issubclass(
            cls, errors.ProtocolError) else cls("it broke", worker="default/1")
        back = errors.from_wire(err.to_wire())
        assert type(back) is cls and back.message == "it broke" and back.worker == "default/1"
