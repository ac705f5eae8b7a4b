"""Kernel matrix: the datapath proven on real 5.10, 6.1 and 6.12 kernels (and this host's).

Host side (``istio-ebpf kernel-matrix``): fetch each Debian kernel once (cache outside the
clone), boot it with virtme-ng (KVM when a guest boots, else TCG), run the steps below in ONE
guest session (BCC compiles are minutes under TCG: the probes run once and a plain datapath is
compiled once and shared by the steps that need it), read one JSON report per kernel back
through a shared read-write directory, print a table.

Guest side (``python -m istio_ebpf_plugin.harness.kernel_matrix guest``), in order:
probe, demo (auto mode), table (the differential capture table against Istio's iptables
rules), explain (the table again, ``explain`` asked before every case: the rules it names, the
listener, pod and original destination it predicts and each pod's counter deltas must be the
case's), explain-rules (the same questions without connections: the rules only, quick enough for
CI), conflict (quadruple conflict), selftest (sockmap self-test), cleanup (``agent --cleanup`` on
an agent-like pinned datapath, then a leftover check).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

from ..errors import UsageError
from . import names, vm

#: name -> Debian suite (None: this host's running kernel, no VM)
KERNELS: dict[str, str | None] = {"5.10": "bullseye", "6.1": "bookworm", "6.12": "trixie", "host": None}
STEPS = ("probe", "demo", "table", "explain", "explain-rules", "conflict", "selftest", "cleanup")
REPORT = "report.json"
#: waits inside an emulated guest (see istio_ebpf_plugin.timeouts)
TCG_TIMEOUT_SCALE = "8"


# ---------------------------------------------------------------------------------- guest side
class GuestRun:
    """Runs steps in this process, writing the report after each one (a timeout keeps the rest)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.release = os.uname().release
        self.report: dict[str, Any] = {"release": self.release, "steps": {}}
        self.features: dict[str, bool] | None = None
        self.mode = "unsupported"
        self._dp = None        # the shared plain datapath (compiled once)
        self._pin_root = f"/sys/fs/bpf/{names.BPF_PIN_PREFIX}-kmx-{uuid.uuid4().hex[:8]}"

    def save(self) -> None:
        tmp = self.out / (REPORT + ".tmp")
        tmp.write_text(json.dumps(self.report, indent=1, sort_keys=True))
        tmp.replace(self.out / REPORT)

    def datapath(self):
        from ..datapath.loader import Datapath

        if self._dp is None:
            self._dp = Datapath(mode=self.mode, pin_root=self._pin_root).load()
        return self._dp

    def run(self, steps: list[str]) -> None:
        started = time.monotonic()
        for name in steps:
            t0 = time.monotonic()
            try:
                if name != "probe" and self.features is None:
                    self.step_probe()
                result = getattr(self, f"step_{name.replace('-', '_')}")()
            except Exception as exc:   # one step's failure must not hide the others' results
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600],
                          "trace": traceback.format_exc()[-1500:]}
            result["seconds"] = round(time.monotonic() - t0, 1)
            self.report["steps"][name] = result
            self.report["seconds"] = round(time.monotonic() - started, 1)
            self.save()
        if self._dp is not None:
            self._dp.close(cleanup=True)

    # -- steps: each returns a dict with "ok" ----------------------------------------------
    def step_probe(self) -> dict:
        from ..datapath.probe import probe_features, select_mode, sockmap_supported

        self.features = probe_features()
        self.mode, reason = select_mode(self.release, self.features)
        self.report.update(mode=self.mode, reason=reason, probes=self.features)
        return {"ok": self.mode != "unsupported", "mode": self.mode, "reason": reason,
                "failed_probes": sorted(k for k, v in self.features.items() if not v),
                "sockmap_probes": sockmap_supported(self.mode, self.features)}

    def step_demo(self) -> dict:
        from .demo import demo_ok, run_demo

        with open(os.devnull, "w") as devnull:
            s = run_demo(mode="auto", requests=50, log=devnull, features=self.features)
        keep = ("mode", "requests_ok", "requests_failed", "original_destination_ok", "iptables_rules_in_pods",
                "original_destinations", "client_envoy_outbound_requests", "server_envoy_inbound_requests")
        return {"ok": demo_ok(s), **{k: s[k] for k in keep}, "counters": s["counters"]}

    def step_table(self) -> dict:
        from .capture_cases import CASES, KNOWN_DIFFERENCES, CaptureLab, ebpf_installer, failures
        from .node import Node

        dp = self.datapath()
        with Node() as node:
            dp.attach_cgroup(str(node.parent_cgroup))
            try:
                lab = CaptureLab(node)
                results = lab.run(CASES, install=ebpf_installer(dp),
                                  uninstall=lambda pod, handle: dp.remove_pod(handle))
                rules = sum(pod.iptables_rule_count() for pod in lab.pods)
            finally:
                _detach_cgroup(dp, str(node.parent_cgroup))
        # the per-mode differences the README documents are allowed, exactly as on the host
        allowed = KNOWN_DIFFERENCES.get(self.mode, {})
        bad = failures(results, allowed)
        return {"ok": not bad and rules == 0 and len(results) == len(CASES), "agree": len(results) - len(bad),
                "total": len(CASES), "iptables_rules_in_pods": rules,
                "documented_differences": sum(1 for r in results if not r.ok and r.case.id in allowed),
                "disagree": [f"{r.case.id}[{r.case.config}]: {r.got}" for r in bad][:5]}

    def step_explain(self) -> dict:
        return self._explain(connect=True)

    def step_explain_rules(self) -> dict:
        return self._explain(connect=False)

    def _explain(self, connect: bool) -> dict:
        """Every case of the table asked of ``explain`` first (the kernel's decision functions with
        BPF_PROG_TEST_RUN); with ``connect`` the connection is made too and compared."""
        from ..datapath.explain import ExplainUnavailable
        from .capture_cases import CASES, CaptureLab, ebpf_installer
        from .explain_table import check_case, predict
        from .node import Node
        from .probe import Outcome

        dp = self.datapath()
        wrong: list[str] = []
        counted = 0
        with Node() as node:
            dp.attach_cgroup(str(node.parent_cgroup))
            try:
                lab = CaptureLab(node)

                def around(case: Any, handles: dict[str, Any], probe: Callable[[], Outcome]) -> Outcome:
                    nonlocal counted
                    before = dp.pod_counters()
                    prediction = predict(lab, dp, case, handles)
                    if not connect:
                        if prediction.rules != case.rules:
                            wrong.append(f"{case.id}: explain names {prediction.rules}, the case {case.rules}")
                        return Outcome("skipped")
                    outcome = probe()
                    problems = check_case(lab, case, prediction, before, dp.pod_counters(), handles, self.mode,
                                          outcome)
                    wrong.extend(problems)
                    counted += not problems
                    return outcome

                try:
                    lab.run(CASES, install=ebpf_installer(dp), uninstall=lambda pod, handle: dp.remove_pod(handle),
                            around=around)
                except ExplainUnavailable as exc:
                    return {"ok": False, "unavailable": str(exc), "agree": 0, "total": len(CASES)}
            finally:
                _detach_cgroup(dp, str(node.parent_cgroup))
        bad = {w.split(":", 1)[0] for w in wrong}
        return {"ok": not wrong, "agree": len(CASES) - len(bad), "total": len(CASES), "connections": connect,
                "disagree": wrong[:5]}

    def step_conflict(self) -> dict:
        from .conflict import run_quadruple_conflict
        from .node import Node

        dp = self.datapath()
        with Node() as node:
            dp.attach_cgroup(str(node.parent_cgroup))
            try:
                r = run_quadruple_conflict(node, dp, self.mode)
            finally:
                _detach_cgroup(dp, str(node.parent_cgroup))
        return {"ok": r["bad"] == 0 and r["peer_ok"] and all(p["n"] == r["n"] for p in r["pods"].values()),
                "connections": 2 * r["n"], "mixed_up": r["bad"], "peer_ok": r["peer_ok"]}

    def step_selftest(self) -> dict:
        from ..datapath.selftest.sockmap_check import MAX_REASON_CHARS, self_test

        passed, reason = self_test(self.mode)
        # The step is about the verdict being reached and reported safely, not about sockmap working.
        return {"ok": len(reason) <= MAX_REASON_CHARS, "passed": passed, "reason": reason}

    def step_cleanup(self) -> dict:
        from ..datapath import libbpf
        from ..datapath.loader import Datapath
        from ..datapath.podconfig import PodConfig, ip_list
        from . import cleanup
        from .node import Node

        pin_root = f"/sys/fs/bpf/{names.BPF_PIN_PREFIX}-kmx-agent-{uuid.uuid4().hex[:8]}"
        with Node() as node:
            # An agent that exited and left its datapath pinned and attached (adopts the shared
            # compile when the pin roots match; otherwise this compiles).
            dp = Datapath(mode=self.mode, pin_root=pin_root).load()
            dp.attach_cgroup(str(node.parent_cgroup))
            pod = node.add_pod("a")
            dp.add_pod(pod.netns_path, PodConfig(pod_ips=ip_list(pod.pod_ips)), str(pod.cgroup_path))
            attached_before = sum(len(v) for v in dp.attached_program_ids(str(node.parent_cgroup)).values())
            dp.close(cleanup=False)
            env = dict(os.environ, KUBECONFIG="/nonexistent/istio-ebpf-kernel-matrix")  # never a real cluster
            proc = subprocess.run([sys.executable, "-m", "istio_ebpf_plugin.cli", "agent", "--cleanup",
                                   "--node-name", "kernel-matrix-guest", "--pin-root", pin_root],
                                  capture_output=True, text=True, timeout=300, env=env)
            left: list[str] = []
            fd = os.open(str(node.parent_cgroup), os.O_RDONLY)
            try:
                for attach in (libbpf.CGROUP_INET4_CONNECT, libbpf.SOCK_OPS, libbpf.CGROUP_GETSOCKOPT):
                    left += [f"cgroup attach {attach}: prog {i}" for i in libbpf.prog_query(fd, attach)]
            finally:
                os.close(fd)
            fd = os.open(pod.netns_path, os.O_RDONLY)
            try:
                left += [f"sk_lookup prog {i}" for i in libbpf.prog_query(fd, libbpf.SK_LOOKUP)]
            finally:
                os.close(fd)
            if Path(pin_root).exists():
                left.append(f"pin root {pin_root}")
        if self._dp is not None:   # the steps' own datapath goes too, before the leftover scan
            self._dp.close(cleanup=True)
            self._dp = None
        found = cleanup.find(force=True).only(names.created_tokens)   # what this run's pods left
        if found:
            left.append(found.describe())
        return {"ok": proc.returncode == 0 and attached_before > 0 and not left, "attached_before": attached_before,
                "agent_exit": proc.returncode, "agent_says": (proc.stdout + proc.stderr).strip()[-300:],
                "leftovers": left}


