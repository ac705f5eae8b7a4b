"""A strategic-merge-patch applier for the subset of Pod fields injection templates touch.

Istio merges each rendered template onto the pod with Kubernetes' strategic
merge. We reproduce the rules that matter for pod specs so tests (and
``status``) can predict the injected pod without a cluster:

* maps merge key by key; a ``null`` value deletes the key;
* lists with a merge key (containers by ``name``, volumeMounts by
  ``mountPath``, ...) merge item by item; new items are appended; an item
  ``{name: x, $patch: delete}`` removes ``x``;
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
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise ValueError(f"list item without merge key {key!r}: {item!r}")
        directive = item.get("$patch")
        idx = next((i for i, cur in enumerate(result) if isinstance(cur, dict) and cur.get(key) == item[key]), None)
        if directive == "delete":
            if idx is not None:
                del result[idx]
            continue
        if directive not in (None, "merge"):
            raise ValueError(f"unsupported list directive $patch: {directive}")
        body = {k: v for k, v in item.items() if k != "$patch"}
        if idx is None:
            result.append(merge({}, body))
        else:
            result[idx] = merge(result[idx], body)
    return result


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
