"""Lifecycle of `xdpflow run` in a namespace: hotplugged interfaces, SIGTERM flush."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import xdp_attached
from tools import trafgen
from tools.netns import VethPair, ip
from tools.packets import UDP, Flow


@pytest.mark.kernel
def test_hotplugged_interfaces_are_attached_and_released(veth: VethPair, xdpflow_proc: Any) -> None:
    glob = "xh" + veth.obs_if[2:6] + "*"
    new_obs, new_gen = ("xh" + veth.obs_if[2:])[:15], ("xi" + veth.gen_if[2:])[:15]
    p = xdpflow_proc(veth.obs, "run", "--interface", veth.obs_if, "--interface", glob,
                     "--collector", "127.0.0.1:4739", "--scan-interval", "0.5", "--max-entries", "4096",
                     "--log-level", "debug")
    p.wait_ready()
    assert xdp_attached(veth.obs, veth.obs_if)
    with open(f"/proc/{p.popen.pid}/maps", encoding="utf-8") as f:
        mapped = {ln.split()[-1] for ln in f if len(ln.split()) >= 6}
    assert not [m for m in mapped if "libLLVM" in m or "libbcc" in m or "libclang" in m], \
        "the exporter keeps the compiler mapped: bcc belongs in the compiler child (xdp.compile)"
    ip("link", "add", new_gen, "netns", veth.gen, "type", "veth", "peer", "name", new_obs, "netns", veth.obs,
       netns=veth.gen)
    ip("link", "set", new_obs, "up", netns=veth.obs)
    ip("link", "set", new_gen, "up", netns=veth.gen)
    attached = p.wait_for("interface attached", timeout=15)
    assert attached["interface"] == new_obs
    assert xdp_attached(veth.obs, new_obs)

    flow = Flow("hot", "198.18.7.1", "198.19.7.1", UDP, 7, 7, count=25)
    trafgen.send_flows(veth.gen, new_gen, [flow])
    p.wait_for("scan", count=4)
    ip("link", "del", new_obs, netns=veth.obs)
    released = p.wait_for("interface released", timeout=15)
    assert released["interface"] == new_obs and released["reason"] == "gone"
    assert p.popen.poll() is None, "the exporter died when an interface went away"
    assert xdp_attached(veth.obs, veth.obs_if), "the other interface lost its program"
    rc, _ = p.stop()
    assert rc == 0
    assert p.events("stopped")[0]["observed_packets"] == 25
