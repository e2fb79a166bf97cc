"""Config: precedence (defaults < file < environment < flags), and every bad value as one line, exit 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from exporter import check, cli, service
from exporter import config as configmod
from exporter.config import Config, ConfigError
from exporter.transport import Endpoint

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "xdpflow.toml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("XDPFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(configmod, "DEFAULT_PATH", str(tmp_path / "absent" / "xdpflow.toml"))
    saved = structlog.get_config()
    try:
        yield
    finally:
        # cli.main points structlog at this test's captured stderr, which pytest closes afterwards.
        structlog.configure(**saved)


def toml(tmp_path: Path, text: str, name: str = "x.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load(flags: dict[str, Any] | None = None, env: dict[str, str] | None = None, path: str | None = None,
         **kw: Any) -> configmod.Loaded:
    kw.setdefault("system", False)
    return configmod.resolve(flags, config_path=path, environ=env or {}, **kw)


# -- precedence -----------------------------------------------------------------------------------

def test_defaults_are_the_documented_ones() -> None:
    cfg = load(need_interfaces=False).config
    assert cfg == Config()
    assert (cfg.scan_interval, cfg.active_timeout, cfg.idle_timeout) == (10.0, 60.0, 15.0)
    assert cfg.max_entries == 500_000 and cfg.max_kernel_memory == 1 << 30
    assert cfg.metrics is None and cfg.mode == "auto" and cfg.sequence_mode == "rfc"


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    path = toml(tmp_path, 'interfaces = ["eth0"]\nscan_interval = 2\nidle_timeout = 20\nmtu = 1300\n')
    only_file = load(path=path)
    assert only_file.config.scan_interval == 2.0 and only_file.config.mtu == 1300
    assert only_file.sources["scan_interval"] == f"in {path}"
    env = {"XDPFLOW_SCAN_INTERVAL": "5", "XDPFLOW_MTU": "1200"}
    with_env = load(path=path, env=env)
    assert with_env.config.scan_interval == 5.0 and with_env.config.mtu == 1200
    assert with_env.sources["scan_interval"] == "from XDPFLOW_SCAN_INTERVAL"
    with_flags = load({"scan_interval": "3"}, path=path, env=env)
    assert with_flags.config.scan_interval == 3.0 and with_flags.config.mtu == 1200
    assert with_flags.config.idle_timeout == 20.0 and with_flags.config.interfaces == ("eth0",)
    assert with_flags.sources["scan_interval"] == "from --scan-interval"
    assert with_flags.sources["active_timeout"] == "default"


def test_lists_from_env_and_flags_replace_lower_layers(tmp_path: Path) -> None:
    path = toml(tmp_path, 'interfaces = ["eth9"]\ncollectors = ["udp://192.0.2.1:4739"]\n')
    env = {"XDPFLOW_INTERFACES": "eth0,eth1", "XDPFLOW_COLLECTORS": "udp://a:4739, udp://[2001:db8::1]:2055"}
    cfg = load(path=path, env=env).config
    assert cfg.interfaces == ("eth0", "eth1")
    assert cfg.endpoints() == (Endpoint("udp", "a", 4739), Endpoint("udp", "2001:db8::1", 2055))
    cfg = load({"interfaces": ["eth2", "eth3,eth4"], "collectors": ["192.0.2.9"]}, path=path, env=env).config
    assert cfg.interfaces == ("eth2", "eth3", "eth4")
    assert cfg.endpoints() == (Endpoint("udp", "192.0.2.9", 4739),)


def test_argv_reaches_the_config(tmp_path: Path) -> None:
    path = toml(tmp_path, "scan_interval = 2\n")
    args = cli.build_parser().parse_args(["run", "--config", path, "-i", "eth0", "--interface", "eth1",
                                          "--max-kernel-memory", "512M", "--log-level", "debug", "-c", "h:9995"])
    loaded = configmod.from_args(args, environ={"XDPFLOW_MODE": "generic"}, system=False)
    cfg = loaded.config
    assert loaded.path == path
    assert cfg.interfaces == ("eth0", "eth1") and cfg.scan_interval == 2.0 and cfg.mode == "generic"
    assert cfg.max_kernel_memory == 512 << 20 and cfg.log_level == "debug" and cfg.collectors == ("h:9995",)


def test_yes_no_keys_take_a_bare_flag(tmp_path: Path) -> None:
    def parsed(*argv: str, env: dict[str, str] | None = None, text: str = "") -> bool:
        args = cli.build_parser().parse_args(["run", "-i", "lo", *argv, *(["--config", toml(tmp_path, text)]
                                                                          if text else [])])
        return configmod.from_args(args, environ=env or {}, system=False).config.biflow

    assert parsed() is False and parsed("--biflow") is True and parsed("--biflow", "no") is False
    assert parsed(env={"XDPFLOW_BIFLOW": "yes"}) is True
    assert parsed("--biflow", "false", text="biflow = true\n") is False and parsed(text="biflow = true\n") is True


def test_config_file_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = toml(tmp_path, "mtu = 1000\n", "a.toml")
    b = toml(tmp_path, "mtu = 1100\n", "b.toml")
    default = toml(tmp_path, "mtu = 1200\n", "default.toml")
    monkeypatch.setattr(configmod, "DEFAULT_PATH", default)
    assert load(need_interfaces=False).config.mtu == 1200
    assert load(env={"XDPFLOW_CONFIG": b}, need_interfaces=False).config.mtu == 1100
    assert load(env={"XDPFLOW_CONFIG": b}, path=a, need_interfaces=False).config.mtu == 1000


def test_globs_need_not_match_yet() -> None:
    cfg = load({"interfaces": ["lo", "nomatch*", "veth[0-9]*"]}, system=True).config
    assert cfg.interfaces == ("lo", "nomatch*", "veth[0-9]*")
    assert check.check_pattern("nomatch*").status == check.WARN
    assert check.check_pattern("lo*").status == check.WARN  # loopback only by name


def test_empty_env_is_unset_and_foreign_xdpflow_vars_are_ignored() -> None:
    cfg = load(env={"XDPFLOW_MTU": "", "XDPFLOW_FUZZ_EXAMPLES": "5", "XDPFLOW_INTERFACES": "eth0"}).config
    assert cfg.mtu == 1400 and cfg.interfaces == ("eth0",)


def test_values_are_parsed() -> None:
    cfg = load({"max_kernel_memory": "1.5GiB", "metrics": "9477", "mode": "Native"}, need_interfaces=False).config
    assert cfg.max_kernel_memory == 3 << 29 and cfg.mode == "native"
    assert cfg.metrics == "127.0.0.1:9477" and cfg.metrics_address() == ("127.0.0.1", 9477)
    assert load({"metrics": "[::1]:9100"}, need_interfaces=False).config.metrics_address() == ("::1", 9100)
    assert load({"metrics": "off"}, need_interfaces=False).config.metrics is None
    assert load(env={"XDPFLOW_METRICS": "0.0.0.0:9477"}, need_interfaces=False).config.metrics == "0.0.0.0:9477"
    assert configmod.parse_size("1024") == 1024 and configmod.parse_size("2k") == 2048
    assert configmod.parse_size("lots") is None


def test_example_file_documents_every_key_at_its_default() -> None:
    text = EXAMPLE.read_text()
    for key in configmod.KEYS:
        assert re.search(rf"^{key} = ", text, re.M), f"config/xdpflow.toml lacks {key}"
    assert "flow.max_entries" in text and "agent.flow.ebpf.kernel_scan_interval" in text
    assert load(path=str(EXAMPLE), need_interfaces=False).config == Config()


def test_config_settings_as_the_service_reads_them() -> None:
    cfg = load({"interfaces": ["eth0"], "collectors": ["udp://192.0.2.1:2055", "192.0.2.2"], "mtu": "1300",
                "metrics": "9477", "tls_server_name": "collector.example"}).config
    assert cfg.interfaces == ("eth0",) and cfg.mtu == 1300
    assert cfg.endpoints() == (Endpoint("udp", "192.0.2.1", 2055), Endpoint("udp", "192.0.2.2", 4739))
    assert cfg.tls_server_name == "collector.example"


# -- bad values: one line each, naming the key, exit 2 -------------------------------------------

LO = 'interfaces = ["lo"]\n'

BAD_FILES = {
    "unknown key": (LO + "scan_intervall = 5\n", "scan_intervall", "did you mean scan_interval?"),
    "skydive name": (LO + "[flow]\nmax_entries = 5\n", "flow.max_entries", "max_entries"),
    "string for a number": (LO + 'scan_interval = "fast"\n', "scan_interval", "number of seconds"),
    "float for an integer": (LO + "max_entries = 1.5\n", "max_entries", "integer"),
    "bool for an integer": (LO + "mtu = true\n", "mtu", "integer 512..65535"),
    "number for a list": ("interfaces = 5\n", "interfaces", "list of interface names"),
    "number for a choice": (LO + "mode = 1\n", "mode", "auto, native, generic"),
    "zero idle timeout": (LO + "idle_timeout = 0\n", "idle_timeout", "> 0"),
    "negative active timeout": (LO + "active_timeout = -1\n", "active_timeout", "> 0"),
    "zero scan interval": (LO + "scan_interval = 0\n", "scan_interval", "> 0"),
    "zero template refresh": (LO + "template_refresh = 0\n", "template_refresh", "> 0"),
    "active shorter than idle": (LO + "active_timeout = 10\n", "active_timeout", "idle_timeout"),
    "scan longer than idle": (LO + "scan_interval = 20\n", "scan_interval", "idle_timeout"),
    "zero max_entries": (LO + "max_entries = 0\n", "max_entries", "integer 1..4294967295"),
    "max_entries over budget": (LO + "max_entries = 100000000\n", "max_entries", "max_kernel_memory"),
    "budget too small": (LO + 'max_kernel_memory = "1M"\nmax_entries = 100000\n', "max_entries", "at most"),
    "bad size": (LO + 'max_kernel_memory = "lots"\n', "max_kernel_memory", '"512M"'),
    "collector without host": (LO + 'collectors = ["udp://:4739"]\n', "collectors[0]", "no host"),
    "collector scheme": (LO + 'collectors = ["sctp://192.0.2.1:4739"]\n', "collectors[0]", "not supported"),
    "collector garbage": (LO + 'collectors = ["[::1"]\n', "collectors[0]", "IPv6"),
    "collector port text": (LO + 'collectors = ["192.0.2.1:ipfix"]\n', "collectors[0]", "ipfix"),
    "no collectors": (LO + "collectors = []\n", "collectors", "at least one"),
    "port too big": (LO + 'collectors = ["udp://192.0.2.1:70000"]\n', "collectors[0]", "1..65535"),
    "port zero": (LO + 'collectors = ["192.0.2.1:0"]\n', "collectors[0]", "1..65535"),
    "unknown interface": ('interfaces = ["lo", "nosuchif0"]\n', "interfaces[1]", "no such interface"),
    "bad interface name": ('interfaces = ["a/b"]\n', "interfaces[0]", "not an interface name"),
    "interface twice": ('interfaces = ["lo", "lo"]\n', "interfaces[1]", "listed twice"),
    "no interface": ("mtu = 1400\n", "interfaces", "at least one interface"),
    "mtu too small": (LO + "mtu = 511\n", "mtu", "512..65535"),
    "mtu too big": (LO + "mtu = 65536\n", "mtu", "512..65535"),
    "mtu below the templates": (LO + "mtu = 520\n", "mtu", "at least 534: a message must hold the header"),
    "mtu below the biflow templates": (LO + "mtu = 900\nbiflow = true\n", "mtu", "at least 908"),
    "mtu over a UDP datagram": (LO + "mtu = 65508\n", "mtu", "at most 65507 for udp://127.0.0.1:4739"),
    "mtu over a UDP datagram by name": (LO + 'mtu = 65508\ncollectors = ["udp://localhost:4739"]\n', "mtu",
                                        "largest UDP payload over IPv4"),
    "mtu over an IPv6 UDP datagram": (LO + 'mtu = 65528\ncollectors = ["udp://[fd00::1]:4739"]\n', "mtu",
                                      "at most 65527"),
    "observation domain": (LO + "observation_domain = 4294967296\n", "observation_domain", "0..4294967295"),
    "log level": (LO + 'log_level = "verbose"\n', "log_level", "debug, info, warning, error"),
    "log format": (LO + 'log_format = "xml"\n', "log_format", "auto, console, json"),
    "sequence mode": (LO + 'sequence_mode = "ipfix"\n', "sequence_mode", "rfc, nfdump"),
    "biflow not a yes/no": (LO + 'biflow = "both"\n', "biflow", "true or false"),
    "biflow number": (LO + "biflow = 2\n", "biflow", "true or false"),
    "mtu below the tunnel templates": (LO + "mtu = 1000\ntunnels = true\n", "mtu", "at least 1052"),
    "tunnels with biflow": (LO + "tunnels = true\nbiflow = true\n", "tunnels", "tunnel records are uniflows"),
    "tunnels not a yes/no": (LO + 'tunnels = "vxlan"\n', "tunnels", "true or false"),
    "metrics port": (LO + 'metrics = "127.0.0.1:99999"\n', "metrics", "1..65535"),
    "metrics type": (LO + "metrics = 9477\n", "metrics", "HOST:PORT"),
    "tls file missing": (LO + 'tls_ca = "/nonexistent/ca.pem"\n', "tls_ca", "file not found"),
    "tls cert without key": (LO + 'tls_cert = "/etc/hostname"\n', "tls_cert", "needs tls_key"),
    "malformed toml": (LO + "mtu = = 1400\n", "config", "at line 2, column 7"),
    "unclosed array": ('interfaces = ["lo"\nmtu = 1400\n', "config", "line 2"),
}


@pytest.mark.parametrize(("mtu", "collectors", "biflow"), [
    (65535, ["tcp://192.0.2.1:4739"], False),       # a stream's message may be as long as its length field
    (65527, ["udp://[fd00::1]:4739"], False),       # IPv6: no header inside the 65,535 payload length
    (65507, ["udp://192.0.2.1:4739", "tls://h:4740"], False),
    (908, ["udp://192.0.2.1:4739"], True),
    (534, ["udp://192.0.2.1:4739"], False),
])
def test_mtu_limits_that_hold(mtu: int, collectors: list[str], biflow: bool) -> None:
    cfg = load({"mtu": mtu, "collectors": collectors, "biflow": biflow}, need_interfaces=False).config
    assert cfg.mtu == mtu


def run_main(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[int, str]:
    def refuse(*a: object, **k: object) -> int:
        raise AssertionError("the service must not start on a bad config")

    monkeypatch.setattr(service, "run", refuse)
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().err


def assert_one_line(rc: int, err: str, key: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"xdpflow: error: {key} ") or line.startswith(f"xdpflow: error: {key}:"), line
    for f in fragments:
        assert f in line, (f, line)


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_config_file(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    text, key, fragment = BAD_FILES[case]
    path = toml(tmp_path, text)
    rc, err = run_main(capsys, monkeypatch, "run", "--config", path)
    assert_one_line(rc, err, key, fragment, "(default)" if case == "no interface" else path)


def test_tls_file_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Root reads any mode bits, so the unreadable "file" is a directory.
    path = toml(tmp_path, LO + f'tls_cert = "{tmp_path}"\ntls_key = "/etc/hostname"\n')
    rc, err = run_main(capsys, monkeypatch, "run", "--config", path)
    assert_one_line(rc, err, "tls_cert", "not a readable file")


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    rc, err = run_main(capsys, monkeypatch, "run", "--config", str(tmp_path / "nope.toml"), "-i", "lo")
    assert_one_line(rc, err, "config", "no such file")


def test_bad_flag_names_key_and_flag(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    rc, err = run_main(capsys, monkeypatch, "run", "-i", "lo", "--mtu", "100")
    assert_one_line(rc, err, "mtu", "--mtu", "512..65535")
    rc, err = run_main(capsys, monkeypatch, "run", "-i", "lo", "--idle-timeout", "-3")
    assert_one_line(rc, err, "idle_timeout", "--idle-timeout", "> 0")
    rc, err = run_main(capsys, monkeypatch, "run", "-i", "lo", "--collector", "192.0.2.1:65536")
    assert_one_line(rc, err, "collectors[0]", "--collector", "1..65535")


def test_bad_env_names_key_and_variable(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDPFLOW_SCAN_INTERVAL", "soon")
    rc, err = run_main(capsys, monkeypatch, "run", "-i", "lo")
    assert_one_line(rc, err, "scan_interval", "XDPFLOW_SCAN_INTERVAL", "number of seconds")
    monkeypatch.delenv("XDPFLOW_SCAN_INTERVAL")
    monkeypatch.setenv("XDPFLOW_IDLE_TIMOUT", "5")
    rc, err = run_main(capsys, monkeypatch, "run", "-i", "lo")
    assert_one_line(rc, err, "XDPFLOW_IDLE_TIMOUT", "did you mean XDPFLOW_IDLE_TIMEOUT?")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = toml(tmp_path, 'interfaces = ["nosuchif0"]\nmtu = 10\nidle_timeout = 0\nmode = "fast"\nfoo = 1\n')
    with pytest.raises(ConfigError) as e:
        load({"collectors": ["udp://h:99999"]}, env={"XDPFLOW_MAX_ENTRIES": "0"}, path=path, system=True)
    keys = sorted(line.split(" ", 1)[0] for line in e.value.lines)
    assert keys == ["collectors[0]", "foo", "idle_timeout", "interfaces[0]", "max_entries", "mode", "mtu"]


def test_bad_config_as_a_process(tmp_path: Path) -> None:
    path = toml(tmp_path, 'interfaces = ["lo"]\nmtu = 100\nscan_interval = "x"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDPFLOW_")}
    res = subprocess.run([sys.executable, "-m", "exporter.cli", "run", "--config", path, "--mode", "turbo"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, check=False)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert [ln.split(" ")[2] for ln in lines] == ["mtu", "scan_interval", "mode"], lines
    assert res.stdout == ""


# -- run calls the preflight first ------------------------------------------------------------------

def test_run_stops_on_a_failed_preflight(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    failed = check.Result(check.FAIL, "kernel", "4.19.0 is older than 5.15", "boot a 5.15 or newer kernel")
    monkeypatch.setattr(check, "system_checks", lambda: [check.Result(check.OK, "bcc", "0.26"), failed])
    rc, err = run_main(capsys, monkeypatch, "run", "-i", "lo", "--max-entries", "1024")
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines() == ["xdpflow: error: preflight: kernel: 4.19.0 is older than 5.15; "
                                        "fix: boot a 5.15 or newer kernel"]


# -- check helpers ----------------------------------------------------------------------------------

def test_kernel_version_check() -> None:
    assert check.check_kernel("6.1.0-13-amd64").status == check.OK
    assert check.check_kernel("5.15.0").status == check.OK
    old = check.check_kernel("5.10.0-28-cloud-amd64")
    assert old.status == check.FAIL and old.fix and "5.15" in old.line()
    assert check.check_kernel("weird").status == check.WARN


def test_egress_check_says_how_egress_attaches() -> None:
    assert check.check_egress("6.18.0").status == check.OK and "TCX" in check.check_egress("6.6.1").line()
    old = check.check_egress("6.1.0-13-amd64")
    assert old.status == check.WARN and "tc filter del dev IF egress pref 49152" in old.line()


def test_capabilities_check(tmp_path: Path) -> None:
    def status(capeff: int) -> str:
        return toml(tmp_path, f"Name:\tpython\nCapEff:\t{capeff:016x}\n", "status")

    full = check.check_capabilities(status((1 << 41) - 1))
    assert full.status == check.OK and "CAP_BPF" in full.detail
    none = check.check_capabilities(status(0))
    assert none.status == check.FAIL and "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN" in none.detail and none.fix
    old_style = check.check_capabilities(status(1 << check.CAP_SYS_ADMIN | 1 << check.CAP_NET_ADMIN))
    assert old_style.status == check.OK
    no_net = check.check_capabilities(status(1 << check.CAP_BPF | 1 << check.CAP_PERFMON))
    assert no_net.status == check.FAIL and "CAP_NET_ADMIN" in no_net.detail


def test_memory_check_and_lines() -> None:
    fail = check.check_memory(Config(max_entries=100_000_000))
    assert fail.status == check.FAIL and "max_entries <=" in fail.fix
    assert fail.line().startswith("FAIL  map memory: ") and "; fix: " in fail.line()
    ok = check.check_memory(Config(max_entries=1024))
    assert ok.status == check.OK and "; fix" not in ok.line()
    assert check.check_collector("udp://127.0.0.1:4739").status == check.OK


def test_allocator_returns_large_frees_on_glibc() -> None:
    """The exporter fixes glibc's mmap threshold (heap.release_large_arrays_to_the_os); this is glibc."""
    from exporter import heap

    assert heap.release_large_arrays_to_the_os() is True
    assert heap.trim() in (True, False)   # callable, and never raises