def _detach_cgroup(dp: Any, cgroup_path: str) -> None:
    """Detach the shared datapath from one step's node before the next step attaches it elsewhere."""
    from ..datapath.host import unpin_link

    ino = os.stat(cgroup_path).st_ino
    for link in (dp.links_dir).glob(f"cg-{ino}-*"):
        unpin_link(link)


def prepare_guest(kernel_dir: str | None) -> list[str]:
    """bpffs, the guest kernel's modules (and so its headers for BCC), veth and bridge."""
    problems = []
    release = os.uname().release
    if kernel_dir:
        mods = Path("/lib/modules")
        mods.mkdir(parents=True, exist_ok=True)
        link = mods / release
        if not link.exists():   # virtme-ng's own link points into /var/cache, hidden in the guest
            link.unlink(missing_ok=True)
            link.symlink_to(f"{kernel_dir}/modules/lib/modules/{release}")
    if subprocess.run(["mountpoint", "-q", "/sys/fs/bpf"]).returncode != 0:
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=False)
    for module in ("veth", "bridge"):
        p = subprocess.run(["modprobe", module], capture_output=True, text=True)
        if p.returncode != 0:
            problems.append(f"modprobe {module}: {p.stderr.strip()}")
    return problems


def guest_main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = GuestRun(out)
    run.report["prepare_problems"] = prepare_guest(args.kernel_dir)
    run.save()
    run.run(parse_steps(args.steps))
    return 0


# ----------------------------------------------------------------------------------- host side
def parse_steps(text: str) -> list[str]:
    steps = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise UsageError(f"unknown steps {unknown or text!r}: choose from {', '.join(STEPS)}")
    return [s for s in STEPS if s in steps]   # always in the documented order


def parse_kernels(text: str) -> list[str]:
    names = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in names if k not in KERNELS]
    if unknown or not names:
        raise UsageError(f"unknown kernels {unknown or text!r}: choose from {', '.join(KERNELS)}")
    return names


def _guest_command(steps: list[str], out: Path, kernel_dir: str | None) -> list[str]:
    argv = [str(vm.REPO / ".venv" / "bin" / "python"), "-m", "istio_ebpf_plugin.harness.kernel_matrix", "guest",
            "--steps", ",".join(steps), "--out", str(out)]
    if not Path(argv[0]).exists():
        argv[0] = sys.executable
    return argv + (["--kernel-dir", kernel_dir] if kernel_dir else [])


def run_kernel(name: str, steps: list[str], out_root: Path, timeout: float = 3600,
               log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Run ``steps`` on one kernel of :data:`KERNELS`; returns its report (also written to
    ``out_root/<name>.json``)."""
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).unlink(missing_ok=True)
    t0 = time.monotonic()
    suite = KERNELS[name]
    meta: dict[str, Any] = {"kernel": name, "suite": suite}
    if suite is None:
        meta["accel"] = "none (this host)"
        proc = subprocess.run(_guest_command(steps, out, None), capture_output=True, text=True, timeout=timeout,
                              cwd=str(vm.REPO))
        (out / "console.log").write_text(proc.stdout + proc.stderr)
    else:
        t = time.monotonic()
        vng = vm.fetch_vng()   # first: it installs kmod, whose depmod the kernel fetch needs
        kernel = vm.fetch_kernel(suite)
        meta["fetch_seconds"] = round(time.monotonic() - t, 1)
        accel = vm.detect_accel(vng, kernel, out)
        meta["accel"] = accel
        log(f"kernel-matrix: {name}: booting {kernel.release} with virtme-ng ({accel.upper()})")
        # one process for every compile: a BCC worker process would load LLVM again (minutes under TCG)
        env = f"ISTIO_EBPF_TIMEOUT_SCALE={TCG_TIMEOUT_SCALE if accel == 'tcg' else '2'} ISTIO_EBPF_COMPILE_IN_PROCESS=1"
        command = f"cd {shlex.quote(str(vm.REPO))} && env {env} " + " ".join(
            shlex.quote(a) for a in _guest_command(steps, out, vm.GUEST_KERNEL_DIR))
        rc, seconds = vm.boot(vng, kernel, command, rwdir=out, accel=accel, timeout=timeout,
                              log_path=out / "console.log")
        meta.update(vm_seconds=round(seconds, 1), timed_out=rc is None)
    report_path = out / REPORT
    report = json.loads(report_path.read_text()) if report_path.exists() else {"steps": {}}
    report.update(meta)
    report["wall_seconds"] = round(time.monotonic() - t0, 1)
    missing = [s for s in steps if s not in report["steps"]]
    for s in missing:
        report["steps"][s] = {"ok": False, "error": "not run (guest died or timed out: see console.log)"}
    (out_root / f"{name}.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    return report


def cell(step: str, r: dict | None) -> str:
    """One table cell: the step's figure, '!' marking a failed step."""
    if r is None:
        return "-"
    if "error" in r:
        return "ERROR"
    figure = {
        "probe": lambda: r.get("mode", "?"),
        "demo": lambda: f"{r['requests_ok']}/{r['requests_ok'] + r['requests_failed']}",
        "table": lambda: f"{r['agree']}/{r['total']}",
        "explain": lambda: "unavailable" if r.get("unavailable") else f"{r['agree']}/{r['total']}",
        "explain-rules": lambda: "unavailable" if r.get("unavailable") else f"{r['agree']}/{r['total']}",
        "conflict": lambda: f"{r['mixed_up']} mixed/{r['connections']}",
        "selftest": lambda: "pass" if r["passed"] else ("no verdict" if "could not run" in r["reason"] else "refused"),
        "cleanup": lambda: "clean" if not r["leftovers"] else f"{len(r['leftovers'])} left",
    }[step]()
    return figure + ("" if r.get("ok") else " !")


def format_table(reports: list[dict], steps: list[str]) -> str:
    head = ["kernel", "release", "accel", "mode", *steps, "seconds"]
    rows = [head]
    for rep in reports:
        rows.append([rep.get("kernel", "?"), rep.get("release", "?"), str(rep.get("accel", "?")).split(" ")[0],
                     rep.get("mode", "?"), *(cell(s, rep["steps"].get(s)) for s in steps),
                     str(rep.get("wall_seconds", "?"))])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"{rep['kernel']} selftest: {rep['steps']['selftest'].get('reason', '')}" for rep in reports
             if "selftest" in rep["steps"] and rep["steps"]["selftest"].get("reason")]
    return "\n".join(lines + notes)


def host_main(args: argparse.Namespace) -> int:
    steps = parse_steps(args.steps)
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    reports = []
    for name in parse_kernels(args.kernels):
        rep = run_kernel(name, steps, out_root, timeout=args.timeout)
        reports.append(rep)
        print(f"kernel-matrix: {name}: {rep.get('release', '?')} done in {rep['wall_seconds']} s", file=sys.stderr)
    table = format_table(reports, steps)
    (out_root / "table.txt").write_text(table + "\n")
    print(table)
    ok = all(r.get("ok") for rep in reports for r in rep["steps"].values())
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernel_matrix")
    sub = parser.add_subparsers(dest="side", required=True)
    g = sub.add_parser("guest", help="run steps on this kernel (inside the VM)")
    g.add_argument("--steps", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--kernel-dir", help="where the guest sees the fetched kernel's cache directory")
    g.set_defaults(func=guest_main)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
