"""Hook specifications of the istio-ebpf install flow (installed as ``istio_ebpf_plugin.hookspecs``)."""
