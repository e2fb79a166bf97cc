"""Configuration: one frozen `Config`, from defaults, a TOML file, XDPFLOW_* variables and flags.

Precedence, lowest first: defaults; the TOML file (--config, else XDPFLOW_CONFIG, else
/etc/xdpflow/xdpflow.toml when it exists); XDPFLOW_<KEY> environment variables; command-line flags.
Every value given is validated and every problem is reported at once, one line each naming the key,
the value, where it came from and what is allowed (`ConfigError.lines`). The service runs from this
Config as it is (SIGHUP's reload builds another); dump reads its flags with the same parsers
(`flag_type`) and check asks the same questions of the machine (memory, interfaces, files).
Addresses are read by the one grammar, exporter/address.py.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from exporter import logs
from exporter.address import AddressError, PortRangeError, parse_address
from exporter.readiness import ready_file_problem
from exporter.transport import Endpoint, endpoint_address, parse_endpoint
from xdp import filters
from xdp.sizing import DEFAULT_MAX_ENTRIES, DEFAULT_MEMORY_BUDGET, human_bytes

DEFAULT_PATH = "/etc/xdpflow/xdpflow.toml"
ENV_PREFIX = "XDPFLOW_"
ENV_CONFIG = "XDPFLOW_CONFIG"
METRICS_HOST = "127.0.0.1"
METRICS_PORT = 9477
SKYDIVE_NAMES = {"flow.max_entries": "max_entries", "agent.flow.ebpf.kernel_scan_interval": "scan_interval"}


class Invalid(ValueError):
    """A value that can't be used: (key suffix such as "[1]", the offending item or None, what is allowed)."""

    def __init__(self, *items: tuple[str, object, str]) -> None:
        super().__init__("; ".join(i[2] for i in items))
        self.items = items


def _bad(allowed: str) -> Invalid:
    return Invalid(("", None, allowed))


class ConfigError(Exception):
    """Every problem found, one operator-facing line each."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


Parser = Callable[[object, bool], Any]


# -- value parsers: (raw value, came as text from env/flags) -> value, or raise Invalid ----------

def _to_int(v: object, text: bool) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if text and isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v):
        return int(v)
    return None


def _to_float(v: object, text: bool) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        try:
            x = float(v)
        except OverflowError:  # an integer beyond any float
            return None
    elif text and isinstance(v, str):
        try:
            x = float(v)
        except ValueError:
            return None
    else:
        return None
    return x if math.isfinite(x) else None


def _quoted_hint(v: object, text: bool) -> str:
    return " (a TOML number, not a quoted string)" if isinstance(v, str) and not text else ""


def _int_range(lo: int, hi: int | None) -> Parser:
    allowed = f"must be an integer {lo}..{hi}" if hi is not None else f"must be an integer >= {lo}"

    def parse(v: object, text: bool) -> int:
        n = _to_int(v, text)
        if n is None or n < lo or (hi is not None and n > hi):
            raise _bad(allowed + _quoted_hint(v, text))
        return n

    return parse


def _seconds(v: object, text: bool) -> float:
    x = _to_float(v, text)
    if x is None or x <= 0:
        raise _bad("must be a number of seconds > 0" + _quoted_hint(v, text))
    return x


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int | None:
    """Bytes from "1073741824", "512M", "1G", "1.5GiB"; None if it isn't a size."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower(), re.ASCII)
    if not m:
        return None
    size = float(m.group(1)) * _UNITS[m.group(2)]
    return int(size) if math.isfinite(size) else None


def _size(v: object, text: bool) -> int:
    n = _to_int(v, False)
    if n is None and isinstance(v, str):
        n = parse_size(v)
    if n is None or n <= 0:
        raise _bad('must be a size in bytes > 0: an integer or a string such as "512M" or "1G"')
    return n


