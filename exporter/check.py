"""`xdpflow check`: is this machine ready to meter? One line per check: ok, warn or FAIL (with a fix).

Checks: kernel version, bpf() allowed, BTF, bcc, kernel headers, capabilities, each interface (exists,
driver, XDP modes, no foreign program), map memory against the budget, TLS files, collectors resolve.
`run_preflight` is the short form `xdpflow run` runs first: the machine checks only, failures as
one-line problems.

Native XDP support is probed by attaching a do-nothing XDP_PASS program through a bpf_link and closing
it at once, but only on veth devices: on a physical NIC a native attach can reset the rings and drop
the link for a moment, so there the answer comes from the driver name instead.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import platform
import re
import socket
import struct
import sys
import threading
from dataclasses import dataclass

from exporter import config as configmod
from exporter.config import Config, ConfigError
from xdp import filters

OK, WARN, FAIL = "ok", "warn", "FAIL"
MIN_KERNEL = (5, 15)
BTF_PATH = "/sys/kernel/btf/vmlinux"
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39
RESOLVE_TIMEOUT = 5.0
PROBE_DRIVERS = frozenset({"veth"})
# Drivers with native XDP in mainline (as of 5.15); a driver not listed may still have it.
NATIVE_DRIVERS = frozenset({
    "veth", "virtio_net", "tun", "netdevsim", "xen-netfront", "hv_netvsc", "ena", "mlx4_en", "mlx5_core",
    "i40e", "ice", "ixgbe", "ixgbevf", "igb", "igc", "bnxt_en", "nfp", "qede", "sfc", "thunder-nicvf",
    "dpaa2-eth", "mvneta", "mvpp2", "stmmac", "fec", "enetc", "lan966x-switch", "bond",
})
CAPS_FIX = ("run as root, or grant CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (systemd AmbientCapabilities=, "
            "docker/podman --cap-add, Kubernetes securityContext.capabilities.add)")


@dataclass(frozen=True)
class Result:
    status: str
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name}: {self.detail}"
        return f"{text}; fix: {self.fix}" if self.fix and self.status != OK else text

    def problem(self) -> str:
        return f"{self.name}: {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")


# -- the machine ----------------------------------------------------------------------------------

def kernel_version(release: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_kernel(release: str | None = None) -> Result:
    release = release or platform.release()
    version = kernel_version(release)
    need = ".".join(map(str, MIN_KERNEL))
    if version is None:
        return Result(WARN, "kernel", f"cannot read a version from {release!r}; {need} or newer is needed")
    if version < MIN_KERNEL:
        return Result(FAIL, "kernel", f"{release} is older than {need} (batched map drains, CAP_BPF)",
                      f"boot a {need} or newer kernel")
    return Result(OK, "kernel", f"{release} (>= {need})")


TCX_KERNEL = (6, 6)


def check_egress(release: str | None = None) -> Result:
    """How --egress will attach: a TCX bpf_link (released with the process) or the clsact fallback."""
    release = release or platform.release()
    version = kernel_version(release)
    if version is not None and version >= TCX_KERNEL:
        return Result(OK, "egress", f"TCX links (kernel {release} >= 6.6): released with the process")
    return Result(WARN, "egress", f"kernel {release} has no TCX: a clsact qdisc + cls_bpf filter (pref 49152) "
                                  "that outlives a killed exporter",
                  "after a SIGKILL: tc filter del dev IF egress pref 49152")


def check_bpf_syscall() -> Result:
    from xdp import bpfsys

    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=IIII", attr, 0, 2, 4, 4, 1)  # BPF_MAP_CREATE: array map, 4-byte key and value, 1 entry
    try:
        fd = bpfsys._bpf(0, attr)
    except OSError as e:
        if e.errno == errno.ENOSYS:
            return Result(FAIL, "bpf()", "no bpf() syscall (kernel built without CONFIG_BPF_SYSCALL?)",
                          "use a kernel with CONFIG_BPF_SYSCALL=y")
        fix = CAPS_FIX
        if e.errno == errno.EPERM:
            fix += "; in a container also allow bpf() in the seccomp profile"
        return Result(FAIL, "bpf()", f"BPF_MAP_CREATE refused: {os.strerror(e.errno or 0)}", fix)
    os.close(fd)
    return Result(OK, "bpf()", "BPF_MAP_CREATE allowed")


def check_btf(path: str = BTF_PATH) -> Result:
    if os.path.exists(path):
        return Result(OK, "BTF", path)
    return Result(WARN, "BTF", f"{path} missing: xdpflow compiles against kernel headers and does not need it, "
                               "but bpftool and CO-RE tools will", "use a kernel built with CONFIG_DEBUG_INFO_BTF=y")


# Run by this interpreter in a child: importing bcc maps libbcc and LLVM (~100 MB) for good, and
# `xdpflow run` (whose preflight this is) must not carry them; the compile is a child too (xdp.compile).
_BCC_PROBE = """
import json, os
try:
    import bcc
