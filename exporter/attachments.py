"""Which interfaces the datapath meters: the configured names and globs against the links present.

At start every interface named outright (no glob) is attached, and a failure there stops the start
with its one-line reason (`attach_named`). After that `reconcile()` runs on every link change,
every SIGHUP and every scan: it releases what went away or is no longer configured, attaches what
matches now (a failure is a warning: the interface is retried at the next change), adds the egress
hook to every interface XDP meters when egress is on, and rebuilds the filter rule set when rules
name interfaces whose index changed. It returns what template 264 names (ifindex, name, alias).
The caller serialises it against other datapath changes.
"""

from __future__ import annotations

import structlog

from exporter.config import Config
from exporter.interfaces import alias, matching, present
from exporter.ipfix.options import Interface
from xdp import filters
from xdp.loader import Datapath, LoaderError

log = structlog.get_logger("xdpflow.service")


def attach_named(dp: Datapath, cfg: Config) -> None:
    """Attach every interface the configuration names without a glob; LoaderError if one fails."""
    for ifname in cfg.interfaces:
        if not filters.is_glob(ifname):
            dp.attach(ifname, cfg.mode)
            if cfg.egress:
                dp.attach_egress(ifname)


def reconcile(dp: Datapath, cfg: Config, announce: bool) -> tuple[Interface, ...]:
    """Make the attachments follow cfg.interfaces and the links present; `announce`: log each new one
    (after the start, whose own log line lists them)."""
    links = present()
    for eg in list(dp.egress_attachments):
        if links.get(eg.ifname) != eg.ifindex or not matching(cfg.interfaces, {eg.ifname: 0}):
            dp.detach_egress(eg)
    for att in list(dp.attachments):
        if links.get(att.ifname) != att.ifindex or not matching(cfg.interfaces, {att.ifname: 0}):
            dp.detach(att)
            log.info("interface released", interface=att.ifname,
                     reason="gone" if att.ifname not in links else "no longer configured")
    held = {a.ifname for a in dp.attachments}
    for ifname in sorted(set(matching(cfg.interfaces, links)) - held):
        try:
            att = dp.attach(ifname, cfg.mode)
        except LoaderError as e:
            log.warning("interface not attached", interface=ifname, error=str(e))
            continue
        if announce:
            log.info("interface attached", interface=ifname, mode=att.mode, ifindex=att.ifindex)
    if cfg.egress:
        _attach_egress(dp, links, announce)
    refresh_iface_rules(dp, links)
    return tuple(Interface(a.ifindex, a.ifname, alias(a.ifname))
                 for a in sorted(dp.attachments, key=lambda a: a.ifindex))


def _attach_egress(dp: Datapath, links: dict[str, int], announce: bool) -> None:
    """Egress on every interface XDP meters (so one that came back gets both hooks again)."""
    held = {e.ifname for e in dp.egress_attachments}
    for att in list(dp.attachments):
        if att.ifname in held or links.get(att.ifname) != att.ifindex:
            continue
        try:
            eg = dp.attach_egress(att.ifname)
        except LoaderError as e:
            log.warning("interface egress not attached", interface=att.ifname, error=str(e))
            continue
        if announce:
            log.info("interface egress attached", interface=att.ifname, method=eg.method, ifindex=eg.ifindex)


def refresh_iface_rules(dp: Datapath, links: dict[str, int]) -> None:
    """Filter rules name interfaces: when one comes, goes or changes index, rebuild the rule set."""
    if not filters.uses_iface_names(dp.tables.rules):
        return
    resolved, _ = filters.resolve_ifaces(dp.tables.rules, links)
    if resolved == dp.tables.iface_resolved:
        return
    dp.configure(filters.compile_rules(dp.tables.rules, links), dp.sampling)
    log.info("filter interfaces changed", interfaces={k: list(v) for k, v in resolved.items()})
