"""`--handler-option KEY=VALUE` on `workerpool up` and `workerpool worker`: values typed as
in the TOML file's `options` table (numbers, true/false, quoted strings; anything else
text), merged key by key over the file's `options` of the service the flags address, and
a malformed item is a usage error (exit status 2). The last test starts a real pool."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from workerpool import Client
from workerpool.cli import main, option_value

FLAGS = ["--handler-option", "threads=4", "--handler-option", "lr=0.5",
         "--handler-option", "half=true", "--handler-option", "path=/models/a.pt",
         "--handler-option", 'rev="42"', "--handler-option", "note=a=b c"]
TYPED = {"threads": 4, "lr": 0.5, "half": True, "path": "/models/a.pt", "rev": "42",
         "note": "a=b c"}


class FakeSupervisor:
    """Stands in for the supervisor: records the services `up`/`worker` built, starts nothing."""

    made: list[FakeSupervisor] = []

    def __init__(self, services, *args, **kwargs):
        self.services = services
        self.on_ready = None
        FakeSupervisor.made.append(self)

    def install_signal_handlers(self) -> None:
        pass

    def run(self) -> int:
        return 0


@pytest.fixture
def services(monkeypatch):
    """Runs a CLI command against FakeSupervisor; returns {name: options} it was given."""
    monkeypatch.setattr("workerpool.supervisor.Supervisor", FakeSupervisor)
    FakeSupervisor.made.clear()

    def run(*args: str) -> dict:
        out = CliRunner().invoke(main, list(args))
        assert out.exit_code == 0, out.output
        [sup] = FakeSupervisor.made
        FakeSupervisor.made.clear()
        return {s.name: s.options for s in sup.services}

    return run


@pytest.mark.parametrize(("text", "value"), [
    ("4", 4), ("-3", -3), ("1_000", 1000), ("0.5", 0.5), ("1e-3", 0.001), ("true", True),
    ("false", False), ('"42"', "42"), ("'true'", "true"), ("/m/a.pt", "/m/a.pt"),
    ("bfloat16", "bfloat16"), ("True", "True"), ("0123", "0123"), ("", ""), ("inf", "inf"),
    ("nan", "nan"), ("[1, 2]", "[1, 2]"), ("2024-01-01", "2024-01-01"), ("1\nx = 2", "1\nx = 2"),
])
def test_values_are_typed_as_toml_scalars_else_kept_as_text(text, value):
    got = option_value(text)
    assert (type(got), got) == (type(value), value)


def test_flags_reach_the_service_typed(services):
    assert services("up", *FLAGS) == {"default": TYPED}
    assert services("worker", "--router", "tcp://127.0.0.1:1", *FLAGS) == {"default": TYPED}
    assert services("up", "--service", "m", "--handler-option", "k=1") == {"m": {"k": 1}}
    assert services("up", "--handler-option", "k=1", "--handler-option", "k=2") == {
        "default": {"k": 2}}  # the last one wins
    assert services("up") == {"default": {}}


def test_flags_merge_over_the_files_options_of_the_service_they_address(services, tmp_path):
    toml = tmp_path / "pool.toml"
    toml.write_text('[[services]]\nname = "a"\noptions = { model = "/m/e5", threads = 1 }\n'
                    '[[services]]\nname = "b"\noptions = { threads = 2 }\n')
    for cmd in (["up"], ["worker", "--router", "tcp://127.0.0.1:1"]):
        got = services(*cmd, "--config", str(toml), "--service", "a",
                       "--handler-option", "threads=8", "--handler-option", "warm=false")
        assert got == {"a": {"model": "/m/e5", "threads": 8, "warm": False},
                       "b": {"threads": 2}}
    assert services("up", "--config", str(toml)) == {"a": {"model": "/m/e5", "threads": 1},
                                                     "b": {"threads": 2}}


@pytest.mark.parametrize(("item", "why"), [("threads", "is not KEY=VALUE"), ("", "is not KEY=VALUE"),
                                         ("=4", "has an empty KEY"), (" =4", "has an empty KEY")])
def test_a_malformed_item_is_a_usage_error(services, item, why):
    for cmd in (["up"], ["worker", "--router", "tcp://127.0.0.1:1"]):
        out = CliRunner().invoke(main, [*cmd, "--handler-option", item])
        assert out.exit_code == 2, out.output
        assert f"Error: Invalid value for '--handler-option': {item!r} {why}" in out.output
    assert FakeSupervisor.made == []


def test_several_services_and_no_service_named_is_a_usage_error(services, tmp_path):
    toml = tmp_path / "pool.toml"
    toml.write_text('[[services]]\nname = "a"\n[[services]]\nname = "b"\n')
    out = CliRunner().invoke(main, ["up", "--config", str(toml), "--handler-option", "k=1"])
    assert out.exit_code == 2 and "name one with --service" in out.output
    assert FakeSupervisor.made == []


def test_help_states_the_rule():
    for cmd in ("up", "worker"):
        out = CliRunner().invoke(main, [cmd, "--help"])
        assert "--handler-option KEY=VALUE" in out.output and "kept as text" in out.output


def test_a_pool_started_with_flags_hands_setup_typed_options(procs):
    pool = procs.pool(*FLAGS, "--policy", "round-robin", workers=2,
                      handler="tests.handlers:Configured")
    with Client(pool.address, timeout=30) as c:
        assert {c.call("whoami")["slot"] for _ in range(2)} == {"default/0", "default/1"}
        for _ in range(2):  # each worker, in turn
            got = c.call("options")
            assert got == TYPED
            assert [type(got[k]) for k in TYPED] == [int, float, bool, str, str, str]
