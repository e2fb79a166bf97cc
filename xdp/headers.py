"""Find kernel headers for bcc on kernels that ship none of their own.

bcc compiles the XDP program with clang against kernel headers. It looks at
`BCC_KERNEL_SOURCE`, then `/lib/modules/$(uname -r)/{build,source}`. Cloud and
custom kernels often have neither; the distribution's generic header package
(Debian `linux-headers-amd64`, Ubuntu `linux-headers-generic`) is then good
enough, because an XDP program only needs the UAPI and basic type headers.

Debian splits those headers in two trees: `linux-headers-V-common` (the
source headers) and `linux-headers-V-ARCH` (generated files: autoconf.h,
version.h). bcc's BCC_KERNEL_SOURCE takes one tree, so we point it at the
common tree and add the generated directories of the arch tree as extra -I
flags. Nothing on disk is changed.
"""

from __future__ import annotations

import glob
import os
import platform
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

KCONFIG = "include/linux/kconfig.h"
AUTOCONF = "include/generated/autoconf.h"

_DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armmp", "ppc64le": "powerpc64le",
             "s390x": "s390x"}
_KARCH = {"x86_64": "x86", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "powerpc",
          "s390x": "s390"}


class HeadersNotFound(RuntimeError):
    """No usable kernel headers; the message names the package to install."""


@dataclass(frozen=True)
class KernelHeaders:
    """Where bcc should look: an env value (or None: bcc's default) and extra cflags."""

    source: str | None
    cflags: tuple[str, ...]
    description: str

    @contextmanager
    def applied(self) -> Iterator[None]:
        """BCC_KERNEL_SOURCE set for the duration of a compile, then restored.

        Restoring matters: a second compile in the same process must search
        again, not mistake our own setting for the operator's."""
        if self.source is None:
            yield
            return
        saved = os.environ.get("BCC_KERNEL_SOURCE")
        os.environ["BCC_KERNEL_SOURCE"] = self.source
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("BCC_KERNEL_SOURCE", None)
            else:
                os.environ["BCC_KERNEL_SOURCE"] = saved


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", os.path.basename(path)))


def _generated_flags(build: str, karch: str) -> tuple[str, ...]:
    dirs = [f"{build}/arch/{karch}/include/generated", f"{build}/arch/{karch}/include/generated/uapi",
            f"{build}/include", f"{build}/include/generated/uapi"]
    return tuple(f"-I{d}" for d in dirs if os.path.isdir(d))


def install_hint() -> str:
    dist = ""
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            dist = f.read().lower()
    except OSError:
        pass
    deb_arch = _DEB_ARCH.get(platform.machine(), "amd64")
    if "ubuntu" in dist:
        return "apt-get install linux-headers-generic"
    if "debian" in dist:
        return f"apt-get install linux-headers-{deb_arch}"
    return "install your distribution's kernel headers package"


def find(release: str | None = None, modules: str = "/lib/modules", usr_src: str = "/usr/src",
         environ: dict[str, str] | None = None) -> KernelHeaders:
    """Choose headers for bcc, or raise HeadersNotFound with a one-line fix."""
    env = os.environ if environ is None else environ
    release = release or platform.release()
    machine = platform.machine()
    karch = _KARCH.get(machine, machine)

    explicit = env.get("BCC_KERNEL_SOURCE")
    if explicit:
        if os.path.isfile(os.path.join(explicit, KCONFIG)):
            return KernelHeaders(explicit, (), f"BCC_KERNEL_SOURCE={explicit}")
        raise HeadersNotFound(f"BCC_KERNEL_SOURCE={explicit} holds no {KCONFIG}; "
                              "unset it or point it at a kernel header tree")

    own = os.path.join(modules, release)
    for sub in ("build", "source"):
        if os.path.isfile(os.path.join(own, sub, KCONFIG)):
            return KernelHeaders(None, (), f"{own}/{sub} (running kernel)")

    deb_arch = _DEB_ARCH.get(machine, machine)
    commons = sorted(glob.glob(os.path.join(usr_src, "linux-headers-*-common")), key=_version_key, reverse=True)
    for common in commons:
        if not os.path.isfile(os.path.join(common, KCONFIG)):
            continue
        build = common[: -len("-common")] + f"-{deb_arch}"
        if os.path.isfile(os.path.join(build, AUTOCONF)):
            return KernelHeaders(common, _generated_flags(build, karch),
                                 f"{common} + {build} (distribution headers, not the running kernel's)")

    # Ubuntu-style and single-tree installs: one directory with both parts.
    singles = sorted(glob.glob(os.path.join(usr_src, "linux-headers-*")), key=_version_key, reverse=True)
    for tree in singles:
        if os.path.isfile(os.path.join(tree, KCONFIG)) and os.path.isfile(os.path.join(tree, AUTOCONF)):
            return KernelHeaders(tree, (), f"{tree} (distribution headers, not the running kernel's)")

    raise HeadersNotFound(
        f"no kernel headers found for kernel {release} (looked in {own}/build, {own}/source and "
        f"{usr_src}/linux-headers-*): {install_hint()}, or set BCC_KERNEL_SOURCE")
