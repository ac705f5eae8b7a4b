"""Test doubles and helpers shared by the test files (imported as ``support.<module>``).

Doubles of the product's seams (mypy-checked against them): ``fake_kube`` (kube_api.KubeBackend),
``recording_datapath`` (agent.reconcile.DatapathLike), ``fake_maps`` (datapath.pod_entries.MapAccess).
The rest are helpers: where the fixtures are (``istio_fixtures``), what this kernel can run
(``datapath_modes``, ``kernel_expectations``), the real control plane (``kube_cluster``), the node e2e
(``node_scenario``, ``node_lab_plugin``), the wheel (``ship_support``), hardening (``hardening_support``),
the agent at scale (``agent_scale``), Istio's strategic merge, Go templates and istio-cni rules
(``strategic_merge``, ``install_gorender``, ``istio_cni_rules``), and ``polling``.
"""
