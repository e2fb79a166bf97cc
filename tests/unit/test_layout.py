"""xdp/flow.h and xdp/layout.py agree on every size and offset.

A tiny C program that includes flow.h is compiled with gcc and prints sizeof,
alignment and, for every field the numpy dtype names, offsetof and sizeof.
The dtypes must match exactly, and the fields they name must tile the C
struct with no implicit hole (so no C field is missing from the dtype).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from xdp.layout import EGRESS, FLOW_VALUE, INGRESS, STRUCTS

ROOT = Path(__file__).resolve().parents[2]
XDP_DIR = ROOT / "xdp"

# (struct, field) -> (offset, size); (struct, None) -> (sizeof, alignof)
Layout = dict[tuple[str, str | None], tuple[int, int]]


def _paths(dtype: np.dtype[np.void], prefix: str = "") -> list[str]:
    """Every field, nested ones as dotted member designators (key.src_addr), parents before children."""
    out = []
    for name in dtype.names or ():
        sub = dtype.fields[name][0]  # type: ignore[index]
        out.append(prefix + name)
        if sub.names:
            out += _paths(sub, prefix + name + ".")
    return out


def _program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        '#include "flow.h"',
        "int main(void) {",
    ]
    for struct_name, dtype in STRUCTS.items():
        lines.append(f'  printf("{struct_name} - %zu %zu\\n", sizeof(struct {struct_name}), '
                     f"_Alignof(struct {struct_name}));")
        for name in _paths(dtype):
            lines.append(f'  printf("{struct_name} {name} %zu %zu\\n", offsetof(struct {struct_name}, {name}), '
                         f"sizeof(((struct {struct_name} *)0)->{name}));")
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (apt-get install gcc libc6-dev)")
    work = tmp_path_factory.mktemp("layout")
    src, exe = work / "layout.c", work / "layout"
    src.write_text(_program(), encoding="ascii")
    build = subprocess.run([gcc, "-std=c11", "-Wall", "-Wextra", "-Werror", f"-I{XDP_DIR}", "-o", str(exe), str(src)],
                           capture_output=True, text=True, check=False)
    # A field the dtype names but flow.h lacks fails here, with gcc's message.
    assert build.returncode == 0, f"compiling flow.h failed:\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True, env=dict(os.environ, LC_ALL="C"))
    out: Layout = {}
    for line in run.stdout.splitlines():
        struct_name, field, a, b = line.split()
        out[(struct_name, None if field == "-" else field)] = (int(a), int(b))
    return out


@pytest.mark.parametrize("struct_name", list(STRUCTS))
def test_struct_size_matches(c_layout: Layout, struct_name: str) -> None:
    size, _ = c_layout[(struct_name, None)]
    assert STRUCTS[struct_name].itemsize == size


@pytest.mark.parametrize("struct_name", list(STRUCTS))
def test_field_offsets_and_sizes_match(c_layout: Layout, struct_name: str) -> None:
    def check(dtype: np.dtype[np.void], prefix: str, base: int) -> None:
        for name in dtype.names or ():
            sub, offset = dtype.fields[name][:2]  # type: ignore[index]
            path = prefix + name
            assert c_layout[(struct_name, path)] == (base + offset, sub.itemsize), f"struct {struct_name}.{path}"
            if sub.names:
                check(sub, path + ".", base + offset)

    check(STRUCTS[struct_name], "", 0)


@pytest.mark.parametrize("struct_name", list(STRUCTS))
def test_fields_tile_the_struct(c_layout: Layout, struct_name: str) -> None:
    """Fields in order, each starting where the previous ended, ending at sizeof: no hole, nothing unnamed."""
    dtype = STRUCTS[struct_name]
    end = 0
    for name in dtype.names or ():
        offset, size = c_layout[(struct_name, name)]
        assert offset == end, f"struct {struct_name}: hole or reorder before {name} (offset {offset}, expected {end})"
        end = offset + size
    assert end == c_layout[(struct_name, None)][0], f"struct {struct_name}: bytes after the last named field"


def test_value_size_is_a_multiple_of_8(c_layout: Layout) -> None:
    """bcc requires per-CPU leaves sized in multiples of 8; the batch drain strides by it."""
    size, align = c_layout[("flow_value", None)]
    assert size % 8 == 0
    assert FLOW_VALUE.itemsize % 8 == 0
    assert align == 8


@pytest.mark.parametrize("struct_name", list(STRUCTS))
def test_multibyte_fields_are_host_order(struct_name: str) -> None:
    """The kernel writes host byte order; the dtypes must read it that way on this machine."""
    def check(dtype: np.dtype[np.void], where: str) -> None:
        for name in dtype.names or ():
            sub = dtype.fields[name][0]  # type: ignore[index]
            if sub.names:
                check(sub, f"{where}.{name}")
            else:
                assert sub.base.itemsize == 1 or sub.base.isnative, f"{where}.{name} is {sub.base.str}"

    check(STRUCTS[struct_name], struct_name)


def test_direction_values_match_flow_h() -> None:
    """flow_key.direction: the header's XDPFLOW_INGRESS / XDPFLOW_EGRESS are layout.INGRESS / EGRESS."""
    text = (XDP_DIR / "flow.h").read_text(encoding="ascii")
    defines = dict(re.findall(r"#define\s+(XDPFLOW_\w+)\s+(\d+)", text))
    assert (int(defines["XDPFLOW_INGRESS"]), int(defines["XDPFLOW_EGRESS"])) == (INGRESS, EGRESS) == (0, 1)


def test_dtypes_are_plain_structs() -> None:
    def check(dtype: np.dtype[np.void], where: str) -> None:
        assert dtype.names, where
        assert not dtype.hasobject
        for name in dtype.names:
            sub = dtype.fields[name][0]  # type: ignore[index]
            if sub.names:
                check(sub, f"{where}.{name}")
            else:
                assert np.issubdtype(sub.base, np.unsignedinteger), f"{where}.{name}"

    for struct_name, dtype in STRUCTS.items():
        check(dtype, struct_name)


def test_slot_is_key_then_value() -> None:
    """The mapped slot array is read as FLOW_SLOT; the C core reads the same bytes by offset."""
    from xdp.layout import FLOW_KEY, FLOW_SLOT

    assert FLOW_SLOT.itemsize == FLOW_KEY.itemsize + FLOW_VALUE.itemsize
    assert FLOW_SLOT.itemsize % 8 == 0
