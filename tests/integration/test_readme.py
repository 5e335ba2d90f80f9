"""README's Python API example runs as written (with the data folder this machine has)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_api_example_runs(data_dir, capsys):
    blocks = _python_blocks()
    assert len(blocks) >= 2
    code = "\n".join(blocks[:2]).replace('"../shared/data"', repr(str(data_dir)))
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "'ece'" in out and "'accuracy'" in out
    assert namespace["guide"].rank == 4