def _choice(*choices: str) -> Parser:
    def parse(v: object, text: bool) -> str:
        if not isinstance(v, str) or v.strip().lower() not in choices:
            raise _bad(f"must be one of {', '.join(choices)}")
        return v.strip().lower()

    return parse


def _str_list(v: object) -> list[str] | None:
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return [s.strip() for s in v]
    return None


_IFNAME = re.compile(r"[^\s/:]{1,15}")
_PATTERN = re.compile(r"[^\s/:]{1,64}")


def _interfaces(v: object, text: bool) -> tuple[str, ...]:
    names = _str_list(v)
    if names is None:
        raise _bad('must be a list of interface names, e.g. ["eth0", "eth1"]')
    problems: list[tuple[str, object, str]] = []
    for i, n in enumerate(names):
        if not (_PATTERN if filters.is_glob(n) else _IFNAME).fullmatch(n):
            problems.append((f"[{i}]", n, "not an interface name (1..15 characters, no spaces, '/' or ':') "
                                          "or glob (e.g. veth*)"))
        elif n in names[:i]:
            problems.append((f"[{i}]", n, "listed twice"))
    if problems:
        raise Invalid(*problems)
    return tuple(names)


ENDPOINT_FORMS = "SCHEME://HOST:PORT (udp, tcp, tls), HOST:PORT or [V6]:PORT"


def _endpoint_problem(text: str) -> str | None:
    try:
        endpoint_address(text)
    except PortRangeError as e:
        return str(e)
    except AddressError as e:
        msg = str(e)
        return msg if "(use " in msg else f"{msg}; allowed: {ENDPOINT_FORMS}"
    return None


def _collectors(v: object, text: bool) -> tuple[str, ...]:
    urls = _str_list(v)
    if urls is None:
        raise _bad('must be a list of collector URLs, e.g. ["udp://192.0.2.10:4739"]')
    if not urls:
        raise _bad('at least one collector is needed, e.g. ["udp://127.0.0.1:4739"]')
    problems = [(f"[{i}]", u, p) for i, u in enumerate(urls) if (p := _endpoint_problem(u)) is not None]
    if problems:
        raise Invalid(*problems)
    return tuple(urls)


def _filters(v: object, text: bool) -> tuple[str, ...]:
    """Filter rules: a list of strings, or one string of rules separated by ';' (environment, flags)."""
    allowed = 'must be a list of filter rules, e.g. ["exclude dst 10.0.0.0/8", "include proto tcp dport 443"]'
    if isinstance(v, str):
        items: list[object] = [r for r in v.split(";") if r.strip()]
    elif isinstance(v, list):
        items = list(v)
    else:
        raise _bad(allowed)
    rules, errors = filters.check_rules(items)
    if errors:
        raise Invalid(*((f"[{e.index}]", items[e.index], e.problem) if e.index is not None else ("", None, e.problem)
                        for e in errors))
    return tuple(r.text for r in rules)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _boolean(v: object, text: bool) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    raise _bad("must be true or false")


def _optional_str(v: object, text: bool) -> str | None:
    if not isinstance(v, str):
        raise _bad('must be a string ("" for none)')
    return v.strip() or None


def _metrics(v: object, text: bool) -> str | None:
    allowed = f'must be "HOST:PORT", ":PORT" or "PORT" (host {METRICS_HOST}), or "off"'
    if isinstance(v, bool):
        return f"{METRICS_HOST}:{METRICS_PORT}" if v else None
    if not isinstance(v, str):
        raise _bad(allowed)
    s = v.strip()
    if s.lower() in ("", "off", "false", "no"):
        return None
    if s.lower() in ("on", "true", "yes"):
        return f"{METRICS_HOST}:{METRICS_PORT}"
    try:
        return str(parse_address(s, default_host=METRICS_HOST, bare_port=True))
    except PortRangeError as e:
        raise _bad(str(e)) from None
    except AddressError:
        raise _bad(allowed) from None


# -- the settings ---------------------------------------------------------------------------------

