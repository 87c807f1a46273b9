"""keep_freed_memory: freed large blocks are reused (no fresh page faults), opt-out honoured."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="keep_freed_memory tunes glibc's allocator; this platform has another libc",
)

_PROBE = r"""
import json, resource, sys
import torch
from emorph_deploy.runtime import allocator_state, keep_freed_memory
applied = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(1, 16, 64, 128, 128)  # 64 MB: above glibc's largest mmap threshold (32 MB)
per_iter = []
for _ in range(5):  # a layer-like pattern: fresh results, a concatenation, everything freed
    before = faults()
    y = torch.nn.functional.leaky_relu(x * 2.0, 0.01)
    z = torch.cat([y, x], 1)
    del y, z
    per_iter.append(faults() - before)
print(json.dumps({"applied": applied, "state": allocator_state(), "faults": per_iter}))
"""


def _probe(env_extra: dict[str, str]) -> dict:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    on = _probe({"EMORPH_MALLOC": ""})
    off = _probe({"EMORPH_MALLOC": "system"})
    assert on["applied"] is True and on["state"]["applied"] is True
    assert off["applied"] is False and "EMORPH_MALLOC" in off["state"]["reason"]
    # glibc default: every iteration maps 256 MB afresh and faults it in (65,536 4-KiB pages; fewer with THP)
    steady_off, steady_on = sum(off["faults"][1:]), sum(on["faults"][1:])
    assert steady_off >= 4 * 512, off
    # kept heap: freed blocks are reused (glibc's aligned allocations still fragment a little)
    assert steady_on <= 0.7 * steady_off, (on, off)


def test_load_runner_applies_it(tmp_path):
    code = (
        "from emorph_deploy.runtime import allocator_state\n"
        "from emorph_deploy import runners\n"
        "try:\n    runners.load_runner('missing.onnx')\nexcept Exception:\n    pass\n"
        "print(allocator_state()['applied'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "EMORPH_MALLOC": ""},
    )
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr
