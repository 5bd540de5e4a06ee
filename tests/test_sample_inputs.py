"""sample.py refuses bad input before loading a model: one ``error:`` line, exit status 2,
nothing created or changed on disk (no model is compiled and no image sampled here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from hart_jax.builtin import DEFAULT_CKPT
from hart_jax.sample_cli import SEED_MAX, check_seed, main


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _refused(argv: list[str], fragment: str, capsys: pytest.CaptureFixture, cwd: Path) -> str:
    """Run ``main(argv)`` in ``cwd``; assert exit 2, one ``error:`` line holding ``fragment``
    and an unchanged ``cwd``; returns the line."""
    before = _tree(cwd)
    try:
        rc = main([*argv, "--no-progress"])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert _tree(cwd) == before
    return err[0]


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory (the default --out-dir, samples/, would go here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_seed_too_large_for_a_key_is_one_line_and_creates_nothing(here):
    r = subprocess.run([sys.executable, str(REPO / "sample.py"), "--seed", "18446744073709551615", "--out-dir", "o"],
                       capture_output=True, text=True, cwd=here, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [f"error: --seed must be in 0..{SEED_MAX} (2**32 - 1), got 18446744073709551615"]
    assert not list(here.iterdir())


def test_seeds_of_later_images_must_stay_in_range(here, capsys):
    _refused(["--seed", str(SEED_MAX), "--prompt", "a", "--prompt", "b"],
             f"the last image's seed {SEED_MAX + 1} is above {SEED_MAX}", capsys, here)
    check_seed(SEED_MAX)  # the largest seed itself is accepted
    check_seed(0, SEED_MAX + 1)


def test_negative_seed_is_refused(here, capsys):
    _refused(["--seed", "-1", "--prompt", "a"], "--seed must be in 0..4294967295", capsys, here)


def test_out_dir_naming_a_file_is_refused_and_the_file_kept(here, capsys):
    (here / "taken").write_text("mine")
    _refused(["--prompt", "a", "--out-dir", "taken"], "--out-dir taken: exists and is not a directory", capsys, here)
    _refused(["--prompt", "a", "--out-dir", "taken/sub"], "--out-dir taken/sub: taken is not a directory", capsys, here)


@pytest.mark.parametrize("prompts,name", [([""], "--prompt #1"), (["a cat", "   "], "--prompt #2")])
def test_empty_or_blank_prompt_is_refused_like_a_blank_prompt_file(here, capsys, prompts, name):
    argv = [a for p in prompts for a in ("--prompt", p)]
    _refused(argv, f"{name} holds no prompt (empty or only whitespace)", capsys, here)
    (here / "blank.txt").write_text("   \n\n")
    _refused(["--prompt-file", "blank.txt"], "blank.txt: prompt file holds no prompt (empty or only whitespace",
             capsys, here)


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--top-k", "-5"], "--top-k must be an integer >= 0 (0: keep every token), got -5"),
        (["--cfg", "-2"], "--cfg must be a finite number >= 0 (0: no guidance), got -2.0"),
        (["--cfg", "nan"], "--cfg must be a finite number >= 0"),
        (["--cfg", "1e39"], "--cfg must be a finite number >= 0"),  # beyond float32
        (["--top-p", "1"], "--top-p must be in [0, 1) (0: disabled), got 1.0"),
        (["--top-p", "-0.1"], "--top-p must be in [0, 1)"),
        (["--images-per-prompt", "0"], "--images-per-prompt must be >= 1, got 0"),
        (["--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
        (["--resolution", "0"], "--resolution must be >= 1, got 0"),
        (["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    ],
)
def test_meaningless_numbers_are_refused(here, capsys, argv, fragment):
    _refused(["--prompt", "a", *argv], fragment, capsys, here)


def test_bad_sampling_json_values_name_the_file(here, capsys):
    ckpt = here / "ckpt"
    shutil.copytree(DEFAULT_CKPT, ckpt)
    settings = json.loads((ckpt / "sampling.json").read_text())
    (ckpt / "sampling.json").write_text(json.dumps(dict(settings, top_k=-1)))
    _refused(["--ckpt", "ckpt", "--prompt", "a"], "ckpt/sampling.json: top_k must be an integer >= 0", capsys, here)
    (ckpt / "sampling.json").write_text(json.dumps(dict(settings, prompts=["a", " "])))
    _refused(["--ckpt", "ckpt"], "ckpt/sampling.json: prompts[1] holds no prompt", capsys, here)


def test_prompt_file_not_utf8_names_file_and_offset(here, capsys):
    (here / "latin1.txt").write_bytes("a red circle\nun caf\u00e9\n".encode("latin-1"))
    _refused(["--prompt-file", "latin1.txt"], "latin1.txt: prompt file is not UTF-8 (byte 0xe9 at offset 19, line 2)",
             capsys, here)


def test_help_states_each_default_once_and_the_valid_ranges(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    flags = text.split("options:")[1].split("\n  -")[1:]
    assert len(flags) > 15
    for flag in flags:
        assert flag.count("default") <= 1, flag
    words = " ".join(text.split())
    for stated in (f"0 to {SEED_MAX}", "a finite number >= 0", "so 0 = no guidance", "k >= 0; 0 (or k at least",
                   "in [0, 1)", "an existing file of that name is an error"):
        assert stated in words, stated
