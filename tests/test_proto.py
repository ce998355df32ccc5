"""The checked-in stubs are exactly what scripts/gen-proto makes from proto/."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path):
    subprocess.run(
        [str(REPO / "scripts" / "gen-proto"), str(tmp_path)],
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable},
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "gen-proto produced nothing"
    for rel in generated:
        checked_in = REPO / "client" / rel
        assert checked_in.read_text() == (tmp_path / rel).read_text(), (
            f"{checked_in} is stale: run scripts/gen-proto"
        )