except Exception as e:  # ImportError, or OSError when libbcc.so is missing
    print(json.dumps({"error": str(e)}))
else:
    print(json.dumps({"version": getattr(bcc, "__version__", "unknown version"),
                      "where": os.path.dirname(bcc.__file__ or "")}))
"""
BCC_FIX = "apt-get install python3-bpfcc (and `make venv` to link it into .venv)"


def check_bcc(timeout: float = 60.0) -> Result:
    """bcc imports with this interpreter (tried in a child process, see _BCC_PROBE)."""
    import json
    import subprocess

    from xdp.compile import run_python

    try:
        with run_python([sys.executable, "-c", _BCC_PROBE], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                        stdin=subprocess.DEVNULL, text=True) as proc:
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        got = json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        return Result(FAIL, "bcc", f"cannot import bcc: the probe ({sys.executable}) failed: {e}", BCC_FIX)
    if "error" in got:
        return Result(FAIL, "bcc", f"cannot import bcc: {got['error']}", BCC_FIX)
    return Result(OK, "bcc", f"{got['version']} ({got['where']})")


def check_headers() -> Result:
    from xdp import headers

    try:
        found = headers.find()
    except headers.HeadersNotFound as e:
        msg = str(e)
        detail, _, fix = msg.partition("): ")
        return Result(FAIL, "kernel headers", detail + (")" if fix else ""), fix or headers.install_hint())
    return Result(OK, "kernel headers", found.description)


def effective_caps(status_path: str = "/proc/self/status") -> int:
    with open(status_path, encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_capabilities(status_path: str = "/proc/self/status") -> Result:
    caps = effective_caps(status_path)

    def has(bit: int) -> bool:
        return bool(caps >> bit & 1)

    names = {CAP_BPF: "CAP_BPF", CAP_PERFMON: "CAP_PERFMON", CAP_NET_ADMIN: "CAP_NET_ADMIN"}
    missing = [n for bit, n in names.items() if not has(bit) and not (bit != CAP_NET_ADMIN and has(CAP_SYS_ADMIN))]
    if missing:
        return Result(FAIL, "capabilities", f"missing {', '.join(missing)} (CapEff {caps:#x})", CAPS_FIX)
    held = [n for bit, n in names.items() if has(bit)] + (["CAP_SYS_ADMIN"] if has(CAP_SYS_ADMIN) else [])
    return Result(OK, "capabilities", " ".join(held))


def system_checks() -> list[Result]:
    return [check_kernel(), check_bpf_syscall(), check_btf(), check_bcc(), check_headers(), check_capabilities()]


# -- interfaces -----------------------------------------------------------------------------------

def driver_name(ifname: str) -> str | None:
    """The driver behind an interface of the current netns (ethtool GDRVINFO); None if it reports none."""
    import fcntl

    info = ctypes.create_string_buffer(196)  # struct ethtool_drvinfo
    struct.pack_into("=I", info, 0, 0x3)  # ETHTOOL_GDRVINFO
    ifreq = struct.pack("16sP", ifname.encode()[:15], ctypes.addressof(info))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), 0x8946, ifreq)  # SIOCETHTOOL
        except OSError:
            return None
    return info.raw[4:36].split(b"\0", 1)[0].decode(errors="replace") or None


def _load_pass_program() -> int:
    """A two-instruction XDP program (r0 = XDP_PASS; exit), loaded with BPF_PROG_LOAD."""
    from xdp import bpfsys

    insns = struct.pack("=BBhiBBhi", 0xB7, 0, 0, 2, 0x95, 0, 0, 0)
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=IIQQ", attr, 0, 6, 2, ctypes.addressof(code), ctypes.addressof(lic))  # BPF_PROG_TYPE_XDP
    struct.pack_into("16s", attr, 48, b"xdpflow_probe")
    return bpfsys._bpf(5, attr)  # BPF_PROG_LOAD


def probe_native(ifindex: int) -> bool | None:
    """Attach XDP_PASS natively through a bpf_link and close it at once: True, False, or None if unsure.

    The link goes when its fd closes, so not even a crash here leaves the probe attached.
    """
    from xdp import bpfsys
    from xdp.attach import MODE_FLAGS

    try:
        prog_fd = _load_pass_program()
    except OSError:
        return None
    try:
        link_fd = bpfsys.xdp_link_create(prog_fd, ifindex, MODE_FLAGS["native"])
    except OSError as e:
        return False if e.errno in (errno.EOPNOTSUPP, errno.EINVAL) else None
    finally:
        os.close(prog_fd)
    os.close(link_fd)
    return True


def check_interface(name: str, mode: str, probe: bool = True) -> Result:
    from xdp.attach import attached_mode, netlink

    label = f"interface {name}"
    if (missing := configmod.interface_problem(name)) is not None:   # what `run` refuses, in its words
        return Result(FAIL, label, missing,
                      "check the name with `ip link`; for an interface in another namespace run xdpflow "
                      "there: ip netns exec NS xdpflow check ...")
    try:
        ifindex = socket.if_nametoindex(name)
        with netlink() as ipr:
            link = ipr.link("get", index=ifindex)[0]
            current = attached_mode(ipr, ifindex)
    except Exception as e:  # pyroute2 NetlinkError: no privilege; OSError: the interface just went
        return Result(FAIL, label, f"cannot inspect it: {e}", CAPS_FIX)
    if current is not None:
        xdp = link.get_attr("IFLA_XDP")
        prog = xdp.get_attr("IFLA_XDP_PROG_ID") if xdp is not None else None
        return Result(FAIL, label, f"an XDP program is already attached ({current} mode, prog id {prog}); "
                                   "xdpflow will not replace it",
                      f"detach it if nothing needs it: ip link set dev {name} xdp off")
    loopback = bool(link["flags"] & 0x8)  # IFF_LOOPBACK
    up = bool(link["flags"] & 0x1)  # IFF_UP
    driver = driver_name(name)
    native: bool | None
    if loopback:
        native, how = False, "loopback"
    elif driver in PROBE_DRIVERS and probe:
        native, how = probe_native(ifindex), "probed"
    elif driver in NATIVE_DRIVERS:
        native, how = True, "driver supports it, not probed"
    else:
        native, how = None, "unknown driver, not probed"

    modes = {True: "native and generic", False: "generic only", None: "generic (native unknown)"}[native]
    detail = f"driver {driver or 'none reported'}; XDP {modes} ({how})"
    if mode == "native" and native is False:
        return Result(FAIL, label, detail + "; mode native was asked", "use mode auto or generic")
    if mode == "native" and native is None:
        return Result(WARN, label, detail + "; native attach may fail", "use mode auto to fall back to generic")
    gets = "generic" if mode == "generic" or native is False else ("native" if native else "native or generic")
    detail += f"; mode {mode} attaches {gets}"
    if not up:
        return Result(WARN, label, detail + "; the interface is down, no traffic will be seen",
                      f"ip link set dev {name} up")
    return Result(OK, label, detail)


def check_pattern(pattern: str) -> Result:
    """A glob: which interfaces match now (loopback only by name); the rest are attached as they appear."""
    import fnmatch

    names = sorted(n for _, n in socket.if_nameindex() if n != "lo" and fnmatch.fnmatchcase(n, pattern))
    label = f"interfaces {pattern}"
    if not names:
        return Result(WARN, label, "no interface matches yet; matching ones are attached as they appear",
                      "check the pattern with `ip link` if some should match now")
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return Result(OK, label, f"matches {shown}; later ones are attached as they appear")


# -- memory, TLS, collectors ----------------------------------------------------------------------

def check_memory(cfg: Config) -> Result:
    from xdp.loader import map_memory_bytes, possible_cpus
    from xdp.sizing import human_bytes

    need = map_memory_bytes(cfg.max_entries)
    what = (f"{human_bytes(need)} for max_entries {cfg.max_entries} ({possible_cpus()} CPUs), "
            f"budget max_kernel_memory {human_bytes(cfg.max_kernel_memory)}")
    if configmod.memory_problem(cfg.max_entries, cfg.max_kernel_memory) is not None:
        return Result(FAIL, "map memory", what, f"set max_entries <= {configmod.entries_within(cfg.max_kernel_memory)}"
                                                f", or max_kernel_memory >= {-(-need // (1 << 20))}M")
    available = _mem_available()
    if available is not None and need > available // 2:
        return Result(WARN, "map memory", f"{what}; more than half of the {human_bytes(available)} available",
                      "lower max_entries")
    return Result(OK, "map memory", what)


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_tls(cfg: Config) -> list[Result]:
    out = []
    for key in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(cfg, key)
        if path is None:
            continue
        problem = configmod.file_problem(path)
        out.append(Result(FAIL, key, f"{path}: {problem}", f"fix the path or the file's permissions ({key})")
                   if problem else Result(OK, key, f"{path} readable"))
    return out


def _resolve(host: str, port: int) -> list[str]:
    box: list[object] = []

    def work() -> None:
        try:
            box.append(socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM))
        except OSError as e:
            box.append(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(RESOLVE_TIMEOUT)
    if not box:
        raise TimeoutError(f"no answer within {RESOLVE_TIMEOUT:g} s")
    if isinstance(box[0], OSError):
        raise box[0]
    infos: list[tuple[object, ...]] = box[0]  # type: ignore[assignment]
    return sorted({str(info[4][0]) for info in infos})  # type: ignore[index]


def check_collector(text: str) -> Result:
    from exporter.transport import parse_endpoint

    ep = parse_endpoint(text)
    try:
        addrs = _resolve(ep.host, ep.port)
    except (OSError, TimeoutError) as e:
        return Result(FAIL, f"collector {ep}", f"cannot resolve {ep.host}: {e}",
                      "check the name and /etc/resolv.conf, or use an address")
    return Result(OK, f"collector {ep}", "resolves to " + ", ".join(addrs))


# -- entry points ---------------------------------------------------------------------------------

def run_checks(loaded: configmod.Loaded) -> list[Result]:
    cfg = loaded.config
    results = [Result(OK, "config", loaded.path or "no file, defaults + environment + flags")]
    results += system_checks()
    if not cfg.interfaces:
        results.append(Result(WARN, "interfaces", "none given, none checked", "pass --interface IF"))
    results += [check_pattern(name) if filters.is_glob(name) else check_interface(name, cfg.mode)
                for name in cfg.interfaces]
    if cfg.egress:
        results.append(check_egress())
    results.append(check_memory(cfg))
    results += check_tls(cfg)
    results += [check_collector(c) for c in cfg.collectors]
    return results


def run_preflight(cfg: Config | None = None) -> list[str]:
    """What `xdpflow run` and `dump` check before loading anything: each failure as one line.

    A missing capability is said once, by name: bpf() refused with EPERM is only its consequence.
    """
    failed = [r for r in system_checks() if r.status == FAIL]
    if any(r.name == "capabilities" for r in failed):
        failed = [r for r in failed if not (r.name == "bpf()" and os.strerror(errno.EPERM) in r.detail)]
    return [r.problem() for r in failed]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="preflight: is this machine ready to meter and export?",
                       description="Check the kernel, privileges, bcc and headers, the interfaces and their XDP "
                                   "modes, the map memory and the collectors, one line each (ok, warn, FAIL with "
                                   "a fix). Takes the same settings as `run`. Exit 1 on any FAIL, 2 on a bad "
                                   "config.")
    configmod.add_arguments(p)
    p.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        loaded = configmod.from_args(args, need_interfaces=False, system=False)
    except ConfigError as e:
        for line in e.lines:
            print(f"xdpflow: error: {line}", file=sys.stderr)
        return 2
    results = run_checks(loaded)
    for r in results:
        print(r.line(), flush=True)
    return 1 if any(r.status == FAIL for r in results) else 0
