"""scripts/figures.py: every command that regenerates a README figure is valid at this commit."""

import json
import runpy

import pytest

from conftest import ROOT, compose_cfg
from dynpos.config import validate

figures = runpy.run_path(str(ROOT / "scripts" / "figures.py"), run_name="figures")


def first_values(argv: list[str]) -> list[str]:
    """A sweep's overrides with each comma list cut to its first value; Hydra's own keys and -m dropped."""
    keep = [a for a in argv if a != "-m" and not a.startswith("hydra.")]
    return [a if a.endswith("]") else a.split(",")[0] for a in keep]


def test_every_training_command_composes_and_validates(tmp_path):
    plan = figures["sections"](tmp_path / "out", tmp_path / "shared")
    assert list(plan) == ["default", "nanogpt", "ablate", "wikitext2", "lengthgen", "bench"]
    commands = [s.argv for steps in plan.values() for s in steps if s.argv[1:2] == ["train.py"]]
    assert len(commands) == 1 + 2 + 1 + 1 + 3
    for argv in commands:
        cfg = validate(compose_cfg(*first_values(argv[2:]), output_dir=tmp_path / "run", cache_dir=tmp_path))
        assert cfg.trainer["max_steps"] > 0
    sweeps = [a for a in commands if "-m" in a]
    assert all(f"pos={figures['SCHEMES']}" in a and "seed=0,1,2" in a for a in sweeps)
    assert len(figures["SCHEMES"].split(",")) == 9


def test_cut_at_article_splits_at_the_first_title_of_the_second_half():
    text = " = A = \n\n a \n = = H = = \n b \n c \n = = I = = \n = B = \n d \n = C = \n"
    first, second = figures["cut_at_article"](text)
    assert first + second == text
    assert second.startswith(" = B = \n") and first.endswith(" = = I = = \n")
    with pytest.raises(ValueError, match="article title"):
        figures["cut_at_article"](" = A = \n a \n b \n = = H = = \n")


def test_dry_run_prints_the_commands_and_bad_sections_exit_2(tmp_path, capsys):
    assert figures["main"](["default", "ablate", "--dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["# default", f"python train.py hydra.run.dir={tmp_path / 'default' / 'run'}", "# ablate",
                       f"OMP_NUM_THREADS=1 python train.py -m experiment=ablate_pos pos={figures['SCHEMES']} "
                       f"seed=0,1,2 hydra.sweep.dir={tmp_path / 'ablate' / 'sweep'}",
                       f"python scripts/report.py sweep={tmp_path / 'ablate'} out={tmp_path / 'ablate'}"]
    with pytest.raises(SystemExit) as exit_:
        figures["main"](["defualt"])
    assert exit_.value.code == 2 and "choose all or any of default" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        figures["main"](["nanogpt", "--shared", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and "tinyshakespeare/input.txt (input.txt of karpathy/char-rnn" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_summary_tables_single_runs(tmp_path):
    run = tmp_path / "nanogpt" / "dpb"
    run.mkdir(parents=True)
    metrics = {"val/loss": 1.75944, "val/bpb": 2.538, "test/loss": 1.7, "test/bpb": 2.45255}
    (run / "result.json").write_text(json.dumps({"metrics": metrics}))
    assert figures["summary"]("nanogpt", tmp_path).splitlines()[-1] == "| dpb | 1.7594 | 2.5380 | 1.7000 | 2.4526 |"


def test_prepare_cuts_tiny_shakespeare_as_nanogpt(tmp_path):
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("abcdefghij" * 3)
    figures["prepare"]("nanogpt", tmp_path, tmp_path)
    assert (tmp_path / "train.txt").read_text() == ("abcdefghij" * 3)[:27]
    assert (tmp_path / "val.txt").read_text() == "hij"
