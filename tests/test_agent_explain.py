"""``istio-ebpf explain`` through the real agent on lab pods, and the per-pod counters it exports.

The agent (NodeAgent with a FakeKube API, the real datapath on this kernel) answers ``/explain``
with its own datapath (``bpf/explain.c`` run with BPF_PROG_TEST_RUN over the pods' entries); the
command asks it like ``kubectl exec`` into the agent pod would. The answer must be the lab's for the
same pod (``harness/explain_table.ask`` on the same datapath) and what the connection then does,
and the pod's counters (``/pods``, ``/metrics``) must move by the rule the answer names.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re

import pytest

from istio_ebpf_plugin.cli import main as cli_main
from istio_ebpf_plugin.datapath.explain import Question
from istio_ebpf_plugin.harness.explain_table import ask
from istio_ebpf_plugin.harness.probe import start_probe_server
from support.fake_kube import FakeKube, fixture_pod
from support.lab_agent import NODE, lab_agent
from support.polling import wait_for

OPT_IN = {"istio-ebpf.io/redirect": "ebpf"}


def explain(capsys, url: str, *args: str) -> tuple[int, str, str]:
    code = cli_main(["explain", *args, "--agent", url])
    out, err = capsys.readouterr()
    return code, out, err


def pod_counters(url: str, name: str) -> dict[str, int]:
    from istio_ebpf_plugin.agent.pods_cli import fetch

    pod = next(p for p in fetch(url)["pods"] if p["name"] == name)
    return pod["counters"]


def metric(url: str, name: str, counter: str) -> float | None:
    import urllib.request

    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    m = re.search(r'^istio_ebpf_pod_datapath_total\{counter="%s",namespace="default",pod="%s"\} (\S+)$'
                  % (counter, name), text, re.M)
    return float(m.group(1)) if m else None


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["cookie", "podip"])
def test_explain_through_the_agent_is_the_kernels_answer(node, pin_root, monkeypatch, capsys, mode):
    cli, srv, usr, ext = (node.add_pod("cli"), node.add_pod("srv"), node.add_pod("usr", userns=True),
                          node.add_pod("ext"))
    servers = [start_probe_server(p, targets=(8080,)) for p in (cli, srv, usr, ext)]
    kube = FakeKube(NODE).install(monkeypatch)
    uids = {}
    for pod in (cli, srv, usr):
        obj = fixture_pod("master/inject/hello.yaml.injected", pod.name, NODE, list(pod.pod_ips), annotations=OPT_IN)
        if pod is usr:
            obj["spec"]["hostUsers"] = False
        kube.add(obj)
        uids[pod.name] = obj["metadata"]["uid"]
    try:
        with lab_agent(node, pin_root, mode, {uids[p.name]: str(p.cgroup_path) for p in (cli, srv, usr)}) as agent:
            url = f"http://127.0.0.1:{agent.server.port}"
            wait_for(lambda: set(uids.values()) <= set(agent.reconciler.records) and agent.view is not None
                     and all(t.handle is not None for t in agent.view.targets.values()), what="pods captured")
            handle = {name: agent.reconciler.records[uid].handle for name, uid in uids.items()}

            # outbound, as the command prints it and as JSON: the lab's answer on the same datapath
            code, out, err = explain(capsys, url, "default/cli", f"{srv.ipv4}:8080", "--uid", "1000")
            assert code == 0, err
            assert "captured      yes, to 127.0.0.1:15001 (Envoy's outbound listener)" in out
            assert f"original dst  {srv.ipv4}:8080" in out and "rule          out_captured_cidr: " in out
            code, out, _ = explain(capsys, url, "default/cli", f"{srv.ipv4}:8080", "--uid", "1000", "--json")
            got = json.loads(out)
            lab = ask(agent.datapath, cli, handle["cli"],
                      Question("outbound", ipaddress.ip_address(srv.ipv4), 8080, 1000, 0)).as_json()
            assert {k: got[k] for k in lab} == {**lab, "gid": 0}
            # ... and what the connection does, counted for the pod by that rule
            before = pod_counters(url, "cli")
            out_come = node.probe_connect(cli, 1000, 0, srv.ipv4, 8080)
            assert (out_come.listener, out_come.pod, out_come.orig_dst) == ("outbound", "cli", (srv.ipv4, 8080))
            wait_for(lambda: pod_counters(url, "cli")["out_captured_cidr"] == before["out_captured_cidr"] + 1,
                     what="the pod's out_captured_cidr counter")
            assert pod_counters(url, "cli")["origdst_hit"] == before["origdst_hit"] + 1
            wait_for(lambda: metric(url, "cli", "out_captured_cidr") == before["out_captured_cidr"] + 1,
                     what="the pod's series on /metrics")

            # inbound from a pod that is not captured: to 15006, Envoy's socket registered
            code, out, _ = explain(capsys, url, "default/srv", ext.ipv4, "--inbound", "8080", "--json")
            got = json.loads(out)
            assert (got["rule"], got["captured"], got["listener"], got["listener_ready"]) == \
                ("in_captured_all_ports", True, 15006, True)
            assert got["original_destination"] == [srv.ipv4, 8080]
            landed = node.probe_connect(ext, 1000, 1000, srv.ipv4, 8080)
            assert (landed.listener, landed.pod) == ("inbound", "srv")
            code, out, _ = explain(capsys, url, "default/srv", ext.ipv6, "--inbound", "15021", "--json")
            assert (json.loads(out)["rule"], json.loads(out)["captured"]) == ("in_pass_excluded_port", False)

            # a pod in its own user namespace: the IDs asked are the pod's, mapped as the agent maps them
            code, out, _ = explain(capsys, url, "default/usr", f"[{ext.ipv6}]:8080", "--uid", "1337", "--gid", "1337",
                                   "--json")
            got = json.loads(out)
            assert (got["rule"], got["captured"], got["uid"]) == ("out_pass_proxy_uid", False, 1337)
            # the probe server runs as the pod's 1337: what that is on the host
            assert got["host_uid"] == os.stat(f"/proc/{servers[2].proc.pid}").st_uid != 1337
            code, out, _ = explain(capsys, url, "default/usr", f"[{ext.ipv6}]:8080", "--uid", "1000", "--json")
            assert json.loads(out)["rule"] == "out_captured_cidr"

            # what cannot be answered: one line each
            code, _, err = explain(capsys, url, "default/nope", f"{srv.ipv4}:8080")
            assert code == 1 and err.count("\n") == 1 and "no opted-in pod default/nope" in err
            code, _, err = explain(capsys, url, "default/cli", "srv:8080")
            assert code == 2 and err.count("\n") == 1 and "host names are not resolved" in err
            monkeypatch.setenv("ISTIO_EBPF_PROBE_FAIL", "explain_test_run")
            code, out, err = explain(capsys, url, "default/cli", f"{srv.ipv4}:8080")
            assert (code, out) == (2, "")
            assert err == "istio-ebpf: error: this kernel cannot run explain: probe explain_test_run forced to " \
                          "fail (ISTIO_EBPF_PROBE_FAIL)\n"
    finally:
        for s in servers:
            s.stop()


# ---- the route's questions and refusals (no kernel: a recording datapath) ------------------------

def _view(state: str, handle: int | None):
    from istio_ebpf_plugin.agent.pod_view import PodTarget, PodView

    return PodView("n1", "cookie", False, targets={"ns/p": PodTarget(state, "why not", handle, "/proc/self/ns/net",
                                                                     "", None)})


def _ask(view, dp, unsupported=None, **query):
    from istio_ebpf_plugin.agent.explain_route import answer

    return answer({k: [v] for k, v in query.items()}, view, dp, unsupported, lambda target: iter(()))


@pytest.mark.parametrize("query,message", [
    ({"pod": "p", "dst": "10.0.0.1:80"}, "pod must be NAMESPACE/NAME"),
    ({"pod": "ns/p", "dst": "10.0.0.1"}, "needs a port"),
    ({"pod": "ns/p", "dst": "example.com:80"}, "host names are not resolved"),
    ({"pod": "ns/p", "dst": "10.0.0.1:99999"}, "bad port"),
    ({"pod": "ns/p", "dst": "10.0.0.1:80", "uid": "-1"}, "uid must be a number"),
    ({"pod": "ns/p", "dst": "10.0.0.1", "inbound": "0"}, "inbound is a TCP port"),
    ({"pod": "ns/p", "dst": "10.0.0.1", "inbound": "80", "udp": "1"}, "inbound is a TCP port"),
])
def test_a_bad_question_is_400_with_one_line(tmp_path, query, message):
    from support.recording_datapath import RecordingDatapath

    code, body = _ask(_view("captured", 7), RecordingDatapath("cookie", str(tmp_path), False), **query)
    assert code == 400 and message in body["error"] and "\n" not in body["error"]


def test_questions_reach_the_datapath_as_asked(tmp_path):
    from istio_ebpf_plugin.datapath.podconfig import PodConfig
    from support.recording_datapath import RecordingDatapath

    dp = RecordingDatapath("cookie", str(tmp_path), False, store={7: PodConfig()})
    code, body = _ask(_view("captured", 7), dp, pod="ns/p", dst="[fd00::1]:443", uid="1000", gid="1001",
                      source="127.0.0.6")
    assert code == 200 and body["rule"] == "out_pass_not_included" and body["pod"] == "ns/p"
    assert dp.calls[-1] == ("explain", 7, Question("outbound", ipaddress.ip_address("fd00::1"), 443, 1000, 1001,
                                                   True, ipaddress.ip_address("127.0.0.6")))
    code, body = _ask(_view("captured", 7), dp, pod="ns/p", dst="10.0.0.9", inbound="8080")
    assert dp.calls[-1] == ("explain", 7, Question("inbound", ipaddress.ip_address("10.0.0.9"), 8080))
    code, body = _ask(_view("captured", 7), dp, pod="ns/p", dst="10.0.0.9:53", udp="1")
    assert dp.calls[-1][2].tcp is False


@pytest.mark.parametrize("state,code,message", [
    ("failed", 409, "pod ns/p is failed (why not): its connections are refused (deny)"),
    ("pending", 409, "pod ns/p is pending (why not): it is not captured yet"),
    ("ignored", 409, "pod ns/p is ignored (why not): its opt-in is ignored"),
])
def test_a_pod_that_is_not_captured_says_why(tmp_path, state, code, message):
    from support.recording_datapath import RecordingDatapath

    got = _ask(_view(state, None), RecordingDatapath("cookie", str(tmp_path), False), pod="ns/p", dst="10.0.0.1:80")
    assert got[0] == code and message in got[1]["error"]


def test_a_node_that_cannot_explain_says_so(tmp_path):
    from istio_ebpf_plugin.datapath.explain import ExplainUnavailable
    from istio_ebpf_plugin.datapath.podconfig import PodConfig
    from support.recording_datapath import RecordingDatapath

    dp = RecordingDatapath("cookie", str(tmp_path), False, store={7: PodConfig()})
    dp.explain_unavailable = ExplainUnavailable("this kernel cannot run explain: the test run refused")
    assert _ask(_view("captured", 7), dp, pod="ns/p", dst="10.0.0.1:80") == \
        (501, {"error": "this kernel cannot run explain: the test run refused", "unavailable": True})
    code, body = _ask(_view("captured", 7), dp, unsupported="kernel 4.19 -> unsupported", pod="ns/p",
                      dst="10.0.0.1:80")
    assert code == 501 and body["error"].startswith("this node keeps iptables (kernel 4.19 -> unsupported)")
    assert _ask(None, dp, pod="ns/p", dst="10.0.0.1:80")[0] == 503
    assert _ask(_view("captured", 7), dp, pod="ns/q", dst="10.0.0.1:80") == \
        (404, {"error": "no opted-in pod ns/q on node n1"})
