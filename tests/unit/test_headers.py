"""Kernel header discovery for bcc: running kernel's, Debian's split trees, explicit, none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xdp import headers


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")


def test_running_kernel_headers_win(tmp_path: Path) -> None:
    touch(tmp_path / "modules/6.18.0-x/build" / headers.KCONFIG)
    found = headers.find("6.18.0-x", modules=str(tmp_path / "modules"), usr_src=str(tmp_path / "src"), environ={})
    assert found.source is None
    assert "running kernel" in found.description


def test_debian_split_trees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(headers.platform, "machine", lambda: "x86_64")
    src = tmp_path / "src"
    for v in ("6.1.0-10", "6.1.0-56"):
        touch(src / f"linux-headers-{v}-common" / headers.KCONFIG)
        touch(src / f"linux-headers-{v}-amd64" / headers.AUTOCONF)
        (src / f"linux-headers-{v}-amd64/arch/x86/include/generated").mkdir(parents=True)
    found = headers.find("6.18.0-x", modules=str(tmp_path / "none"), usr_src=str(src), environ={})
    assert found.source == str(src / "linux-headers-6.1.0-56-common"), "newest version first"
    assert f"-I{src}/linux-headers-6.1.0-56-amd64/include" in found.cflags
    assert f"-I{src}/linux-headers-6.1.0-56-amd64/arch/x86/include/generated" in found.cflags


def test_common_tree_without_arch_tree_is_not_enough(tmp_path: Path) -> None:
    touch(tmp_path / "src/linux-headers-6.1.0-56-common" / headers.KCONFIG)
    with pytest.raises(headers.HeadersNotFound):
        headers.find("6.18.0-x", modules=str(tmp_path), usr_src=str(tmp_path / "src"), environ={})


def test_no_headers_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(headers.HeadersNotFound) as e:
        headers.find("6.18.0-x", modules=str(tmp_path), usr_src=str(tmp_path), environ={})
    msg = str(e.value)
    assert "\n" not in msg
    assert "linux-headers" in msg or "headers package" in msg
    assert "6.18.0-x" in msg


def test_explicit_env_is_checked(tmp_path: Path) -> None:
    with pytest.raises(headers.HeadersNotFound, match="BCC_KERNEL_SOURCE"):
        headers.find("x", modules=str(tmp_path), usr_src=str(tmp_path), environ={"BCC_KERNEL_SOURCE": str(tmp_path)})
    touch(tmp_path / headers.KCONFIG)
    found = headers.find("x", modules=str(tmp_path), usr_src=str(tmp_path),
                         environ={"BCC_KERNEL_SOURCE": str(tmp_path)})
    assert found.source == str(tmp_path)


def test_this_machine_has_usable_headers() -> None:
    """On the CI machine (kernel without its own headers) the setup's package must be found."""
    found = headers.find()
    assert found.source is None or os.path.isfile(os.path.join(found.source, headers.KCONFIG))
