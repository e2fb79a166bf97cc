"""The collector side of xdpflow.

``decoder``: a sans-IO RFC 7011 decoder (templates, options, variable-length and enterprise
fields, sequence gaps, hostile input counted rather than raised). ``server``: the asyncio UDP
collector around it (``Collector``), used in-process by tests. ``cli``: ``xdpflow collect``.
``external``: launchers for real collectors used by interop tests.
"""
