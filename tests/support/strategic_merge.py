"""A strategic-merge-patch applier for the subset of Pod fields injection templates touch.

Istio merges each rendered template onto the pod with Kubernetes' strategic
merge. We reproduce the rules that matter for pod specs so tests (and
``status``) can predict the injected pod without a cluster:

* maps merge key by key; a ``null`` value deletes the key;
* lists with a merge key (containers by ``name``, volumeMounts by
  ``mountPath``, ...) merge item by item; an item ``{name: x, $patch: delete}``
  removes ``x``; the result is ordered as apimachinery's ``normalizeElementOrder``
  does (``pkg/util/strategicpatch/patch.go``): the patch's items in patch order,
  the pod's other items in their order, and where the two meet, a pod item goes
  first only when both were in the pod and it stood earlier. So items new to the
  pod come before the pod's remaining ones (checked against kubectl's own merge
  in tests/test_install_template.py);
* every other list is replaced as a whole (``nodeSelectorTerms``, ``args``).
"""

from __future__ import annotations

import copy
from typing import Any

# Pod fields whose lists merge by key (patchMergeKey in k8s.io/api/core/v1).
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "resourceClaims": "name",
    "readinessGates": "conditionType",
}


def _merge_list(original: list, patch: list, key: str) -> list:
    result = [copy.deepcopy(item) for item in original]
    bodies = []
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise ValueError(f"list item without merge key {key!r}: {item!r}")
        directive = item.get("$patch")
        if directive == "delete":
            result = [cur for cur in result if not (isinstance(cur, dict) and cur.get(key) == item[key])]
            continue
        if directive not in (None, "merge"):
            raise ValueError(f"unsupported list directive $patch: {directive}")
        bodies.append({k: v for k, v in item.items() if k != "$patch"})
    server_order = [cur.get(key) for cur in result]
    for body in bodies:
        idx = next((i for i, cur in enumerate(result) if isinstance(cur, dict) and cur.get(key) == body[key]), None)
        if idx is None:
            result.append(merge({}, body))
        else:
            result[idx] = merge(result[idx], body)
    patch_keys = [b[key] for b in bodies]
    from_patch = sorted((r for r in result if r.get(key) in patch_keys), key=lambda r: patch_keys.index(r.get(key)))
    server_only = [r for r in result if r.get(key) not in patch_keys]
    out: list = []
    while server_only or from_patch:
        if not from_patch or (server_only and server_only[0].get(key) in server_order
                              and from_patch[0].get(key) in server_order
                              and server_order.index(server_only[0].get(key))
                              < server_order.index(from_patch[0].get(key))):
            out.append(server_only.pop(0))
        else:
            out.append(from_patch.pop(0))
    return out


def merge(original: Any, patch: Any, field: str | None = None) -> Any:
    """``original`` with ``patch`` applied (neither argument is modified)."""
    if patch is None:
        return copy.deepcopy(original)
    if isinstance(patch, dict):
        directive = patch.get("$patch")
        if directive == "delete":
            return None
        if directive == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        base = copy.deepcopy(original) if isinstance(original, dict) else {}
        for key, value in patch.items():
            if key == "$patch":
                continue
            if value is None:
                base.pop(key, None)
                continue
            merged = merge(base.get(key), value, key)
            if merged is None and isinstance(value, dict) and value.get("$patch") == "delete":
                base.pop(key, None)
            else:
                base[key] = merged
        return base
    if isinstance(patch, list):
        if field in MERGE_KEYS and isinstance(original, list):
            return _merge_list(original, patch, MERGE_KEYS[field])
        if field in MERGE_KEYS:
            return _merge_list([], patch, MERGE_KEYS[field])
        return copy.deepcopy(patch)
    return copy.deepcopy(patch)
