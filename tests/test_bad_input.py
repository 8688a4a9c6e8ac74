"""Bad input everywhere a user types: one table of cases, each the real command as a user runs it.

Every case asserts a non-zero exit, a message that names the key or file and the fix (one
``error: ...`` line for dynpos's own checks; Hydra's own message for config composition errors,
which names the group and its options or the key and the ``+key=`` fix), no Python traceback,
and nothing written where the command pointed: a fresh ``hydra.run.dir`` is removed again, and an
existing run folder stays byte for byte as it was.

The cases run in this process through the scripts' own ``__main__`` (``runpy``: the same code path
as the command line, without a new interpreter each); a few run as subprocesses, to check what a
user sees on a terminal. They share the session's trained nano run (``conftest.trained``).
"""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_main


@dataclass(frozen=True)
class Case:
    """``script`` run with ``args`` (``{name}`` placeholders filled from the fixture's paths).

    ``says``: fragments the message must contain (the key or file, and the fix). ``hydra``: the
    message is Hydra's own (several lines) rather than one ``error:`` line.
    """

    id: str
    script: str
    args: list[str]
    says: list[str]
    hydra: bool = False
    data: str | None = "{corpus}"  # train.py only: data=textfiles data.paths=<it>; None: the default corpus
    run_dir: str = "{out}"  # train.py only: hydra.run.dir
    trains: bool = False  # train.py only: the run starts (and fails at its first step)


T, S, E, R = "train.py", "scripts/sample.py", "scripts/evaluate.py", "scripts/report.py"

