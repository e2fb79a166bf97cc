"""Compile and load xdp/flow.c in a short-lived child process; hand its file descriptors to the caller.

bcc compiles with LLVM/clang inside the process that imports it: ~100 MB mapped by `import bcc`,
~120 MB once flow.c is compiled, and none of it is ever given back. The exporter runs for months
and needs none of that after the load, so the compile runs here, in a child
(`python -m xdp.compile`): it finds the kernel headers (xdp.headers), compiles with bcc, loads the
XDP program and the TC egress program (both share every map), and sends the parent one message
over a Unix socket (SOCK_SEQPACKET): a JSON header naming each file descriptor, and the file
descriptors themselves as SCM_RIGHTS ancillary data. Then it exits. The programs and maps live on
through the parent's descriptors and go when the parent closes them or dies in any way (no pin,
nothing left in bpffs).

Failures are the same one-line messages the in-process loader gave, in the header's "error";
the parent raises them as LoaderError. The child's stderr is the parent's: clang's chatter is
kept out of it during the compile (_quiet_compile), a verifier log of a refused program reaches
it as before. If the parent dies first, the child is killed (PR_SET_PDEATHSIG) and what it
created goes with it.

Nothing in this module's import path may import numpy or bcc: the child starts lean and the
parent imports it only for `load()`.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "flow.c")

XDP_PROG = "xdpflow"
EGRESS_PROG = "xdpflow_egress"      # the TC program in flow.c
CLOCK_PROG = "xdpflow_clock"        # run through BPF_PROG_TEST_RUN at each flip, never attached
# Every map the loader reaches by name (flows: the LRU flow map; slots: the two pages of slots, mapped
# by user space; fence: the array-of-maps whose update waits an RCU grace period).
MAPS = ("flows", "slots", "slot_alloc", "flow_cache", "control", "stats", "clock", "fence", "rule_sets",
        "src_prefixes", "dst_prefixes", "proto_masks", "sport_masks", "dport_masks", "vlan_masks", "iface_masks",
        "iface_masks_high", "rule_hits", "tunnel_exts", "dns_exts", "tcp_exts")
# Extensions (flow.h): setting name -> the -D flag that compiles it in, and the array holding its entries.
FEATURES = {"tunnels": ("XDPFLOW_TUNNELS", "tunnel_exts"), "dns": ("XDPFLOW_DNS", "dns_exts"),
            "tcp_rtt": ("XDPFLOW_TCP_RTT", "tcp_exts")}

BCC_MISSING = ("the bcc Python module is missing: apt-get install python3-bpfcc "
               "(and run `make venv` to link it into .venv)")
PRIVILEGES = "loading BPF needs root or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON"
TIMEOUT = 600.0                     # seconds for compile + load: far above the ~2 s it takes at 1M entries
_MAX_MESSAGE = 1 << 16
_MAX_FDS = 64
_PR_SET_PDEATHSIG = 1

T = TypeVar("T")


class CompileError(RuntimeError):
    """A one-line, operator-facing failure of the compile or load."""


# -- parent side ---------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """What the child handed over: open file descriptors by program/map name (owned by the caller)."""

    fds: dict[str, int]
    headers: str                     # which kernel headers were used (xdp.headers description)
    egress_error: str | None = None  # the egress program failed to load (the XDP one did): why

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def child_command(*args: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment running `python -m xdp.compile ARGS` with this interpreter and this package."""
    root = os.path.dirname(HERE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return [sys.executable, "-m", "xdp.compile", *args], env


def run_python(argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
    """Start this interpreter again: argv[0] is sys.executable, the binary is /proc/self/exe.

    /proc/self/exe reaches the running binary without walking its path, which this process may
    not be allowed to: a service user started by a more privileged exec (setpriv, a container
    runtime, systemd) from a virtualenv whose base interpreter sits in a directory only root may
    search. argv[0] keeps the path, so the child finds the same virtualenv (pyvenv.cfg) and
    site-packages. Without /proc, the path it is.
    """
    try:
        return subprocess.Popen(argv, executable="/proc/self/exe", **popen)
    except FileNotFoundError:
        return subprocess.Popen(argv, **popen)


def feature_flags(features: Sequence[str]) -> list[str]:
    """The -D flags compiling `features` (names of FEATURES) in; ValueError names an unknown one."""
    unknown = sorted(set(features) - set(FEATURES))
    if unknown:
        raise ValueError(f"unknown extension {unknown[0]!r} (known: {', '.join(FEATURES)})")
    return [f"-D{FEATURES[f][0]}" for f in sorted(set(features))]


def load(max_entries: int, timeout: float = TIMEOUT, features: Sequence[str] = ()) -> Loaded:
    """Compile and load flow.c for `max_entries` flows per page, with `features` (names of FEATURES)
    compiled in, in a child; raise CompileError on failure."""
    feature_flags(features)
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with parent:
        try:
            argv, env = child_command("--socket", str(child.fileno()), "--max-entries", str(max_entries),
                                      *(f"--feature={f}" for f in sorted(set(features))))
            proc = run_python(argv, env=env, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        except OSError as e:
            raise CompileError(f"could not start the compiler process ({sys.executable}): "
                               f"{e.strerror or e}") from None
        finally:
            child.close()   # from now on only the child holds that end: its exit is our EOF
        try:
            parent.settimeout(timeout)
            header, fds = _receive(parent)
        except TimeoutError:
            proc.kill()
            proc.wait()
            raise CompileError(f"compiling and loading xdp/flow.c took longer than {timeout:.0f} s") from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        rc = proc.wait()
    return _loaded(header, fds, rc)


def _receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    # Not socket.recv_fds: Python 3.11's ignores its flags argument, and the descriptors must be
    # close-on-exec (MSG_CMSG_CLOEXEC) so no later child of the exporter holds the programs and maps.
    data, ancdata, flags, _ = sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints = array.array("i")
            ints.frombytes(payload[: len(payload) - len(payload) % ints.itemsize])
            fds += ints
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            os.close(fd)
        raise CompileError("the compiler process sent more than fits in one message")
    if not data:
        return {}, fds
    try:
        header = json.loads(data)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        for fd in fds:
            os.close(fd)
        raise CompileError("the compiler process sent a malformed message")
    return header, fds


def _loaded(header: dict[str, Any], fds: list[int], rc: int) -> Loaded:
    names = header.get("names", [])
    got = Loaded(dict(zip(names, fds, strict=False)), str(header.get("headers", "")), header.get("egress_error"))
    for fd in fds[len(names):]:
        os.close(fd)
    if "error" in header:
        got.close()
        raise CompileError(str(header["error"]))
    missing = [n for n in (XDP_PROG, CLOCK_PROG, *MAPS) if n not in got.fds]
    if not header or missing or len(names) != len(fds):
        got.close()
        how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        if not header:
            raise CompileError(f"the compiler process ended without loading xdp/flow.c ({how})")
        raise CompileError(f"the compiler process handed over {len(fds)} descriptors for {len(names)} names, "
                           f"missing {', '.join(missing) or 'none'} ({how})")
    return got


# -- child side ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _stderr_kept() -> Iterator[Callable[[], list[str]]]:
    """Point fd 2 at a temporary file for the body; yields a reader of what was written there."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as err:
        os.dup2(err.fileno(), 2)

        def lines() -> list[str]:
            err.seek(0)
            return err.read().decode(errors="replace").strip().splitlines()

        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _first_error(lines: Sequence[str]) -> str:
    return next((ln for ln in lines if "error" in ln), lines[0] if lines else "")


def _quiet_compile(bpf_cls: Any, source: str, cflags: list[str]) -> Any:
    """Compile with bcc, keeping clang's stderr chatter out; on failure the first error line joins the message."""
    with _stderr_kept() as lines:
        try:
            return bpf_cls(src_file=source.encode(), cflags=cflags)
        except Exception as e:
            raise RuntimeError(f"{e}: {_first_error(lines())}") from None


def _quietly(fn: Callable[[], T]) -> T:
    """Run fn with fd 2 kept aside (a verifier log); on failure its last line joins the message."""
    with _stderr_kept() as lines:
        try:
            return fn()
        except Exception as e:
            detail = [ln for ln in lines() if ln.strip()]
            raise RuntimeError(f"{e}: {detail[-1]}" if detail else str(e)) from None


def build(max_entries: int, features: Sequence[str] = ()) -> tuple[dict[str, Any], list[int]]:
    """Compile and load; the header and the descriptors to send. Raises CompileError (one line)."""
    from xdp import headers

    try:
        found = headers.find()
    except headers.HeadersNotFound as e:
        raise CompileError(str(e)) from None
    try:
        from bcc import BPF
    except ImportError:
        raise CompileError(BCC_MISSING) from None
    except OSError as e:  # the module is there, libbcc.so is not
        raise CompileError(f"{BCC_MISSING}: {e}") from None
    cflags = [f"-I{HERE}", f"-DXDPFLOW_MAX_ENTRIES={max_entries}", *feature_flags(features), "-w", *found.cflags]
    try:
        with found.applied():
            bpf = _quiet_compile(BPF, SOURCE, cflags)
        fn = bpf.load_func(XDP_PROG.encode(), BPF.XDP)
        clock = bpf.load_func(CLOCK_PROG.encode(), BPF.XDP)
    except Exception as e:  # bcc raises bare Exception for every failure
        msg = str(e)
        if "privileges" in msg or "Operation not permitted" in msg:
            raise CompileError(PRIVILEGES) from None
        raise CompileError(f"could not compile or load xdp/flow.c with {found.description}: {msg}") from None
    fds = {XDP_PROG: fn.fd, CLOCK_PROG: clock.fd}
    header: dict[str, Any] = {"headers": found.description}
    try:
        fds[EGRESS_PROG] = _quietly(lambda: bpf.load_func(EGRESS_PROG.encode(), BPF.SCHED_CLS).fd)
    except Exception as e:  # reported when egress is asked for, not before
        header["egress_error"] = f"could not load the egress program {EGRESS_PROG}: {e}"
    for name in MAPS:
        fds[name] = bpf[name.encode()].map_fd
    header["names"] = list(fds)
    return header, list(fds.values())


def _die_with_parent() -> None:
    """SIGKILL when the parent goes: nothing keeps compiling for no one."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xdp.compile",
                                description="Compile and load xdp/flow.c; send the descriptors over --socket.")
    p.add_argument("--socket", type=int, required=True, help="fd of a connected AF_UNIX SOCK_SEQPACKET socket")
    p.add_argument("--max-entries", type=int, required=True)
    p.add_argument("--feature", action="append", default=[], choices=sorted(FEATURES))
    args = p.parse_args(argv)
    _die_with_parent()
    sock = socket.socket(fileno=args.socket)
    try:
        header, fds = build(args.max_entries, args.feature)
    except CompileError as e:
        header, fds = {"error": str(e)}, []
    try:
        socket.send_fds(sock, [json.dumps(header).encode()], fds)
    except OSError:  # the parent is gone: what was loaded goes with our descriptors
        os._exit(1)
    sys.stderr.flush()
    os._exit(0)   # skip bcc's and LLVM's teardown: the kernel closes our copies of the descriptors


if __name__ == "__main__":
    sys.exit(main())
