"""Default sizes of the kernel side, defined once: every command, the config file and the loader
take them from here.

500,000 flow entries per page follow Skydive's eBPF probe; the loader refuses to create maps that
would need more kernel memory than the budget (1 GiB; the formula is Datapath.memory_bytes).
No imports, so that `xdpflow --help` stays light.
"""

DEFAULT_MAX_ENTRIES = 500_000
DEFAULT_MEMORY_BUDGET = 1 << 30