CASES = [
    # --- train.py: wrong types (Hydra's schema) and out-of-range values (the schema's checks), before any data
    Case("type-n_layer", T, ["model.n_layer=abc"], ["model.n_layer=abc", "could not be converted to Integer"],
         hydra=True),
    Case("type-lr", T, ["optim.lr=abc"], ["optim.lr=abc", "could not be converted to Float"], hydra=True),
    Case("negative-lr", T, ["optim.lr=-1"], ["optim.lr must be > 0", "-1", "1e-3"]),
    Case("zero-batch_size", T, ["data.batch_size=0"], ["data.batch_size=0", "positive integer"]),
    Case("flex-train-cpu", T, ["model.attn=flex"], ["model.attn=flex cannot train on CPU", "model.attn=auto"]),
    Case("betas", T, ["optim.betas=[0.9]"], ["optim.betas=[0.9]", "two numbers in [0, 1)"]),
    Case("heads-divide-width", T, ["model.n_embd=31"], ["model.n_embd=31", "model.n_head=2", "multiple"]),
    Case("eval-lengths-zero", T, ["eval.lengths=[0,64]"], ["eval.lengths=[0, 64]", "positive token counts"]),
    Case("eval-protocol", T, ["eval.lengths=[64]", "eval.protocol=bogus"], ["eval.protocol='bogus'", "nonoverlap"]),
    Case("resume-value", T, ["resume=yes"], ["resume='yes'", "resume=auto"]),
    Case("resume-and-ckpt", T, ["resume=auto", "ckpt_path={ckpt}"], ["resume=auto and ckpt_path=", "one of them"]),
    Case("resume-auto-without-folder", T, ["resume=auto"], ["resume=auto needs the run folder", "hydra.run.dir="],
         run_dir=""),
    Case("pos-typo", T, ["+pos.depthh=3"], ["pos.depthh is not an option of DPB", "depth"]),
    Case("pos-target-not-a-scheme", T, ["pos._target_=torch.nn.Linear"],
         ["pos._target_=torch.nn.Linear is not a positional scheme", "PositionalScheme"]),
    Case("plus-typo", T, ["+optim.lrr=1"], ["optim.lrr is not a config key", "did you mean optim.lr?"]),
    Case("plus-moved-key", T, ["+batch_size=4"], ["batch_size moved to data.batch_size", "data.batch_size=<value>"]),
    Case("max_steps-negative", T, ["trainer.max_steps=-5"], ["trainer.max_steps=-5", "whole number >= 1"]),
    Case("max_steps-text", T, ["trainer.max_steps=abc"], ["trainer.max_steps='abc'", "whole number >= 1"]),
    Case("eval-lengths-on-a-task", T, ["data=copy", "model.block_size=128", "eval.lengths=[32]"], ["eval.lengths", "eval.lengths=null"],
         data=None),
    Case("tokenizer-vocab", T, ["tokenizer.vocab_size=100"], ["tokenizer.vocab_size=100", "tokenizer=bpe only"]),
    Case("gpu-without-gpu", T, ["trainer=gpu"], ["trainer.accelerator=gpu", "needs a CUDA GPU", "trainer=cpu"]),
    Case("fsdp-without-gpu", T, ["trainer=fsdp"], ["trainer=fsdp", "needs a CUDA GPU", "trainer=cpu"]),
    # --- train.py: config composition errors (Hydra's own messages)
    Case("unknown-pos", T, ["pos=foo"], ["pos/foo", "Available options in 'pos'", "alibi", "dpb"], hydra=True),
    Case("unknown-key", T, ["optim.lrr=1"], ["optim.lrr", "+optim.lrr=1"], hydra=True),
    Case("batch_size-at-the-root", T, ["batch_size=4"], ["batch_size", "+batch_size=4"], hydra=True),
    # --- train.py: corpus files
    Case("data-empty-file", T, [], ["data.paths", "empty.txt", "is empty", "fill it"], data="{empty}"),
    Case("data-binary-file", T, [], ["data.paths", "binary.bin", "not valid UTF-8", "encoding_errors=replace"],
         data="{binary}"),
    Case("data-not-utf8", T, [], ["data.paths", "latin1.txt", "not valid UTF-8", "convert it to UTF-8"],
         data="{latin1}"),
    Case("data-missing", T, [], ["data.paths", "no file matches", "nope.txt", "check the path"], data="{missing}"),
    # --- train.py: checkpoints to resume from
    Case("ckpt-truncated", T, ["ckpt_path={truncated}"], ["ckpt_path=", "truncated.ckpt", "truncated or corrupted",
                                                          "use another one"]),
    Case("ckpt-corrupted", T, ["ckpt_path={corrupted}"], ["ckpt_path=", "corrupted.ckpt", "truncated or corrupted"]),
    Case("ckpt-pickle-payload", T, ["ckpt_path={evil}"],
         ["ckpt_path=", "evil.ckpt", "refused to load", "could run code"]),
    Case("ckpt-not-dynpos", T, ["ckpt_path={plain}"], ["ckpt_path=", "plain.ckpt", "not a dynpos checkpoint"]),
    Case("ckpt-directory", T, ["ckpt_path={run}"], ["ckpt_path=", "is a directory", "checkpoints/last.ckpt"]),
    Case("ckpt-missing", T, ["ckpt_path={missing_ckpt}"], ["ckpt_path=", "no such checkpoint file", "last.ckpt"]),
    Case("ckpt-other-tokenizer", T, ["tokenizer=byte", "ckpt_path={ckpt}"],
         ["ckpt_path=", "different tokenizer", "tokenizer.kind", "continue with the tokenizer it was trained with"],
         data=None),
    Case("ckpt-other-model", T, ["model.n_layer=3", "ckpt_path={ckpt}"],
         ["ckpt_path=", "different model", "model.n_layer", ".hydra/config.yaml"], data=None),
    Case("ckpt-other-corpus", T, ["ckpt_path={ckpt}"], ["ckpt_path=", "different data", "data.name"]),
    # --- train.py: run folders
    Case("run-dir-finished", T, [], ["run folder", "already holds a finished run", "hydra.run.dir"], run_dir="{run}"),
    Case("run-dir-unfinished", T, [], ["holds checkpoints of an unfinished run", "resume=auto"],
         run_dir="{unfinished}"),
    Case("run-dir-is-a-file", T, [], ["hydra.run.dir=", "corpus.txt", "is a file", "give a folder"],
         run_dir="{corpus}"),
    # --- train.py: divergence (the one case that reaches a training step)
    Case("diverging-lr", T, ["optim.lr=1e6", "optim.warmup_steps=0"],
         ["non-finite training loss", "at step", "optim.lr=1e+06", "trainer.precision=32-true", "lower optim.lr"],
         trains=True),
    # --- scripts/sample.py
    Case("sample-temperature-0", S, ["ckpt={ckpt}", "temperature=0"], ["temperature must be > 0", "0.0", "1e-3"]),
    Case("sample-top_k-too-big", S, ["ckpt={ckpt}", "top_k=100000"], ["top_k", "vocab_size", "100000"]),
    Case("sample-type", S, ["ckpt={ckpt}", "max_new_tokens=abc"], ["max_new_tokens=abc", "Integer"], hydra=True),
    Case("sample-top_k-text", S, ["ckpt={ckpt}", "top_k=abc"], ["top_k=abc", "Integer"], hydra=True),
    Case("sample-num_samples-0", S, ["ckpt={ckpt}", "num_samples=0"], ["num_samples=0", "whole number >= 1"]),
    Case("sample-no-ckpt", S, ["prompt=hi"], ["ckpt is required", "ckpt=<value>"]),
    Case("sample-unknown-key", S, ["ckpt={ckpt}", "temprature=1"], ["temprature", "+temprature=1"], hydra=True),
    Case("sample-ckpt-directory", S, ["ckpt={run}"], ["ckpt=", "is a directory", "checkpoints/last.ckpt"]),
    Case("sample-ckpt-text-file", S, ["ckpt={corpus}"], ["ckpt=", "corpus.txt", "not a readable checkpoint"]),
    Case("sample-pickle-payload", S, ["ckpt={evil}"], ["ckpt=", "evil.ckpt", "refused to load"]),
    # --- scripts/evaluate.py
    Case("evaluate-lengths-zero", E, ["ckpt={ckpt}", "eval.lengths=[0]"], ["eval.lengths=[0]", "positive"]),
    Case("evaluate-attn", E, ["ckpt={ckpt}", "attn=flash"], ["error: attn='flash' is not one of", "auto, fused, sdpa"]),
    Case("evaluate-ckpt-truncated", E, ["ckpt={truncated}", "eval.lengths=[16]"],
         ["ckpt=", "truncated.ckpt", "truncated or corrupted"]),
    # --- scripts/report.py
    Case("report-no-results", R, ["{folder}"], ["holds no result.json", "train.py -m"]),
    Case("report-broken-result", R, ["{broken_sweep}"], ["result.json", "not valid JSON", "rerun that job"]),
    Case("report-a-file", R, ["{corpus}"], ["is a file, not a folder"]),
]


