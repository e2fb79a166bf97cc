"""The bpf(2) commands bcc's Python binding does not offer, through ctypes.

- BPF_MAP_LOOKUP_BATCH / BPF_MAP_LOOKUP_AND_DELETE_BATCH straight into caller
  buffers (numpy arrays), a chunk of entries per syscall, not a ctypes object
  per entry;
- BPF_MAP_UPDATE_ELEM for the page flip (on an array-of-maps the kernel waits
  an RCU grace period before returning), BPF_MAP_DELETE_ELEM;
- BPF_PROG_TEST_RUN for parser tests and ns/packet benchmarks (with an
  optional context: struct __sk_buff for the TC program);
- BPF_LINK_CREATE for XDP and TCX (TC egress) links, BPF_PROG_QUERY and
  link info to see what is attached;
- object ids and BPF_{PROG,MAP}_GET_FD_BY_ID, to see whether a program or map
  still exists.

bpf_attr is built with struct.pack_into at the offsets of include/uapi/linux/bpf.h.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "armv7l": 386}

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_LOOKUP_AND_DELETE_BATCH = 25
BPF_MAP_UPDATE_BATCH = 26
BPF_LINK_CREATE = 28
# enum bpf_attach_type. The TCX values (kernel >= 6.6) are newer than the
# headers of some distributions: read from the running kernel's BTF
# (/sys/kernel/btf/vmlinux, enum bpf_attach_type) on 6.18; tests/kernel/test_egress.py
# checks them there again.
BPF_XDP = 37
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47

BPF_ANY = 0
BPF_NOEXIST = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_ATTR_SIZE = 128


class BpfError(OSError):
    pass


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"bpf(2) syscall number unknown on {platform.machine()}")
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(_ATTR_SIZE))
    if ret < 0:
        e = ctypes.get_errno()
        raise BpfError(e, os.strerror(e))
    return int(ret)


def _addr(buf: object) -> int:
    if buf is None:
        return 0
    if isinstance(buf, int):
        return buf
    iface = getattr(buf, "__array_interface__", None)
    if iface is not None:
        return int(iface["data"][0])
    return ctypes.addressof(buf)  # type: ignore[arg-type]


def map_update(map_fd: int, key: object, value: object, flags: int = BPF_ANY) -> None:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIQQQ", attr, 0, map_fd, 0, _addr(key), _addr(value), flags)
    _bpf(BPF_MAP_UPDATE_ELEM, attr)


def _found(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> bool:
    """Run an element command; False where the key is absent (ENOENT)."""
    try:
        _bpf(cmd, attr)
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_lookup(map_fd: int, key: object, value: object) -> bool:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIQQQ", attr, 0, map_fd, 0, _addr(key), _addr(value), 0)
    return _found(BPF_MAP_LOOKUP_ELEM, attr)


def map_delete(map_fd: int, key: object) -> bool:
    """Delete one entry; False if there was none."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIQ", attr, 0, map_fd, 0, _addr(key))
    return _found(BPF_MAP_DELETE_ELEM, attr)


