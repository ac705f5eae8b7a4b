"""datapath/build.py without root: every build flag, map size validation, the sources BCC gets,
and the version (the pin directory's name) following flags and sources."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from istio_ebpf_plugin.datapath import build, maps
from istio_ebpf_plugin.errors import UsageError
from istio_ebpf_plugin.resources import bpf_dir


def flag_values(flags: list[str]) -> dict[str, str]:
    assert all(f.startswith("-D") and "=" in f for f in flags), flags
    return dict(f[2:].split("=", 1) for f in flags)


@pytest.mark.parametrize("mode,cookie", [("cookie", "1"), ("podip", "0")])
@pytest.mark.parametrize("sockmap", [False, True])
def test_mode_sockmap_and_counter_flags(mode, cookie, sockmap):
    assert flag_values(build.build_flags(mode, sockmap)) == {
        "ISTIO_EBPF_COOKIE": cookie, "ISTIO_EBPF_SOCKMAP": "1" if sockmap else "0",
        "ISTIO_EBPF_COUNTERS": str(len(maps.COUNTERS))}


def test_every_map_size_becomes_a_flag_in_a_stable_order():
    sizes = {"MAX_PORTS": 8, "MAX_PODS": 4, "MAX_CONNS": 1 << 24, "MAX_CIDRS": 1}
    flags = build.build_flags("cookie", False, sizes)
    assert flags[3:] == ["-DMAX_CIDRS=1", "-DMAX_CONNS=16777216", "-DMAX_PODS=4", "-DMAX_PORTS=8"]
    assert build.build_flags("cookie", False, dict(reversed(sizes.items()))) == flags
    assert set(build.DEFAULT_MAP_SIZES) == set(sizes)


def test_default_map_sizes_are_the_headers():
    header = (bpf_dir() / "abi.h").read_text()
    for name, value in build.DEFAULT_MAP_SIZES.items():
        assert re.search(rf"^#define DEFAULT_{name}\s+{value}$", header, re.M), name


@pytest.mark.parametrize("sizes", [{"MAX_PODS": 0}, {"MAX_PODS": (1 << 24) + 1}, {"MAX_PODS": -1},
                                   {"MAX_SOCKETS": 16}, {"max_pods": 16}])
def test_bad_map_sizes_are_refused(sizes):
    with pytest.raises(UsageError, match="bad map size"):
        build.build_flags("cookie", False, sizes)
    with pytest.raises(UsageError, match="bad map size"):
        build.datapath_version("cookie", False, sizes)


def test_version_names_mode_and_sockmap_and_changes_with_every_flag():
    base = build.datapath_version("cookie", False)
    assert base.startswith(f"{build.LAYOUT_VERSION}-cookie-")
    assert build.datapath_version("cookie", True).startswith(f"{build.LAYOUT_VERSION}-cookie-sockmap-")
    assert build.datapath_version("podip", False).startswith(f"{build.LAYOUT_VERSION}-podip-")
    versions = {base, build.datapath_version("cookie", True), build.datapath_version("podip", False),
                build.datapath_version("cookie", False, {"MAX_PODS": 64}),
                build.datapath_version("cookie", False, {"MAX_PODS": 65}),
                build.datapath_version("cookie", False, {"MAX_CONNS": 64})}
    assert len(versions) == 6
    assert build.datapath_version("cookie", False) == base       # deterministic


def test_version_changes_with_the_sources(tmp_path, monkeypatch):
    copy = tmp_path / "bpf"
    shutil.copytree(bpf_dir(), copy)
    monkeypatch.setattr(build, "bpf_dir", lambda: copy)
    base = build.datapath_version("cookie", False)
    (copy / "outbound_policy.h").write_text((copy / "outbound_policy.h").read_text() + "\n/* edit */\n")
    edited = build.datapath_version("cookie", False)
    assert edited != base
    (copy / "extra.h").write_text("/* a new header */\n")
    assert build.datapath_version("cookie", False) not in (base, edited)


def test_source_text_inlines_each_local_header_once_and_keeps_program_order():
    programs = [p for p in build.PROGRAMS if p.source in ("sockname.c", "dns.c", "connect.c")]
    text = build.source_text(programs)
    assert '#include "' not in text
    assert "#include <" in text                       # system headers stay for clang
    # the shared headers are inlined once, however many programs include them
    marker = next(line for line in (bpf_dir() / "abi.h").read_text().splitlines()
                  if line.startswith("#define DEFAULT_MAX_PODS"))
    assert text.count(marker) == 1
    # one copy of each file, in the order of the programs given
    starts = [text.index(f) for f in ("ie_connect4", "ie_sendmsg4", "ie_getpeername4")]
    assert starts == sorted(starts)
    assert build.source_text(programs + programs) == text


def test_programs_and_maps_are_consistent():
    names = [p.func for p in build.PROGRAMS]
    assert len(names) == len(set(names))
    assert all((bpf_dir() / p.source).exists() for p in build.PROGRAMS)
    assert {p.target for p in build.PROGRAMS} == {"cgroup", "netns", "sockhash", "pod-cgroup", "pod-netns", "test-run"}
    assert [p.func for p in build.PROGRAMS if p.needs_sockmap] == ["ie_accel"]
    assert set(build.MAPS + build.SOCKMAP_MAPS) == set(maps.MAP_TYPES) and not set(build.SOCKMAP_MAPS) & set(build.MAPS)


def test_compile_errors_become_one_kernel_error():
    from istio_ebpf_plugin.errors import KernelError

    seen = {}

    class RefusingBPF:
        def __init__(self, text: str, cflags: list[str]) -> None:
            seen["cflags"] = cflags
            raise RuntimeError("clang: error: bad")

    with pytest.raises(KernelError, match="compiling the datapath failed: clang: error: bad"):
        build.compile_bpf(RefusingBPF, build.PROGRAMS, "podip", True, {"MAX_PODS": 32})
    assert seen["cflags"][0] == f"-I{bpf_dir()}"
    assert "-DMAX_PODS=32" in seen["cflags"] and "-DISTIO_EBPF_COOKIE=0" in seen["cflags"]


def test_abi_check_is_appended_and_its_messages_become_the_error(capfd):
    """BCC prints clang's diagnostics to fd 2 and raises a bare "Failed to compile": the ABI
    messages among them become the one-line error, and fd 2 still shows all of them."""
    from istio_ebpf_plugin.datapath import abi_check
    from istio_ebpf_plugin.errors import KernelError

    class AbiMismatchBPF:
        def __init__(self, text: str, cflags: list[str]) -> None:
            assert text.endswith(abi_check.static_asserts())
            assert "-Werror=implicit-function-declaration" in cflags
            diag = ('/virtual/main.c:9:1: error: static_assert failed due to requirement \'15053 == 15054\' '
                    '"ABI: podconfig.DNS_PROXY_PORT is 15054, DNS_PROXY_PORT in bpf/abi.h is not"\n'
                    '_Static_assert(DNS_PROXY_PORT == 15054, "ABI: podconfig.DNS_PROXY_PORT is 15054, '
                    'DNS_PROXY_PORT in bpf/abi.h is not");\n1 error generated.\n')
            os.write(2, diag.encode())
            raise Exception("Failed to compile BPF module <text>")

    with pytest.raises(KernelError) as err:
        build.compile_bpf(AbiMismatchBPF, build.PROGRAMS, "cookie", False)
    assert str(err.value) == ("compiling the datapath failed: bpf/abi.h and its Python mirrors differ: "
                              "podconfig.DNS_PROXY_PORT is 15054, DNS_PROXY_PORT in bpf/abi.h is not")
    assert "1 error generated." in capfd.readouterr().err


def test_the_loader_still_exports_the_build():
    from istio_ebpf_plugin.datapath import loader

    for name in ("PROGRAMS", "MAPS", "DEFAULT_MAP_SIZES", "build_flags", "compile_bpf", "source_text",
                 "datapath_version", "Program"):
        assert getattr(loader, name) is getattr(build, name)
