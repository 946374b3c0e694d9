"""transformers (seconds of imports: torch._dynamo, torch.distributed.tensor, scipy, ...) is imported only by
whoever builds the text encoder: not by the modules `wanfast generate` (or `wanfast --help`, or an API-only
server) imports, and, in a build, by the builder's main thread just before the loads (measured: in the
loader thread, beside the experts' reads, it made the build slower than the import itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import ROOT


def _run(code: str, *args: str) -> str:
    """``code`` in a fresh Python (this process has long imported transformers); its stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_generate_path_modules_do_not_import_transformers():
    code = """
import contextlib, io, json, sys
import torch
import wanfast.builder, wanfast.pipeline, wanfast.cli, wanfast.specs, wanfast.loading.layout
import wanfast.models.text_encoder, wanfast.loading.t5_keys, wanfast.loading.text_encoder
after_imports = "transformers" in sys.modules
with contextlib.redirect_stdout(io.StringIO()) as help_text, contextlib.suppress(SystemExit):
    wanfast.cli.main(["generate", "--help"])
print(json.dumps([after_imports, "transformers" in sys.modules, "--ckpt-dir" in help_text.getvalue()]))
"""
    after_imports, after_help, help_printed = json.loads(_run(code))
    assert help_printed  # the help path really ran
    assert not after_imports and not after_help


# Records the thread that first looks for the top-level package "transformers", then runs the CLI.
_FIRST_IMPORTER = """
import json, sys, threading
first = []

class FirstImporter:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" and not first:
            first.append(threading.current_thread().name)
        return None  # only watches: the normal finders import it

sys.meta_path.insert(0, FirstImporter())
from wanfast.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "first": first}))
"""


def test_generate_imports_transformers_on_the_main_thread_before_the_loads(tiny_official, tmp_path):
    out = tmp_path / "v.mp4"
    args = ["generate", "--ckpt-dir", str(tiny_official), "--prompt", "a cat", "--size", "32x32",
            "--frames", "5", "--steps", "1", "--device", "cpu", "--dtype", "fp32", "--output", str(out),
            "--no-progress"]  # fmt: skip
    res = json.loads(_run(_FIRST_IMPORTER, *args).splitlines()[-1])
    assert res["rc"] == 0 and out.stat().st_size > 0  # the video was made with the lazily built encoder
    assert res["first"] == ["MainThread"], res["first"]
