"""docs/distillation.md's worked example runs as written (the test reads the code block)."""

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "distillation.md"


def test_worked_example_runs(capsys, torch_path):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    exec(compile(code, str(DOC), "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "1" and out[1].startswith("teacher head fused") and "CE" in out[1]
