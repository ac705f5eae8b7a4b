"""BCC compiles in a short-lived child process, so the agent never holds clang/LLVM's memory.

Compiling with BCC maps LLVM into the process and leaves ~200 MiB resident for the process's
whole life (freeing the module does not give it back). The agent only needs the result: pinned
programs and maps, and the probe verdicts. So both happen in a child (``python -m
istio_ebpf_plugin.datapath.compile_worker TASK``, arguments as JSON on stdin, one JSON line on
stdout) that exits; the parent adopts the pins with libbpf and reads the verdicts.

``ISTIO_EBPF_COMPILE_IN_PROCESS=1`` compiles in the calling process instead (debugging).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
from typing import Any

from ..errors import KernelError

log = logging.getLogger(__name__)

IN_PROCESS_ENV = "ISTIO_EBPF_COMPILE_IN_PROCESS"
RESULT_MARK = "ISTIO_EBPF_WORKER_RESULT "
TIMEOUT_S = 600.0


def in_process() -> bool:
    return os.environ.get(IN_PROCESS_ENV, "") not in ("", "0")


def run(task: str, args: dict[str, Any], timeout: float = TIMEOUT_S) -> Any:
    """Run ``task`` in a child process; its result, or KernelError with the child's one-line reason."""
    argv = [sys.executable, "-m", "istio_ebpf_plugin.datapath.compile_worker", task]
    try:
        proc = subprocess.run(argv, input=json.dumps(args), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise KernelError(f"BCC worker ({task}) did not finish within {timeout:.0f}s") from exc
    for line in proc.stderr.splitlines():
        if line.strip():
            log.info("worker %s: %s", task, line)
    found = next((ln[len(RESULT_MARK):] for ln in reversed(proc.stdout.splitlines())
                  if ln.startswith(RESULT_MARK)), None)
    if found is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise KernelError(f"BCC worker ({task}) exited with {proc.returncode}: {tail[:300]}")
    reply = json.loads(found)
    if not reply.get("ok"):
        raise KernelError(reply.get("error", f"BCC worker ({task}) failed"))
    return reply.get("result")


#: task -> "module:function(args: dict) -> JSON-able result"; named, not imported, so the
#: modules that call run() are not imported by this one (no import cycle).
TASKS = {"probe": "istio_ebpf_plugin.datapath.probe:probe_programs_task",
         "datapath": "istio_ebpf_plugin.datapath.loader:compile_task"}


def _call(task: str, args: dict[str, Any]) -> Any:
    module, _, func = TASKS[task].partition(":")
    return getattr(importlib.import_module(module), func)(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if len(argv) != 1 or argv[0] not in TASKS:
        print(f"usage: compile_worker {{{'|'.join(TASKS)}}} < args.json", file=sys.stderr)
        return 2
    try:
        result = _call(argv[0], json.loads(sys.stdin.read() or "{}"))
        reply: dict[str, Any] = {"ok": True, "result": result}
    except Exception as exc:  # noqa: BLE001 - every failure becomes the parent's one-line error
        reply = {"ok": False, "error": str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__}
    print(RESULT_MARK + json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