def _key(default: object, parse: Parser, help: str, group: str, flag: str | None = None, short: str | None = None,
         metavar: str | None = None, sep: str = ",") -> Any:
    """sep: how the values of a repeated flag are joined before parsing (list keys)."""
    return field(default=default, metadata={"parse": parse, "help": help, "group": group, "flag": flag,
                                            "short": short, "metavar": metavar, "sep": sep})


KERNEL, EXPORT, TLS, OPS = "kernel datapath", "export", "TLS (tls:// collectors)", "logs and metrics"


@dataclass(frozen=True)
class Config:
    """Every setting. Durations are seconds, sizes bytes; see config/xdpflow.toml."""

    interfaces: tuple[str, ...] = _key((), _interfaces, "interface or glob to meter (repeat, or comma-separated)",
                                       KERNEL, "--interface", "-i", "IF")
    mode: str = _key("auto", _choice("auto", "native", "generic"),
                     "XDP mode: native (driver), generic (any interface, slower) or auto: native where the "
                     "driver supports it, else generic", KERNEL, metavar="auto|native|generic")
    max_entries: int = _key(DEFAULT_MAX_ENTRIES, _int_range(1, 0xFFFFFFFF),
                            "flow table size per page in the kernel (as Skydive)", KERNEL, metavar="N")
    max_kernel_memory: int = _key(DEFAULT_MEMORY_BUDGET, _size,
                                  "refuse to start if the flow maps would need more kernel memory", KERNEL,
                                  metavar="SIZE")
    filters: tuple[str, ...] = _key((), _filters,
                                    "filter rule, e.g. 'exclude dst 10.0.0.0/8' or 'include proto tcp dport 443' "
                                    "(repeat; first match wins; see config/xdpflow.toml)", KERNEL, "--filter",
                                    metavar="RULE", sep=";")
    sampling: int = _key(1, _int_range(1, 0xFFFFFFFF),
                         "meter 1 packet in N, chosen at random in the kernel; counters are not scaled, "
                         "collectors scale by samplingInterval", KERNEL, metavar="N")
    egress: bool = _key(False, _boolean,
                        "also meter what the interfaces send, with a TC egress program (flowDirection 1, "
                        "egressInterface); a forwarded packet then counts once per direction", KERNEL,
                        metavar="true|false")
    tunnels: bool = _key(False, _boolean,
                         "meter VXLAN (UDP 4789), Geneve (UDP 6081) and GRE packets as their inner flow, with the "
                         "outer addresses and the VNI or GRE key beside it (templates 270-273); off: the outer "
                         "flow only", KERNEL, metavar="true|false")
    biflow: bool = _key(False, _boolean,
                        "one record per conversation (RFC 5103): both directions, the initiator first, reverse "
                        "counters as enterprise 29305 elements", EXPORT, metavar="true|false")
    scan_interval: float = _key(10.0, _seconds, "seconds between drains of the kernel table", EXPORT, metavar="S")
    active_timeout: float = _key(60.0, _seconds, "export long flows at least this often", EXPORT, metavar="S")
    idle_timeout: float = _key(15.0, _seconds, "end a flow after this long without packets", EXPORT, metavar="S")
    collectors: tuple[str, ...] = _key(("udp://127.0.0.1:4739",), _collectors,
                                       "IPFIX collector URL, udp://HOST:PORT (repeat for several)", EXPORT,
                                       "--collector", "-c", "URL")
    observation_domain: int = _key(0, _int_range(0, 0xFFFFFFFF), "IPFIX observation domain id", EXPORT,
                                   metavar="N")
    mtu: int = _key(1400, _int_range(512, 65535),
                    "largest IPFIX message in bytes: at least the templates and a record need (534, biflow "
                    "908, tunnels 1052), at most one UDP datagram's payload (65507 IPv4, 65527 IPv6)", EXPORT,
                    metavar="N")
    template_refresh: float = _key(60.0, _seconds, "re-send templates at least this often (seconds)", EXPORT,
                                   metavar="S")
    template_refresh_messages: int = _key(100, _int_range(1, None), "... or every N messages", EXPORT, metavar="N")
    sequence_mode: str = _key("rfc", _choice("rfc", "nfdump"),
                              "rfc: options records count in sequence numbers (RFC 7011); nfdump: they do not",
                              EXPORT, metavar="rfc|nfdump")
    tcp_queue_size: int = _key(65_536, _int_range(1, None),
                               "messages held per TCP/TLS collector while it is unreachable", EXPORT, metavar="N")
    tls_ca: str | None = _key(None, _optional_str, "CA bundle to verify collectors; none: the system store", TLS,
                              metavar="PATH")
    tls_cert: str | None = _key(None, _optional_str, "client certificate (PEM)", TLS, metavar="PATH")
    tls_key: str | None = _key(None, _optional_str, "client private key (PEM)", TLS, metavar="PATH")
    tls_server_name: str | None = _key(None, _optional_str, "name to verify instead of the collector's host",
                                       TLS, metavar="NAME")
    log_level: str = _key("info", _choice(*logs.LEVELS), "log level", OPS, metavar="|".join(logs.LEVELS))
    log_format: str = _key("auto", _choice("auto", "console", "json"),
                           "console on a terminal, JSON lines otherwise", OPS, metavar="auto|console|json")
    metrics: str | None = _key(None, _metrics, f"Prometheus endpoint, e.g. {METRICS_HOST}:{METRICS_PORT}", OPS,
                               metavar="[HOST:]PORT")
    ready_file: str | None = _key(None, _optional_str,
                                  "write this file (JSON) once every interface is attached and the collectors are "
                                  "open, remove it on exit: for scripts and readiness probes (systemd readiness "
                                  "goes to $NOTIFY_SOCKET in any case)", OPS, metavar="PATH")

    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(parse_endpoint(c) for c in self.collectors)

    def metrics_address(self) -> tuple[str, int] | None:
        if self.metrics is None:
            return None
        listen = parse_address(self.metrics)
        return listen.host, listen.port


