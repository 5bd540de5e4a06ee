"""Converter inputs: every input checked before any conversion, one-line errors with
status 2, stale temporary directories of killed writers removed, documented CLIs.

Inputs are the golden release layout (``llm/`` + ``tokenizer/``) and a tiny random
Qwen2 as wide as the golden transformer's context; every size comes from the fixtures.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from hart_jax.checkpoint import remove_stale_temporaries
from hart_jax.convert import qwen2, release
from hart_jax.convert.__main__ import COMMANDS
from hart_jax.convert.__main__ import main as convert_main
from hart_jax.errors import CheckpointError
from test_prompts import VOCAB, build_tokenizer

WRITER = """
import os, sys
from hart_jax.checkpoint import atomic_directory
with atomic_directory(sys.argv[1]) as tmp:
    (tmp / "partial").write_text("half written")
    print(tmp, flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), 9)
    sys.stdin.read()
"""


def _python(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, **kw)


def _one_line_error(err: str) -> str:
    """The single ``error: ...`` line of ``err`` (asserts there is nothing else)."""
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def qwen_dir(golden_dir, tmp_path_factory) -> Path:
    """A tiny random transformers Qwen2 with tokenizer files, as wide as the golden context."""
    from transformers import Qwen2Config, Qwen2Model

    width = json.loads((golden_dir / "llm" / "config.json").read_text())["context_dim"]
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("qwen")
    import torch

    with torch.random.fork_rng():  # the same weights in any test order; the global RNG is left alone
        torch.manual_seed(0)
        Qwen2Model(cfg).save_pretrained(d)
    build_tokenizer(d, "right")
    return d


@pytest.fixture()
def converter_calls(monkeypatch) -> list[str]:
    """Replace the release's converters by stubs that record the call and stop there."""
    calls: list[str] = []

    def stub(name: str):
        def reached(*args, **kwargs):
            calls.append(name)
            raise CheckpointError(f"{name} reached")

        return reached

    monkeypatch.setattr(release, "save_tokenizer", stub("save_tokenizer"))
    monkeypatch.setattr(release, "save_llm", stub("save_llm"))
    monkeypatch.setattr(qwen2, "convert_qwen2", stub("convert_qwen2"))
    return calls


def _bad_release_input(case: str, tmp_path: Path, qwen_dir: Path) -> tuple[list[str], str]:
    """Extra arguments (text encoder dir, prefix options) of a release conversion with one bad input."""
    prefix = tmp_path / "prefix.txt"
    prefix.write_text("User Prompt:\n")
    ok = ["--prefix-from", str(prefix), "--allow-prefix-mismatch"]
    if case == "prefix missing":
        return [str(qwen_dir), "--prefix-from", str(tmp_path / "nope.txt"), "--allow-prefix-mismatch"], "not found"
    if case == "prefix hash":
        return [str(qwen_dir), "--prefix-from", str(prefix)], "SHA-256"
    if case == "prefix unparsable":
        (tmp_path / "constants.py").write_text("x = 1\n")
        return [str(qwen_dir), "--prefix-from", str(tmp_path / "constants.py")], "llm_system_prompt"
    if case == "text encoder missing":
        return [str(tmp_path / "no_qwen"), *ok], "not a directory"
    bad = tmp_path / "qwen"
    shutil.copytree(qwen_dir, bad)
    if case == "text encoder width":
        cfg = json.loads((bad / "config.json").read_text())
        cfg["hidden_size"] *= 2
        (bad / "config.json").write_text(json.dumps(cfg))
        return [str(bad), *ok], "context_dim"
    assert case == "no tokenizer files"
    for f in bad.glob("tokenizer*.json"):
        f.unlink()
    return [str(bad), *ok], "no tokenizer files"


@pytest.mark.parametrize("case", ["prefix missing", "prefix hash", "prefix unparsable", "text encoder missing",
                                  "text encoder width", "no tokenizer files", "output exists"])
