"""Ctrl-C in the middle of a run, then the same command again: it resumes after the last stage done."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SLOW_PLUGIN = '''
import time
from squeezelang import hookimpl
from squeezelang.hooks.technique import Technique

class Slow(Technique):
    name = "slow"
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"seconds": {"type": "number", "default": 60}}}
    def estimate(self, meta, params):
        return meta
    def apply_(self, handle, params, ctx):
        print("slow stage started", flush=True)
        time.sleep(params["seconds"])

@hookimpl
def register_techniques(registry):
    registry.add(Slow())
'''


def test_sigint_then_resume(tmp_path: Path, tiny_bert_dir: Path):
    (tmp_path / "slow_plugin.py").write_text(SLOW_PLUGIN)
    recipe = tmp_path / "r.squeeze"
    out = tmp_path / "out"
    recipe.write_text(f'''
model = hf("{tiny_bert_dir}", task = "embedding")
stage sparse: prune {{ ratio = 0.5 }}
stage wait: slow {{ seconds = 60 }}
constraints {{ size <= 90% }}
''')
    env = {**os.environ, "PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [str(Path(sys.executable).parent / "squeeze"), "run", str(recipe), "-o", str(out),
           "--plugin", "slow_plugin"]
    # SIGINT at its default in the child, as in a terminal: a test run started in the background by
    # a shell without job control inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    line = ""
    while time.monotonic() < deadline and "slow stage started" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert "slow stage started" in line, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    assert not out.exists()
    # The same recipe and command again; only the plugin's body changes so the test ends quickly.
    (tmp_path / "slow_plugin.py").write_text(SLOW_PLUGIN.replace('time.sleep(params["seconds"])',
                                                                  'time.sleep(0)'))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming after stage 'sparse'" in done.stdout
    assert (out / "report.json").is_file()
