"""Config fuzz: any TOML document (or any bytes) gives either a valid Config or ConfigError, one line per problem.

Hypothesis writes documents with keys from the real key set, Skydive's names, near misses and junk
(quoted keys may hold any character: newlines, U+2028, escapes), values of every TOML type (huge
integers, nan/inf, size and endpoint look-alikes, Unicode digits, dates and times, arrays, nested
and inline tables), sometimes cut or corrupted, sometimes not UTF-8 at all. Loading goes through
`exporter.config.resolve` in-process, with the machine checks on (interfaces, files, map memory),
exactly as `xdpflow run --config FILE` does before anything is attached. Anything but a Config or a
ConfigError whose lines are single lines is a failure: `xdpflow run` would print a traceback.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from exporter import cli, service
from exporter import config as configmod
from exporter.config import Config, ConfigError

ABSENT = "/nonexistent/xdpflow-fuzz/xdpflow.toml"
# `make fuzz` raises this (XDPFLOW_FUZZ_EXAMPLES=20000, about 100 documents a second); 400 keeps `make test` ~5 s.
EXAMPLES = int(os.environ.get("XDPFLOW_FUZZ_EXAMPLES", "400"))

# -- a TOML writer (tomllib only reads) ----------------------------------------------------------

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def toml_document(doc: dict[str, Any], sections: bool) -> str:
    """Top-level keys first; with `sections`, tables as [headers] rather than inline."""
    plain = [(k, v) for k, v in doc.items() if not (sections and isinstance(v, dict))]
    tables = [(k, v) for k, v in doc.items() if sections and isinstance(v, dict)]
    lines = [f"{toml_string(k)} = {toml_value(v)}" for k, v in plain]
    for k, v in tables:
        lines.append(f"[{toml_string(k)}]")
        lines += [f"{toml_string(sk)} = {toml_value(sv)}" for sk, sv in v.items()]
    return "\n".join(lines) + "\n"


# -- strategies -------------------------------------------------------------------------------------

KEYS = st.one_of(
    st.sampled_from(configmod.KEYS),
    st.sampled_from(["flow", "agent", "max_entrys", "scan_intervall", "Interfaces", "max-entries", "collector",
                     "tls", "a.b", "", " "]),
    st.text(max_size=12),
    st.text(alphabet="\n\r\u2028\u0085\x0b\x1b\t ab", min_size=1, max_size=4),
)
SIZES = st.from_regex(r"\A\s?[0-9]{1,400}(\.[0-9]{1,4})?\s?[kKmMgGtT]?(i?[bB])?\Z")
ENDPOINTS = st.builds(
    lambda scheme, host, port: f"{scheme}{host}{port}",
    st.sampled_from(["", "udp://", "tcp://", "tls://", "sctp://", "://", "udp:/"]),
    st.sampled_from(["127.0.0.1", "[::1]", "[::1", "h", "", "collector.example", "a b", "[fe80::1%eth0]"]),
    st.one_of(st.just(""), st.integers(-5, 70_000).map(lambda p: f":{p}"),
              st.text(alphabet="0123456789²٣:/?#@ ", max_size=6).map(lambda s: ":" + s)),
)
NUMBERS = st.one_of(
    st.integers(), st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**32, 2**64, 10**19, 10**308, 10**309, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(
    st.booleans(), NUMBERS, st.text(max_size=24), SIZES, ENDPOINTS,
    st.sampled_from(["auto", "native", "generic", "rfc", "nfdump", "json", "debug", "off", "on", "lo", "veth*",
                     "", "  ", "1G", "9477", ":9477", "127.0.0.1:99999", "/etc/hostname", "/nonexistent"]),
    st.datetimes(), st.dates(), st.times(),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=4)),
                      max_leaves=10)
DOCS = st.dictionaries(KEYS, VALUES, max_size=8)
# Most random documents fail on the first bad key; a valid base lets the other checks be reached too.
BASED = DOCS.map(lambda d: {"interfaces": ["lo"], "collectors": ["udp://127.0.0.1:4739"], **d})


@st.composite
def files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["doc", "based", "sections", "cut", "corrupt", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    doc = draw(BASED if kind in ("based", "cut", "corrupt") else DOCS)
    text = toml_document(doc, sections=kind == "sections").encode()
    if kind == "cut" and text:
        return text[: draw(st.integers(0, len(text) - 1))]
    if kind == "corrupt" and text:
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.binary(min_size=1, max_size=4)) + text[at:]
    return text


# -- the property -----------------------------------------------------------------------------------

def load_file(path: Path) -> Config | ConfigError:
    """What `xdpflow run --config path` does with the file before anything is attached."""
    try:
        loaded = configmod.resolve(None, config_path=str(path), environ={}, default_path=ABSENT, system=True)
    except ConfigError as e:
        return e
    return loaded.config


def assert_clean(result: Config | ConfigError) -> None:
    if isinstance(result, ConfigError):
        assert result.lines, "ConfigError without a message"
        for line in result.lines:
            assert isinstance(line, str) and line.strip(), repr(line)
            assert len(line.splitlines()) == 1 and "\n" not in line and "\r" not in line, \
                f"not one line: {line!r}"
            assert len(line) < 600, f"a line this long is not read: {line[:120]!r}..."
        return
    assert isinstance(result, Config)
    endpoints = result.endpoints()  # a valid Config's collectors must parse for the service too
    assert len(endpoints) == len(result.collectors) >= 1
    assert result.active_timeout >= result.idle_timeout >= result.scan_interval > 0
    assert 512 <= result.mtu <= 65535 and result.max_entries >= 1


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "xdpflow.toml"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
@given(data=files())
@example(data=b'interfaces = ["lo"]\nscan_interval = ' + b"9" * 400 + b"\n")
@example(data=b'interfaces = ["lo"]\nmax_kernel_memory = "' + b"9" * 400 + b'"\n')
@example(data=b'interfaces = ["lo"]\nmax_entries = ' + b"9" * 400 + b"\n")
@example(data=b'interfaces = ["lo"]\ncollectors = ["udp://h:\xc2\xb2"]\n')
@example(data=b'interfaces = ["lo"]\n# \xff\xfe not UTF-8\n')
@example(data=b'interfaces = ["lo"]\n"scan\\ninterval" = 5\n')
def test_any_file_is_a_config_or_one_line_errors(scratch: Path, data: bytes) -> None:
    scratch.write_bytes(data)
    assert_clean(load_file(scratch))


# -- the same regressions through the command line: exit 2, one line each, no traceback -------------

HOSTILE = {
    "huge integer for seconds": b'interfaces = ["lo"]\nscan_interval = ' + b"9" * 400 + b"\n",
    "huge size string": b'interfaces = ["lo"]\nmax_kernel_memory = "' + b"9" * 400 + b'"\n',
    "huge max_entries": b'interfaces = ["lo"]\nmax_entries = ' + b"9" * 400 + b"\n",
    "superscript port": b'interfaces = ["lo"]\ncollectors = ["udp://h:\xc2\xb2"]\n',
    "not UTF-8": b'interfaces = ["lo"]\n# \xff\xfe\n',
    "newline in a key": b'interfaces = ["lo"]\n"scan\\ninterval" = 5\n',
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_file_through_the_cli(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("XDPFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(configmod, "DEFAULT_PATH", ABSENT)

    def refuse(*a: object, **k: object) -> int:
        raise AssertionError("the service must not start on a bad config")

    monkeypatch.setattr(service, "run", refuse)
    path = tmp_path / "x.toml"
    path.write_bytes(HOSTILE[case])
    import structlog

    saved = structlog.get_config()
    try:
        rc = cli.main(["run", "--config", str(path)])
    finally:
        structlog.configure(**saved)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and all(re.match(r"xdpflow: error: \S", ln) for ln in lines), lines
