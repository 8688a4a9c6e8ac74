"""README stays true: its Python examples run as written, and CI runs README's test command."""

import re

import matplotlib

from conftest import ROOT

matplotlib.use("Agg")
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_python_examples_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    examples = blocks("python")
    assert len(examples) == 3
    for code in examples:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["torch.Size([8, 16, 16])", "torch.Size([8, 0, 5])", "torch.Size([2, 10, 64])"]
    assert (tmp_path / "dpb_head0.png").read_bytes()[:4] == b"\x89PNG"


def test_ci_runs_the_readme_full_test_command():
    commands = blocks("bash")
    fast, full = (c.strip().split("&&")[-1].strip() for c in commands[1:3])
    assert fast == "python -m pytest -q" and full == 'python -m pytest -q -m "slow or not slow"'
    assert full in (ROOT / ".ci" / "run").read_text().splitlines()
