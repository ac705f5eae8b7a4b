"""Render Istio injection templates with Go's own text/template (Debian's golang-go).

The Go program (tests/programs/gorender.go) is standard library only: Istio's template functions
(sprig's and its own) that the templates use are stubbed with their
documented behaviour, and the data has the field names Istio's
SidecarTemplateData has. Used by tests/test_install_template.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

GO_SOURCE = Path(__file__).resolve().parents[1] / "programs" / "gorender.go"

#: Functions the stub implements (besides text/template's builtins).
STUB_FUNCTIONS = {"default", "quote", "contains", "list", "toYaml", "indent", "nindent", "omitNil", "isset",
                  "annotation", "valueOrDefault", "excludeInboundPort", "structToJSON"}
GO_BUILTINS = {"and", "or", "not", "eq", "ne", "lt", "le", "gt", "ge", "index", "len", "print", "printf",
               "println", "slice", "call", "html", "js", "urlquery"}


def go_binary() -> str | None:
    return shutil.which("go") or ("/usr/bin/go" if os.path.exists("/usr/bin/go") else None)


class GoRenderer:
    def __init__(self, workdir: Path) -> None:
        go = go_binary()
        assert go, "go not found"
        self.workdir = workdir
        (workdir / "src").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(GO_SOURCE, workdir / "src" / "main.go")
        (workdir / "src" / "go.mod").write_text("module gorender\n\ngo 1.19\n")
        env = dict(os.environ, GOPATH=str(workdir / "gopath"), GOCACHE=str(workdir / "gocache"),
                   GOFLAGS="", GO111MODULE="on", GOPROXY="off", CGO_ENABLED="0")
        self.binary = workdir / "gorender"
        proc = subprocess.run([go, "build", "-o", str(self.binary), "."], cwd=workdir / "src", env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr

    def render(self, template: str, cases: list[dict]) -> list[dict]:
        proc = subprocess.run([str(self.binary)], input=json.dumps({"template": template, "cases": cases}),
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise AssertionError(f"go template failed (rc {proc.returncode}): {proc.stderr}")
        return json.loads(proc.stdout)