def test_release_checks_every_input_before_converting(case, golden_dir, qwen_dir, tmp_path, converter_calls,
                                                      capsys):
    outs = tmp_path / "outs"
    outs.mkdir()
    out = outs / "pipe"
    if case == "output exists":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
        prefix = tmp_path / "prefix.txt"
        prefix.write_text("User Prompt:\n")
        extra, message = [str(qwen_dir), "--prefix-from", str(prefix), "--allow-prefix-mismatch"], "already exists"
    else:
        extra, message = _bad_release_input(case, tmp_path, qwen_dir)
    before = sorted(p.name for p in outs.iterdir())
    assert convert_main(["release", str(golden_dir), extra[0], str(out), *extra[1:]]) == 2
    assert message in _one_line_error(capsys.readouterr().err)
    assert converter_calls == []
    assert sorted(p.name for p in outs.iterdir()) == before
    if case == "output exists":
        assert (out / "keep.txt").read_text() == "precious"
        extra.append("--force")
    else:  # with the bad input fixed, conversion starts: the stubs are the real call sites
        extra = [str(qwen_dir), "--prefix-from", str(tmp_path / "prefix.txt"), "--allow-prefix-mismatch"]
    assert convert_main(["release", str(golden_dir), extra[0], str(out), *extra[1:]]) == 2
    assert converter_calls == ["save_tokenizer"]
    assert "save_tokenizer reached" in capsys.readouterr().err
    assert sorted(p.name for p in outs.iterdir()) == before


def test_qwen2_missing_folder_is_named_like_the_other_converters(tmp_path, capsys):
    missing, out = tmp_path / "missing", tmp_path / "out"
    expected = f"error: {missing}: not a directory\n"
    for argv in (["tokenizer", str(missing), str(out)], ["llm", str(missing), str(out)],
                 ["qwen2", str(missing), str(out)], ["qwen2", str(missing), str(out), "--allow-prefix-mismatch"]):
        assert convert_main(argv) == 2, argv
        assert _one_line_error(capsys.readouterr().err) == expected, argv
    for extra in ([], ["--allow-prefix-mismatch"]):
        r = _python("-m", "hart_jax.convert.qwen2", str(missing), str(out), *extra)
        assert r.returncode == 2 and _one_line_error(r.stderr) == expected
    assert not out.exists()
    r = _python("-m", "hart_jax.convert", "--help")
    assert r.returncode == 0
    assert all(name in r.stdout for name in COMMANDS) and "qwen2" in COMMANDS
    assert "hart_jax.convert.qwen2" in r.stdout
    r = _python("-m", "hart_jax.convert", "qwen2")
    assert r.returncode == 2 and "required" in _one_line_error(r.stderr)


def test_stale_temporary_directories_are_removed(golden_dir, tmp_path):
    out = tmp_path / "converted"
    dead = _python("-c", WRITER, str(out), "die")
    assert dead.returncode == -9
    stale = Path(dead.stdout.strip())
    assert stale.is_dir() and stale.parent == tmp_path and not out.exists()
    live_writer = subprocess.Popen([sys.executable, "-c", WRITER, str(out), "live"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        live = Path(live_writer.stdout.readline().strip())
        assert live.is_dir()
        pid, host, rand = re.fullmatch(rf"\.{re.escape(out.name)}\.tmp-(\d+)-(.+)-([^-]+)", stale.name).groups()
        kept = [tmp_path / n for n in (f".{out.name}.tmp-{rand}",  # older versions: no pid
                                       f".{out.name}.tmp-{pid}-otherhost-{rand}",  # another machine's writer
                                       f".other.tmp-{pid}-{host}-{rand}")]  # another output
        for d in kept:
            d.mkdir()
        assert convert_main(["tokenizer", str(golden_dir / "tokenizer"), str(out)]) == 0
        assert (out / "hart_jax.json").is_file()
        assert not stale.exists()
        assert live.is_dir() and all(d.is_dir() for d in kept)
    finally:
        live_writer.kill()
        live_writer.wait()
    assert remove_stale_temporaries(out) == [live]  # its writer is dead now
    assert all(d.is_dir() for d in kept) and (out / "hart_jax.json").is_file()


@pytest.mark.parametrize("module", ["hart_jax.data.make_records", "hart_jax.data.shapes"])
def test_record_writers_help_documents_every_argument(module):
    parser = importlib.import_module(module).build_parser()
    r = _python("-m", module, "--help")
    assert r.returncode == 0
    text = "".join(r.stdout.split())  # help is wrapped (also at hyphens)
    assert f"python -m {module} " in r.stdout  # the description shows how it is called
    for action in parser._actions:
        assert action.help and "".join(action.help.split()) in text, (module, action.dest)
        assert all(opt in r.stdout for opt in action.option_strings)
    r = _python("-m", module)
    assert r.returncode == 2 and "required" in _one_line_error(r.stderr)
