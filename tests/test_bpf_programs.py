"""Every program file of bpf/ compiles on its own and loads: each includes the headers it uses
(sockname.c once compiled only because the loader put dns.c before it).

Each file goes through BCC exactly as the loader builds the datapath (build.compile_bpf: its
headers inlined, the loader's -D flags, the ABI check appended), in both modes, and every
program in it passes the verifier of this kernel.
"""

from __future__ import annotations

import pytest

from istio_ebpf_plugin.datapath import build
from istio_ebpf_plugin.resources import bpf_dir

from support.datapath_modes import require_mode

pytestmark = pytest.mark.kernel

SOURCES = sorted({p.source for p in build.PROGRAMS})


def load_all(mode: str, sockmap: bool, programs: list[build.Program]) -> dict[str, str]:
    """func -> "" (loaded) or the kernel's refusal, for programs compiled as one module."""
    from bcc import BPF

    module = build.compile_bpf(BPF, programs, mode, sockmap)
    try:
        out = {}
        for p in programs:
            try:
                module.load_func(p.func.encode(), p.prog_type, None, p.attach_type if p.target != "sockhash" else -1)
                out[p.func] = ""
            except Exception as exc:  # noqa: BLE001 - the refusal is the result
                out[p.func] = str(exc) or type(exc).__name__
        return out
    finally:
        module.cleanup()


@pytest.fixture(scope="module")
def whole_datapath() -> dict[tuple[str, bool], dict[str, str]]:
    """What the full build loads, per (mode, sockmap): an optional program this kernel refuses
    there may be refused alone too; nothing else may."""
    return {}


def test_every_c_file_is_a_program_file_of_the_build():
    assert SOURCES == sorted(p.name for p in bpf_dir().glob("*.c"))


@pytest.mark.parametrize("mode", ["cookie", "podip"])
@pytest.mark.parametrize("source", SOURCES)
def test_program_file_compiles_and_loads_alone(whole_datapath, mode, source):
    require_mode(mode)
    sockmap = source == "sk_msg.c"         # its only program exists in sockmap builds
    programs = [p for p in build.PROGRAMS if p.source == source]
    text = build.source_text(programs)
    assert [p.func for p in build.PROGRAMS if f"int {p.func}(" in text] == [p.func for p in programs]
    alone = load_all(mode, sockmap, programs)
    refused = {func: why for func, why in alone.items() if why}
    if refused:
        key = (mode, sockmap)
        if key not in whole_datapath:
            whole_datapath[key] = load_all(mode, sockmap, [p for p in build.PROGRAMS
                                                            if sockmap or not p.needs_sockmap])
        optional = {p.func for p in programs if p.optional}
        assert set(refused) <= optional, refused
        assert all(whole_datapath[key][func] for func in refused), ("refused alone, loaded in the whole build", refused)