def test_every_command_takes_the_kernel_sizes_from_one_definition() -> None:
    from exporter.dump import DumpOptions
    from xdp.loader import Datapath
    from xdp.sizing import DEFAULT_MAX_ENTRIES, DEFAULT_MEMORY_BUDGET

    dump_args = cli.build_parser().parse_args(["dump", "--interface", "lo"])
    run = Config(interfaces=("lo",), collectors=())
    dump = DumpOptions(Config(interfaces=("lo",))).config
    seen = {
        "config file": (Config().max_entries, Config().max_kernel_memory),
        "run": (run.max_entries, run.max_kernel_memory),
        "dump flags": (dump_args.max_entries, dump_args.max_kernel_memory),
        "dump": (dump.max_entries, dump.max_kernel_memory),
        "loader": (Datapath().max_entries, Datapath().memory_budget),
    }
    assert seen == dict.fromkeys(seen, (DEFAULT_MAX_ENTRIES, DEFAULT_MEMORY_BUDGET))


@pytest.mark.parametrize(("flags", "message"), [
    (["--interface", ""], "name at least one interface"),
    (["--interface", ","], "name at least one interface"),
    (["--interface", "lo", "--interface", "eth0,lo"], "lo listed twice"),
])
def test_dump_refuses_an_empty_or_repeated_interface_list(flags: list[str], message: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """dump builds its Config from its own flags: an empty list would meter nothing, a name given
    twice would be attached twice (the second attach blaming a program xdpflow did not attach)."""
    from exporter import cli

    assert cli.main(["dump", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
