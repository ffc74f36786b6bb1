"""The command line `python -m transformer_lib`, run as a user would: in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from transformer_lib.__main__ import main
from transformer_lib.evaluation import predict
from transformer_lib.training import load_model

ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd=None):
    """Run `python -m transformer_lib ARGS` against this checkout's package."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "transformer_lib", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def assert_one_line_error(result, *words):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got:\n{result.stderr}"
    assert lines[0].startswith("python -m transformer_lib: error: ")
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained for one epoch by the CLI (fast; accuracy is not the point here)."""
    path = tmp_path_factory.mktemp("cli") / "model.npz"
    result = run("train", "--epochs", 1, "--seed", 3, "--out", path)
    return path, result


def test_train_prints_progress_and_saves(trained):
    path, result = trained
    assert result.returncode == 0, result.stderr
    assert "training a model of the reference shape (seed 3, 1 epoch)" in result.stdout
    assert "epoch  1/1  train loss" in result.stdout
    assert "test accuracy" in result.stdout and "all 5,000 inputs" in result.stdout
    assert f"saved {path}" in result.stdout
    assert f'predict "Max(5, 3, 9)" --model {path}' in result.stdout
    model = load_model(path)
    assert model.metadata["seed"] == 3 and model.metadata["epochs"] == 1
    assert len(model.metadata["history"]["val_accuracy"]) == 1


def test_predict_prints_the_models_answers(trained):
    path, _ = trained
    puzzles = ["Max(5, 3, 9)", "First ( 2 7 1 )"]
    result = run("predict", *puzzles, "--model", path)
    assert result.returncode == 0, result.stderr
    model = load_model(path)
    assert result.stdout.splitlines() == [predict(model, p) for p in puzzles]
    assert all(answer in "0123456789" for answer in result.stdout.split())


def test_predict_without_a_model_file_says_how_to_train(tmp_path):
    missing = tmp_path / "nothing.npz"
    result = run("predict", "Max(5, 3, 9)", "--model", missing)
    assert_one_line_error(result, f"no model file at {missing}",
                          f"python -m transformer_lib train --out {missing}")


def test_predict_with_a_corrupt_model_file(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_text("not a model")
    assert_one_line_error(run("predict", "Max(5, 3, 9)", "--model", corrupt),
                          str(corrupt), "is not a model file")


def test_bad_puzzle_in_a_subprocess(trained):
    path, _ = trained
    result = run("predict", "Max(1, 2, 3)", "max(5, 3, 9)", "--model", path)
    assert_one_line_error(result, "cannot read 'max(5, 3, 9)'", "did you mean 'Max'?")
    assert result.stdout == ""                      # nothing printed for the good puzzle either


def test_bad_option_in_a_subprocess():
    assert_one_line_error(run("train", "--epochs", "0"), "--epochs", "must be at least 1, got 0")


# The remaining cases call main() in this process: the same code path, without the ~1 s
# start-up of a new interpreter each.

def run_main(capsys, *args):
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, out, err)


@pytest.mark.parametrize("puzzle, words", [
    ("max(5, 3, 9)", ["cannot read 'max(5, 3, 9)'", "did you mean 'Max'?"]),
    ("Max(5, 12, 9)", ["unknown token '12'", "only single digits"]),
    ("Max(5, 3, 9", ["expected ')' at position 7, got end of input"]),
    ("", ["empty input"]),
])
def test_predict_bad_puzzle(trained, capsys, puzzle, words):
    path, _ = trained
    result = run_main(capsys, "predict", "Max(1, 2, 3)", puzzle, "--model", path)
    assert_one_line_error(result, *words)
    assert result.stdout == ""


@pytest.mark.parametrize("args, words", [
    ([], ["required: {train,predict,generate,train-decoder}"]),
    (["fly"], ["invalid choice: 'fly'"]),
    (["predict"], ["the following arguments are required: PUZZLE"]),
    (["train", "--epochs", "0"], ["--epochs", "must be at least 1, got 0"]),
    (["train", "--epochs", "two"], ["expected a whole number, got 'two'"]),
    (["train", "--seed", "-1"], ["must be at least 0, got -1"]),
    (["train", "--speed", "9"], ["unrecognized arguments: --speed 9"]),
])
def test_bad_command_line(capsys, args, words):
    assert_one_line_error(run_main(capsys, *args), *words, "--help")


def test_help():
    result = run("--help")
    assert result.returncode == 0 and "train" in result.stdout and "predict" in result.stdout
    result = run("predict", "--help")
    assert result.returncode == 0 and "--model" in result.stdout


def test_missing_default_model_suggests_plain_train(capsys, monkeypatch, tmp_path):
    import transformer_lib.__main__ as cli

    default = tmp_path / "reference_model.npz"
    monkeypatch.setattr(cli, "REFERENCE_PATH", default)
    result = run_main(capsys, "predict", "Max(5, 3, 9)", "--model", default)
    assert_one_line_error(result, f"no model file at {default}",
                          "train one first with: python -m transformer_lib train")
    assert "--out" not in result.stderr


def test_only_the_reference_run_writes_the_reference_file(capsys, monkeypatch, tmp_path):
    """train --seed 2 without --out must not replace chapter 5's reference run."""
    import transformer_lib.__main__ as cli

    reference = tmp_path / "reference_model.npz"
    monkeypatch.setattr(cli, "REFERENCE_PATH", reference)
    assert cli.default_out(0, cli.REFERENCE_EPOCHS) == reference
    assert cli.default_out(0, 16) == tmp_path / "model_seed0_epochs16.npz"
    assert main(["train", "--seed", "2", "--epochs", "1"]) == 0
    assert f"saved {tmp_path / 'model_seed2_epochs1.npz'}" in capsys.readouterr().out
    assert not reference.exists()
    assert load_model(tmp_path / "model_seed2_epochs1.npz").metadata["seed"] == 2


def test_predict_uses_the_shipped_model_by_default():
    """A fresh clone answers without training: predict's default is the book's model."""
    result = run("predict", "Max(5, 3, 9)", "Min(8, 9, 8)", "Max(0, 0, 1)", "Second(4, 1, 7)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["9", "8", "1", "1"]


def test_generate_uses_the_shipped_decoders_by_default():
    """Chapter 8: numbers 0-99 through the numbers decoder, nested puzzles through the
    scratchpad decoder, one line per puzzle."""
    result = run("generate", "Max(57, 3, 99)", "Min(40, 8, 61)", "Second(5, 12, 7)",
                 "Max(First(2 8) Second(5 1))", "Min(Last(2 8) Max(5 1 7) First(3 4))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["99", "8", "12", "2 1 → 2", "8 7 3 → 3"]


@pytest.mark.parametrize("args, words", [
    (["generate", "Max(57, 3"], ["cannot read 'Max(57, 3'", "missing ')'"]),
    (["generate", "Max(57, 300, 1)"], ["numbers 0-99"]),
    (["generate", "Mux(5, 7, 1)"], ["unknown operation 'Mux'"]),
    (["generate", "Max(57, 3)"], ["trained on three numbers 0-99"]),
    (["generate", "Max(1, 2, 3)", "--model", "/no/such/decoder.npz"],
     ["no decoder file at /no/such/decoder.npz", "train-decoder --task numbers"]),
    (["train-decoder", "--task", "words"], ["invalid choice: 'words'"]),
])
def test_generate_bad_input(capsys, args, words):
    assert_one_line_error(run_main(capsys, *args), *words)


def test_generate_bad_input_in_a_subprocess():
    assert_one_line_error(run("generate", "Max(First(2 8) 3)"), "mixes numbers")