FIELDS = {f.name: f for f in fields(Config)}
KEYS = tuple(FIELDS)


def flag_of(key: str) -> str:
    return FIELDS[key].metadata["flag"] or "--" + key.replace("_", "-")


@dataclass(frozen=True)
class Loaded:
    config: Config
    path: str | None
    sources: dict[str, str]


# -- loading --------------------------------------------------------------------------------------

def _show(v: object, text: bool = False) -> str:
    if text and isinstance(v, str) and re.fullmatch(r"[\w.:/\[\]@,+*-]+", v):
        s = v
    else:
        try:
            s = json.dumps(v)
        except (TypeError, ValueError):
            s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _line(key: str, value: object, source: str, allowed: str, text: bool = False) -> str:
    return f"{key} = {_show(value, text)} ({source}): {allowed}"


def _flatten(prefix: str, v: object) -> Iterable[tuple[str, object]]:
    if isinstance(v, dict):
        for k, sub in v.items():
            yield from _flatten(f"{prefix}.{k}", sub)
    else:
        yield prefix, v


def _show_key(key: str) -> str:
    """A TOML key as written in a bare key, else quoted (JSON escapes: never a line break or a control character)."""
    return key if re.fullmatch(r"[A-Za-z0-9_.-]+", key) else json.dumps(key)


def _unknown(key: str, value: object, source: str) -> str:
    for path, leaf in _flatten(key, value):
        if path in SKYDIVE_NAMES:
            return _line(path, leaf, source, f"unknown key; this is Skydive's name, xdpflow's is "
                                             f"{SKYDIVE_NAMES[path]} (a top-level key)")
    close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "see `xdpflow run --help` or config/xdpflow.toml for the keys"
    return _line(_show_key(key), value, source, f"unknown key; {hint}")


