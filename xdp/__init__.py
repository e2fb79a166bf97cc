"""The kernel side of xdpflow: the XDP program (flow.c, flow.h) and its loader.

`headers` finds kernel headers for bcc, `compile` compiles and loads the
program with bcc in a short-lived child process and hands over its file
descriptors, `bpfsys` wraps the bpf(2) commands everything after that uses
(map reads and writes, batch drains, PROG_TEST_RUN, links), `loader` owns the
programs and maps (`Datapath`), `rules` writes the filter and sampling rule sets
into them, `attach` binds the programs to interfaces (XDP, TCX, clsact), `layout`
mirrors flow.h in numpy, `sizing` holds the defaults and `filters` compiles rules.
"""
