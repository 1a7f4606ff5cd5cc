"""Which of transformers' heavy modeling modules a load pulls in, run in a fresh interpreter."""

import json
import subprocess
import sys

HEAVY = (
    "transformers.modeling_utils",
    "transformers.models.llama.modeling",
    "transformers.models.bert.modeling",
    "torch._dynamo",
)


def heavy_modules_after(code: str) -> list[str]:
    """Run ``code`` in a new Python process and return the heavy modules it imported."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith({HEAVY!r}))))\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])