def _read_toml(path: str, errors: list[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        errors.append(f"config = {json.dumps(path)}: not valid TOML: {e}")
    except UnicodeDecodeError as e:
        errors.append(f"config = {json.dumps(path)}: not valid TOML: not UTF-8 text (byte {e.start})")
    except FileNotFoundError:
        errors.append(f"config = {json.dumps(path)}: no such file")
    except OSError as e:
        errors.append(f"config = {json.dumps(path)}: cannot read it: {e.strerror}")
    return {}


def _env_layer(environ: Mapping[str, str], errors: list[str]) -> list[tuple[str, object, str]]:
    layer: list[tuple[str, object, str]] = []
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG or not value.strip():
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key in FIELDS:
            layer.append((key, value, f"from {name}"))
            continue
        # Other XDPFLOW_* variables may belong to other tools; only a near miss is surely a typo.
        close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.8)
        if close:
            errors.append(_line(name, value, "environment", f"unknown setting; did you mean "
                                                            f"{ENV_PREFIX}{close[0].upper()}?", text=True))
    return layer


def interface_problem(name: str) -> str | None:
    """Why `name` can't be metered from this network namespace, or None."""
    names = [n for _, n in socket.if_nameindex()]
    if name in names:
        return None
    shown = ", ".join(sorted(names)[:12]) + (", ..." if len(names) > 12 else "")
    return f"no such interface in this network namespace; there are: {shown}"


def file_problem(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except FileNotFoundError:
        return "file not found"
    except IsADirectoryError:
        return "is a directory, not a readable file"
    except OSError as e:
        return f"not readable: {e.strerror}"
    return None


def entries_within(budget: int) -> int:
    """The most flow entries whose maps fit in `budget` bytes."""
    from xdp.loader import map_memory_bytes

    return budget // map_memory_bytes(1)


def memory_problem(max_entries: int, budget: int) -> str | None:
    from xdp.loader import map_memory_bytes, possible_cpus

    need = map_memory_bytes(max_entries)
    if need <= budget:
        return None
    return (f"the flow maps would need {human_bytes(need)} of kernel memory ({possible_cpus()} CPUs), "
            f"above max_kernel_memory = {human_bytes(budget)}; allowed: at most {entries_within(budget)} entries, "
            f"or raise max_kernel_memory")


def resolve(flags: Mapping[str, object] | None = None, *, config_path: str | None = None,
            environ: Mapping[str, str] | None = None, default_path: str | None = None,
            need_interfaces: bool = True, system: bool = True) -> Loaded:
    """Build and validate the Config; raise ConfigError with every problem.

    `flags` maps keys to command-line values (strings, or lists of strings for list keys).
    `system` adds the checks that look at this machine: interfaces exist, TLS files are
    readable, the flow maps fit the memory budget.
    """
    env = os.environ if environ is None else environ
    errors: list[str] = []
    default_path = DEFAULT_PATH if default_path is None else default_path
    path = config_path or env.get(ENV_CONFIG) or (default_path if os.path.exists(default_path) else None)
    layers: list[tuple[str, object, str, bool]] = []
    file_unreadable = False
    if path is not None:
        before = len(errors)
        table = _read_toml(path, errors)
        file_unreadable = len(errors) > before
        for key, value in table.items():
            if key in FIELDS:
                layers.append((key, value, f"in {path}", False))
            else:
                errors.append(_unknown(key, value, f"in {path}"))
    layers += [(k, v, src, True) for k, v, src in _env_layer(env, errors)]
    for key, value in (flags or {}).items():
        if key not in FIELDS:
            raise KeyError(key)
        joined = FIELDS[key].metadata["sep"].join(value) if isinstance(value, list) else value
        layers.append((key, joined, f"from {flag_of(key)}", True))

    values: dict[str, Any] = {k: f.default for k, f in FIELDS.items()}
    sources = dict.fromkeys(FIELDS, "default")
    bad: set[str] = set()
    for key, raw, source, text in layers:
        try:
            values[key] = FIELDS[key].metadata["parse"](raw, text)
        except Invalid as e:
            bad.add(key)
            for suffix, item, allowed in e.items:
                shown = raw if item is None else item
                errors.append(_line(key + suffix, shown, source, allowed, text))
            continue
        sources[key] = source
        bad.discard(key)

    def good(*keys: str) -> bool:
        return not bad.intersection(keys)

    def cross(a: str, b: str, relation: str, allowed: str) -> str:
        return (f"{a} = {_show(values[a])} ({sources[a]}) is {relation} {b} = {_show(values[b])} "
                f"({sources[b]}): {allowed}")

    if good("active_timeout", "idle_timeout") and values["active_timeout"] < values["idle_timeout"]:
        errors.append(cross("active_timeout", "idle_timeout", "shorter than",
                            "active_timeout must be >= idle_timeout"))
    if good("scan_interval", "idle_timeout") and values["scan_interval"] > values["idle_timeout"]:
        errors.append(cross("scan_interval", "idle_timeout", "longer than",
                            "scan_interval must be <= idle_timeout, or idle flows end late"))
    if good("tunnels", "biflow") and values["tunnels"] and values["biflow"]:
        errors.append(cross("tunnels", "biflow", "set with", "tunnel records are uniflows: turn one of them off"))
    if good("mtu", "biflow", "tunnels", "collectors") and not (values["tunnels"] and values["biflow"]):
        errors += _mtu_problems(values, sources)
    if good("tls_cert", "tls_key") and (values["tls_cert"] is None) != (values["tls_key"] is None):
        given, missing = ("tls_cert", "tls_key") if values["tls_cert"] else ("tls_key", "tls_cert")
        errors.append(_line(given, values[given], sources[given], f"needs {missing} as well"))
    if need_interfaces and good("interfaces") and not values["interfaces"] and not file_unreadable:
        errors.append(_line("interfaces", [], sources["interfaces"],
                            "at least one interface is needed: set interfaces, XDPFLOW_INTERFACES or --interface"))
    if system:
        errors += _system_problems(values, sources, good)
    if errors:
        raise ConfigError(errors)
    return Loaded(Config(**values), path, sources)


def _mtu_problems(values: dict[str, Any], sources: dict[str, str]) -> list[str]:
    """The MTU against what the messages must hold (every template and a record) and what UDP carries."""
    from exporter.ipfix.encoder import encoder_minimum_mtu, max_mtu

    mtu = values["mtu"]
    least = encoder_minimum_mtu(values["biflow"], values["tunnels"])
    if mtu < least:
        kind = "biflow templates" if values["biflow"] else "tunnel templates" if values["tunnels"] else "templates"
        return [_line("mtu", mtu, sources["mtu"], f"at least {least}: a message must hold the header, every one "
                      f"of the {kind} and one record")]
    for url in values["collectors"]:
        ep = parse_endpoint(url)
        if ep.scheme != "udp":
            continue
        # A name may resolve to IPv4: only a literal IPv6 address is allowed IPv6's larger payload.
        family = 6 if ":" in ep.host else 4
        if mtu > (most := max_mtu(family)):
            return [_line("mtu", mtu, sources["mtu"],
                          f"at most {most} for {url}: the largest UDP payload over IPv{family}")]
    return []


def _system_problems(values: dict[str, Any], sources: dict[str, str], good: Callable[..., bool]) -> list[str]:
    errors = []
    if good("interfaces"):
        for i, name in enumerate(values["interfaces"]):
            if not filters.is_glob(name) and (p := interface_problem(name)) is not None:
                errors.append(_line(f"interfaces[{i}]", name, sources["interfaces"], p))
    for key in ("tls_ca", "tls_cert", "tls_key"):
        fpath = values[key]
        if good(key) and fpath is not None and (p := file_problem(fpath)) is not None:
            errors.append(_line(key, fpath, sources[key], p))
    if good("filters"):
        errors += _filter_iface_problems(values["filters"], sources["filters"])
    if good("ready_file") and values["ready_file"] is not None \
            and (p := ready_file_problem(values["ready_file"])) is not None:
        errors.append(_line("ready_file", values["ready_file"], sources["ready_file"], p))
    if good("max_entries", "max_kernel_memory"):
        p = memory_problem(values["max_entries"], values["max_kernel_memory"])
        if p is not None:
            errors.append(_line("max_entries", values["max_entries"], sources["max_entries"], p))
    return errors


def _filter_iface_problems(rules: tuple[str, ...], source: str) -> list[str]:
    """Interface names (not globs or indexes) in filter rules must exist, as interfaces do."""
    names = {n for _, n in socket.if_nameindex()}
    errors = []
    for i, text in enumerate(rules):
        for v in filters.parse_rule(text).iface or ():
            if not v.isdigit() and not filters.is_glob(v) and v not in names:
                errors.append(_line(f"filters[{i}]", text, source,
                                    f"iface {json.dumps(v)}: {interface_problem(v)}"))
    return errors


def load(flags: Mapping[str, object] | None = None, **kw: Any) -> Config:
    return resolve(flags, **kw).config


# -- command line ---------------------------------------------------------------------------------

def _dest(key: str) -> str:
    return f"cfg_{key}"


def default_text(key: str) -> str:
    default: Any = FIELDS[key].default
    if default is None or default == ():
        return "off" if key == "metrics" else "none"
    if isinstance(default, tuple):
        return ",".join(default)
    if isinstance(default, bool):
        return "true" if default else "false"
    return human_bytes(int(default)) if key == "max_kernel_memory" else str(default)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per Config key; a flag given overrides the file and the environment."""
    p.add_argument("--config", dest="config_path", metavar="PATH", default=None,
                   help=f"TOML config file (default: ${ENV_CONFIG}, else {DEFAULT_PATH} when it exists)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, f in FIELDS.items():
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        names = [flag_of(key)] + ([meta["short"]] if meta["short"] else [])
        text = f"{meta['help']} (default: {default_text(key)})"
        is_list = isinstance(f.default, tuple)
        # A yes/no key's flag alone means yes (`--biflow`); `--biflow false` still overrides a file.
        optional: dict[str, Any] = {"nargs": "?", "const": "true"} if isinstance(f.default, bool) else {}
        group.add_argument(*names, dest=_dest(key), default=argparse.SUPPRESS, metavar=meta["metavar"],
                           action="append" if is_list else "store", help=text.replace("%", "%%"), **optional)


def read_flag(key: str, given: str | Sequence[str]) -> Any:
    """A flag's value read by `key`'s own parser, a repeated list flag joined first as `run` joins it
    (so `-i a -i b,a` is "a listed twice" everywhere); ValueError saying what is wrong."""
    text = given if isinstance(given, str) else FIELDS[key].metadata["sep"].join(given)
    try:
        return FIELDS[key].metadata["parse"](text, True)
    except Invalid as e:
        raise ValueError("; ".join(f"{value} {problem}" if where.startswith("[") else problem
                                   for where, value, problem in e.items)) from None


def flag_type(key: str) -> Callable[[str], Any]:
    """An argparse type that reads a flag with `key`'s own parser: for commands whose flags are a few
    of the keys (dump), so a value means what it means in `run`."""

    def read(text: str) -> Any:
        try:
            return read_flag(key, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    read.__name__ = key
    return read


def flags_from_args(args: argparse.Namespace) -> dict[str, object]:
    return {k: getattr(args, _dest(k)) for k in KEYS if hasattr(args, _dest(k))}


def from_args(args: argparse.Namespace, **kw: Any) -> Loaded:
    return resolve(flags_from_args(args), config_path=getattr(args, "config_path", None), **kw)
