"""Default sizes of the kernel side, defined once: every command, the config file and the loader
take them from here, and the one way sizes are written for people.

500,000 flow entries per page follow Skydive's eBPF probe; the loader refuses to create maps that
would need more kernel memory than the budget (1 GiB; the formula is Datapath.memory_bytes).
No imports, so that `xdpflow --help` stays light.
"""

DEFAULT_MAX_ENTRIES = 500_000
DEFAULT_MEMORY_BUDGET = 1 << 30


def human_bytes(n: int) -> str:
    """"512 B", "1.5 MiB", "1.0 GiB": binary units, one decimal, GiB at most; a form the config's
    size parser (exporter.config.parse_size) also reads."""
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
