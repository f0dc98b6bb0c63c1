"""Configuration is validated at the edge, with messages that name the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from workerpool import devices
from workerpool.config import PoolConfig, RouterConfig, ServiceConfig


def test_defaults_are_loopback_and_sane():
    cfg = PoolConfig()
    assert cfg.router.frontend == "tcp://127.0.0.1:5555"
    assert cfg.services[0].name == "default"
    assert cfg.services[0].max_inflight is None  # auto: 1, or sized by @batched methods
    assert cfg.services[0].policy == "least-loaded"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"handler": "no_colon"},
        {"handler": "a:b c"},
        {"workers": -1},
        {"max_inflight": 0},
        {"queue_capacity": -5},
        {"policy": "random"},
        {"devices": "gpu0"},
        {"devices": "0,,1"},
        {"name": "has space"},
        {"unknown_field": 1},
    ],
)
def test_bad_service_values_are_rejected(kwargs):
    with pytest.raises(ValidationError):
        ServiceConfig(**kwargs)


@pytest.mark.parametrize("address", ["localhost:5555", "tcp://x", "http://127.0.0.1:1", ""])
def test_bad_endpoints_are_rejected(address):
    with pytest.raises(ValidationError, match="ZeroMQ endpoint"):
        RouterConfig(frontend=address)


def test_toml_load_and_duplicate_services(tmp_path):
    good = tmp_path / "pool.toml"
    good.write_text(
        '[router]\nfrontend = "tcp://127.0.0.1:6000"\n'
        '[[services]]\nname = "a"\nhandler = "workerpool.handlers:Echo"\nworkers = 2\n'
        '[[services]]\nname = "b"\npolicy = "round-robin"\n')
    cfg = PoolConfig.load(good)
    assert [s.name for s in cfg.services] == ["a", "b"]
    assert cfg.service("b").policy == "round-robin"
    with pytest.raises(ValueError, match="several services"):
        cfg.service(None)
    dup = tmp_path / "dup.toml"
    dup.write_text('[[services]]\nname = "a"\n[[services]]\nname = "a"\n')
    with pytest.raises(ValidationError, match="repeated: a"):
        PoolConfig.load(dup)


def test_parse_devices_never_touches_cuda(monkeypatch):
    assert devices.parse_devices("cpu") == ["cpu"]
    assert devices.parse_devices("0, 1") == ["0", "1"]
    assert devices.parse_devices("GPU-abc,1") == ["GPU-abc", "1"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices, "discover_gpus", lambda: [])
    assert devices.parse_devices("auto") == ["cpu"]
    monkeypatch.setattr(devices, "discover_gpus", lambda: ["0", "1", "2"])
    assert devices.parse_devices("auto") == ["0", "1", "2"]
    with pytest.raises(ValueError):
        devices.parse_devices("zero")
    # A supervisor confined to some GPUs spreads its workers over those only.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert devices.parse_devices("auto") == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices.parse_devices("auto") == ["cpu"]


def _fake_smi(tmp_path, monkeypatch, script: str | None) -> None:
    """PATH holds only a fake ``nvidia-smi`` running ``script`` (or no nvidia-smi at all)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if script is not None:
        smi = bindir / "nvidia-smi"
        smi.write_text("#!/bin/sh\n" + script)
        smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))


def test_discover_gpus_from_the_driver_files(tmp_path, monkeypatch):
    proc = tmp_path / "gpus"
    proc.mkdir()
    for bus in ("0000:18:00.0", "0000:3b:00.0"):
        (proc / bus).mkdir()
    _fake_smi(tmp_path, monkeypatch, "echo 'GPU 0: should not be asked'")
    assert devices.discover_gpus(str(proc)) == ["0", "1"]


@pytest.mark.parametrize(("script", "found"), [
    # One GPU, as the lent H100 machine prints it.
    ("echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-4bd1c8e0-1a2b-3c4d-5e6f-0123456789ab)'",
     ["0"]),
    # MIG instances are indented under their GPU: GPU 1 is still index 1.
    ("printf '%s\\n' 'GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-a)' "
     "'  MIG 1g.5gb      Device  0: (UUID: MIG-b)' '  MIG 1g.5gb      Device  1: (UUID: MIG-c)' "
     "'GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-d)'", ["0", "1"]),
    # A driver that is installed but broken: a message on stdout and a failing status.
    ("echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'"
     "; exit 9", []),
    (None, []),  # no nvidia-smi at all
])
def test_discover_gpus_from_nvidia_smi(tmp_path, monkeypatch, script, found):
    _fake_smi(tmp_path, monkeypatch, script)
    assert devices.discover_gpus(str(tmp_path / "no-such-dir")) == found


def test_worker_env_pins_one_device():
    assert devices.worker_env("cpu", {})["CUDA_VISIBLE_DEVICES"] == ""
    assert devices.worker_env("3", {"X": "1"}) == {"X": "1", "CUDA_VISIBLE_DEVICES": "3"}


def test_auto_discovery_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from workerpool.devices import parse_devices; parse_devices('auto'); "
            "import workerpool.supervisor, router.router; "
            "assert 'torch' not in sys.modules and 'cupy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_spares_and_workers_per_device_rules():
    from pydantic import ValidationError

    from workerpool.config import ServiceConfig

    with pytest.raises(ValidationError, match="needs at least one worker"):
        ServiceConfig(workers=0, spares=1)
    with pytest.raises(ValidationError, match="not both"):
        ServiceConfig(workers=2, workers_per_device=2)
    svc = ServiceConfig(devices="0,1,2", workers_per_device=2, spares=1)
    svc.resolve_workers()  # parse_devices with explicit indices never looks for GPUs
    assert (svc.workers, svc.workers_per_device, svc.spares) == (6, None, 1)
