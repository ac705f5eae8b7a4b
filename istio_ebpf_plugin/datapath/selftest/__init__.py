"""The sockmap start-up self-test and what it runs on.

``sockmap_check`` (the suite and :func:`~.sockmap_check.self_test`), its two pod programs
(``sockmap_server.py``, ``sockmap_client.py``, run as scripts in the pods), the two local pods
it needs (``topology.py``) and the real Envoy between them (``envoy.py``). The lab builds its
bridged pods and its benchmark Envoy from the same ``topology`` and ``envoy``.
"""
