"""``istio-ebpf bench``: direct / iptables / ebpf / ebpf-sockmap / explicit, side by side.

:mod:`.topology` builds one client and one server pod per variant on a harness Node,
:mod:`.wrk` drives wrk inside a pod, :mod:`.runner` interleaves rounds and aggregates
(JSON schema in its docstring), :mod:`.report` prints the table and draws the PNG.
"""
