"""The language layer never imports torch (``squeeze check`` must stay fast)."""
from __future__ import annotations

import subprocess
import sys


def test_parser_does_not_import_torch():
    code = (
        "import sys\n"
        "import squeezelang.lang.parser, squeezelang.lang.fmt, squeezelang.lang.units\n"
        "import squeezelang.lang.diagnostics\n"
        "squeezelang.lang.parser.parse('stage p { a = 1 }')\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