def corpus_text(lines: int = 600) -> str:
    rng = random.Random(1)
    words = "to be or not that is the question whether tis nobler in mind suffer ROMEO JULIET speak".split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) for _ in range(lines)) + "\n"


class WritesAFile:
    """Unpickling this runs ``open(path, 'w')``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('pwned')",)


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def paths(tmp_path_factory, trained):
    """The inputs of the cases: the session's trained nano run (finished), an unfinished copy, damaged files."""
    tmp = tmp_path_factory.mktemp("bad_input")
    p = {"corpus": tmp / "corpus.txt", "empty": tmp / "empty.txt", "binary": tmp / "binary.bin",
         "latin1": tmp / "latin1.txt", "folder": tmp / "folder", "missing": tmp / "nope.txt",
         "missing_ckpt": tmp / "nope.ckpt", "run": trained[0], "unfinished": tmp / "unfinished",
         "truncated": tmp / "truncated.ckpt", "corrupted": tmp / "corrupted.ckpt", "evil": tmp / "evil.ckpt",
         "plain": tmp / "plain.ckpt", "marker": tmp / "pwned.txt", "broken_sweep": tmp / "sweep",
         "outs": tmp / "outs"}
    p["corpus"].write_text(corpus_text(), encoding="utf-8")
    p["empty"].write_bytes(b"")
    rng = random.Random(2)
    p["binary"].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(rng.randrange(256) for _ in range(4096)))
    p["latin1"].write_bytes("café au lait, naïve façade\n".encode("latin-1") * 100)
    p["folder"].mkdir()
    (p["folder"] / "notes.md").write_text("not a sweep\n")
    p["ckpt"] = p["run"] / "checkpoints" / "best.ckpt"
    (p["unfinished"] / "checkpoints").mkdir(parents=True)
    shutil.copy(p["run"] / "checkpoints" / "last.ckpt", p["unfinished"] / "checkpoints" / "last.ckpt")
    data = p["ckpt"].read_bytes()
    p["truncated"].write_bytes(data[: len(data) // 3])
    p["corrupted"].write_bytes(data[:400] + b"\x00garbage\xff" * 8 + data[480:])
    torch.save({"state_dict": {}, "payload": WritesAFile(str(p["marker"]))}, p["evil"])
    torch.save({"weights": torch.zeros(3)}, p["plain"])
    (p["broken_sweep"] / "0_dpb-nano_seed0").mkdir(parents=True)
    (p["broken_sweep"] / "0_dpb-nano_seed0" / "result.json").write_text("{not json")
    return p


def command(case: Case, paths: dict, cache_dir: Path) -> tuple[list[str], Path | None]:
    """The argv of ``case`` (script first) and, for train.py with a fresh folder, that folder."""
    out = paths["outs"] / case.id
    fill = {**{k: str(v) for k, v in paths.items()}, "out": str(out)}
    args = [a.format(**fill) for a in case.args]
    if case.script == T:
        data = [] if case.data is None else ["data=textfiles", f"data.paths={case.data.format(**fill)}"]
        run_dir = [f"hydra.run.dir={case.run_dir.format(**fill)}"] if case.run_dir else []
        args = ["model=nano", "trainer=debug", f"paths.cache_dir={cache_dir}", *data, *run_dir, *args]
    fresh = case.script == T and case.run_dir == "{out}"
    return [case.script, *args], out if fresh else None


@pytest.fixture(scope="module")
def protected(paths):
    """Digests of the run folders no case may change, taken before any case runs."""
    return {name: snapshot(paths[name]) for name in ("run", "unfinished")}


# One case of each kind runs in the fast tier; the whole table runs in the full suite (CI).
FAST = {"type-n_layer", "negative-lr", "zero-batch_size", "plus-typo", "pos-typo", "unknown-key", "data-empty-file",
        "ckpt-truncated", "ckpt-other-model", "run-dir-finished", "resume-auto-without-folder", "gpu-without-gpu",
        "diverging-lr", "sample-no-ckpt", "evaluate-attn", "report-a-file", "flex-train-cpu"}


@pytest.mark.parametrize("case", [c if c.id in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES],
                         ids=[c.id for c in CASES])
def test_bad_input_fails_with_one_clear_line(case, paths, protected, cache_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("DYNPOS_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)  # a run folder of a command without hydra.run.dir lands here
    argv, out = command(case, paths, cache_dir)
    code, out_text, err_text = run_main(monkeypatch, capsys, *argv)
    output = out_text + err_text
    assert code != 0, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    if case.hydra:
        message = output
    else:
        lines = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, output[-3000:]
        message = lines[0]
        assert code == 2
    for fragment in case.says:
        assert fragment.format(**{k: str(v) for k, v in paths.items()}) in message, (fragment, message)
    if out is not None and case.trains:  # it started, and left no result
        assert not (out / "result.json").exists()
    elif out is not None:  # nothing of the refused run is left
        assert not out.exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_no_case_touched_existing_runs_or_ran_a_payload(paths, protected):
    assert not paths["marker"].exists()
    for name, before in protected.items():
        assert snapshot(paths[name]) == before, name


SMOKE = ["unknown-key", "zero-batch_size", "sample-pickle-payload"]


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.id in SMOKE], ids=SMOKE)
def test_what_a_user_sees_on_the_command_line(case, paths, cache_dir, tmp_path):
    """A few cases as real subprocesses: the exit status and the lines a user reads."""
    argv, out = command(case, paths, cache_dir)
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled", "HOME": str(tmp_path)})
    assert proc.returncode == (1 if case.hydra else 2) and "Traceback" not in proc.stderr
    assert all(f.format(**{k: str(v) for k, v in paths.items()}) in proc.stderr for f in case.says)
    if not case.hydra:
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert out is None or not out.exists()
