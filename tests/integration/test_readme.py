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


def test_readme_first_command_runs_with_a_smaller_budget(data_dir, tmp_path, capsys):
    """The quick start's blob-pyro command as written, with its budget cut to seconds (flags override the file)."""
    import shlex

    from blob_pyro.cli import main

    first = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)[0]
    command = first[first.index("blob-pyro "):].replace("\\\n", " ").strip()
    argv = shlex.split(command)[1:]
    assert argv[0] == "compare" and "--config" in argv
    argv = [a if a != "../shared/data" else str(data_dir) for a in argv]
    argv[argv.index("--output-dir") + 1] = str(tmp_path / "quickstart")
    repo = README.parent
    argv[argv.index("--config") + 1] = str(repo / argv[argv.index("--config") + 1])
    argv += ["--max-steps", "2", "--train-limit", "16", "--eval-limit", "8", "--num-samples", "2", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith(("mle ", "blob "))]
    assert rows == ["mle", "blob"] and "conf - acc" in out
    assert (tmp_path / "quickstart" / "reliability.png").is_file()
