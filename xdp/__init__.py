"""The kernel side of xdpflow: the XDP program (flow.c, flow.h) and its loader.

`headers` finds kernel headers for bcc, `bpfsys` wraps the few bpf(2) commands
bcc's Python binding lacks (batch map reads, PROG_TEST_RUN), `loader` compiles
the program, owns its maps and attaches it to interfaces.
"""