def map_update_batch(map_fd: int, keys: Any, values: Any, count: int) -> int:
    """Insert `count` entries from caller buffers (benchmarks and tests fill maps this way)."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=QQQQIIQQ", attr, 0, 0, 0, _addr(keys), _addr(values), count, map_fd, 0, 0)
    _bpf(BPF_MAP_UPDATE_BATCH, attr)
    return int(struct.unpack_from("=I", attr, 32)[0])


@dataclass(frozen=True)
class TestRun:
    retval: int          # as the kernel's u32: TC_ACT_UNSPEC (-1) reads 0xFFFFFFFF
    duration_ns: int
    data_out: bytes
    ctx_out: bytes = b""


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1, out_size: int | None = None,
                  ctx: bytes | None = None) -> TestRun:
    """Run a loaded XDP or TC (sched_cls) program on `data` `repeat` times (BPF_PROG_TEST_RUN).

    duration_ns is the kernel's mean per run. Without a context the frame
    arrives on the loopback device of the caller's network namespace. `ctx`:
    the program's context in (struct xdp_md / struct __sk_buff, see
    SkbContext); the kernel accepts only some fields non-zero, and writes the
    context back into ctx_out.
    """
    din = ctypes.create_string_buffer(data, len(data))
    size_out = out_size if out_size is not None else len(data) + 256
    dout = ctypes.create_string_buffer(max(size_out, 1))
    cin = ctypes.create_string_buffer(ctx, len(ctx)) if ctx else None
    cout = ctypes.create_string_buffer(len(ctx)) if ctx else None
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIIIQQIIIIQQ", attr, 0, prog_fd, 0, len(data), size_out,
                     ctypes.addressof(din), ctypes.addressof(dout), repeat, 0,
                     len(ctx) if ctx else 0, len(ctx) if ctx else 0,
                     ctypes.addressof(cin) if cin is not None else 0,
                     ctypes.addressof(cout) if cout is not None else 0)
    _bpf(BPF_PROG_TEST_RUN, attr)
    retval, _, data_size_out = struct.unpack_from("=III", attr, 4)
    duration = struct.unpack_from("=I", attr, 36)[0]
    ctx_size_out = struct.unpack_from("=I", attr, 44)[0]
    ctx_out = cout.raw[:ctx_size_out] if cout is not None else b""
    return TestRun(retval, duration, dout.raw[: min(data_size_out, size_out)], ctx_out)


@dataclass(frozen=True)
class SkbContext:
    """The fields of struct __sk_buff (include/uapi/linux/bpf.h) a sched_cls test run takes.

    ifindex: the device the skb is on (0: loopback); gso_segs / gso_size make
    the frame look like a GSO packet; wire_len 0 means the frame's length.
    """

    ifindex: int = 0
    gso_segs: int = 0
    gso_size: int = 0
    wire_len: int = 0

    SIZE = 192           # sizeof(struct __sk_buff) up to hwtstamp (kernel 6.1 headers); a prefix is accepted
    _IFINDEX = 40
    _WIRE_LEN = 160
    _GSO_SEGS = 164
    _GSO_SIZE = 176

    def pack(self) -> bytes:
        buf = bytearray(self.SIZE)
        struct.pack_into("=I", buf, self._IFINDEX, self.ifindex)
        struct.pack_into("=I", buf, self._WIRE_LEN, self.wire_len)
        struct.pack_into("=I", buf, self._GSO_SEGS, self.gso_segs)
        struct.pack_into("=I", buf, self._GSO_SIZE, self.gso_size)
        return bytes(buf)


def xdp_link_create(prog_fd: int, ifindex: int, flags: int) -> int:
    """Attach an XDP program to `ifindex` (of the caller's network namespace) through a bpf_link.

    The attachment lives exactly as long as the returned fd: closing it, or
    the process dying in any way (SIGKILL included), detaches the program.
    The kernel refuses (EBUSY/EEXIST) when the interface already has an XDP
    program, so a foreign program is never replaced.
    """
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIII", attr, 0, prog_fd, ifindex, BPF_XDP, flags)
    return _bpf(BPF_LINK_CREATE, attr)


def tcx_link_create(prog_fd: int, ifindex: int, attach_type: int = BPF_TCX_EGRESS) -> int:
    """Attach a sched_cls program to `ifindex`'s TCX egress (or ingress) hook through a bpf_link.

    Kernel >= 6.6 (older kernels: EINVAL, the attach type is unknown). Like
    the XDP link, the attachment lives exactly as long as the returned fd.
    TCX holds several programs per hook; with no flags this one is appended,
    so programs attached earlier run before it and keep their place.
    """
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIII", attr, 0, prog_fd, ifindex, attach_type, 0)
    return _bpf(BPF_LINK_CREATE, attr)


def prog_query(ifindex: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to `ifindex` (of the caller's network namespace) at `attach_type`.

    For TCX hooks (kernel >= 6.6); an interface with none gives [].
    """
    ids = (ctypes.c_uint32 * 64)()
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIIIQI", attr, 0, ifindex, attach_type, 0, 0, ctypes.addressof(ids), len(ids))
    _bpf(BPF_PROG_QUERY, attr)
    count = struct.unpack_from("=I", attr, 24)[0]
    return [int(ids[i]) for i in range(min(count, len(ids)))]


@dataclass(frozen=True)
class LinkInfo:
    type: int            # enum bpf_link_type (BPF_LINK_TYPE_XDP 6, BPF_LINK_TYPE_TCX 11)
    id: int
    prog_id: int
    ifindex: int         # XDP and TCX links
    attach_type: int     # TCX links (0 for XDP links)


def link_info(link_fd: int) -> LinkInfo:
    """struct bpf_link_info of a link fd (BPF_OBJ_GET_INFO_BY_FD)."""
    info = ctypes.create_string_buffer(64)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIQ", attr, 0, link_fd, len(info), ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    kind, ident, prog = struct.unpack_from("=III", info, 0)
    ifindex, attach_type = struct.unpack_from("=II", info, 16)  # the union is 8-byte aligned
    return LinkInfo(kind, ident, prog, ifindex, attach_type)


def prog_id(prog_fd: int) -> int:
    """The kernel's id of a loaded program (bpf_prog_info.id); of a map too (bpf_map_info.id, same offset)."""
    info = ctypes.create_string_buffer(256)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIQ", attr, 0, prog_fd, len(info), ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return int(struct.unpack_from("=I", info, 4)[0])


map_id = prog_id


def exists(obj_id: int, is_map: bool = False) -> bool:
    """Whether the program (or map) with this id is still in the kernel (GET_FD_BY_ID, fd closed at once)."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=I", attr, 0, obj_id)
    try:
        fd = _bpf(BPF_MAP_GET_FD_BY_ID if is_map else BPF_PROG_GET_FD_BY_ID, attr)
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    os.close(fd)
    return True


def map_batch_chunks(map_fd: int, keys: Any, values: Any, delete: bool) -> Iterator[int]:
    """Read (and delete) the whole map a buffer-full at a time: fills `keys`/`values` from index 0 and
    yields the count, again until the map has been walked. Consume each chunk before asking for the next.

    The kernel resumes from an opaque bucket token, so the buffers need only hold the largest
    bucket, not the map: memory stays O(buffer) whatever max_entries and the CPU count are.
    """
    cmd = BPF_MAP_LOOKUP_AND_DELETE_BATCH if delete else BPF_MAP_LOOKUP_BATCH
    capacity = len(keys)
    in_token, out_token = ctypes.create_string_buffer(8), ctypes.create_string_buffer(8)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    first = True
    while True:
        struct.pack_into("=QQQQIIQQ", attr, 0, 0 if first else ctypes.addressof(in_token),
                         ctypes.addressof(out_token), _addr(keys), _addr(values), capacity, map_fd, 0, 0)
        try:
            _bpf(cmd, attr)
            done = False
        except BpfError as e:
            if e.errno != errno.ENOENT:
                raise
            done = True
        n = struct.unpack_from("=I", attr, 32)[0]
        if n:
            yield n
        if done:
            return
        ctypes.memmove(in_token, out_token, 8)
        first = False
