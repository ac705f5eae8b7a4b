"""Where the tests find things: the checkout and the shared Istio reference data.

``../shared/fixtures/istio/`` (beside the clone) holds real Istio injection templates,
chart values/templates, injected pod specs, iptables goldens and full istiod charts;
its README names the sources.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "istio"
#: An ``istioctl manifest generate`` output of istiod (master): the render input of several tests.
PILOT_GOLDEN = FIXTURES / "master" / "manifest-generate" / "output" / "pilot_default.golden.yaml"
