"""Issue 21 item 4: install labels non-amd64 and non-Linux nodes unsupported, whatever their kernel."""

from istio_ebpf_plugin.install import plan


def _node(name, kernel, os_=None, arch=None, labels=None):
    info = {"kernelVersion": kernel}
    if os_:
        info["operatingSystem"] = os_
    if arch:
        info["architecture"] = arch
    return {"metadata": {"name": name, "labels": labels or {}}, "status": {"nodeInfo": info}}


def test_windows_arm64_and_linux_amd64_nodes():
    nodes = [
        _node("win", "10.0.17763.2114", os_="windows", arch="amd64"),
        _node("arm", "6.8.0-1009-aws", os_="linux", arch="arm64"),
        _node("lbl", "6.8.0", labels={"kubernetes.io/arch": "arm64", "kubernetes.io/os": "linux"}),
        _node("ok", "6.8.0", os_="linux", arch="amd64"),
    ]
    plans = {p.node: p for p in plan.build(nodes)}
    assert plans["win"].mode == "unsupported" and "os windows" in plans["win"].reason
    assert plans["arm"].mode == "unsupported" and "arch arm64" in plans["arm"].reason
    assert plans["lbl"].mode == "unsupported" and "arch arm64" in plans["lbl"].reason
    assert plans["ok"].mode == "cookie" and plans["ok"].reason == ""
    # --mode cannot make a node capture where no agent can run.
    forced = {p.node: p.mode for p in plan.build(nodes, mode="cookie")}
    assert forced == {"win": "unsupported", "arm": "unsupported", "lbl": "unsupported", "ok": "cookie"}
    text = plan.table(list(plans.values()))
    assert "unsupported (os windows: the agent runs only on linux)" in text
    assert "unsupported (arch arm64: the agent runs only on amd64)" in text
    win_row = next(line for line in text.splitlines() if line.startswith("win "))
    assert "not scheduled here" in win_row
