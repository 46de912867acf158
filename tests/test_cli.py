"""The command line as a newcomer meets it: README commands on the bundled data, help texts, early errors."""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dep_engine import cli

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_HISTORY = ROOT / "assets" / "examples" / "my_reviews.csv"


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dep_engine", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"(top)": parser, **sub.choices}


@pytest.mark.parametrize("command", ["(top)", "generate", "users", "train", "evaluate", "likelihood", "pool"])
def test_every_option_has_a_help_text(command):
    parser = subcommands()[command]
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert options
    missing = [a.option_strings[0] for a in options if not (a.help or "").strip()]
    assert not missing, f"{command}: options without help: {missing}"
    rules = next((a for a in options if a.dest == "history_rule"), None)
    if rules is not None:
        assert set(rules.choices) == {"relevant", "recent"}


def readme_commands() -> list[list[str]]:
    """Every `python3 -m dep_engine ...` line of the README's code blocks, continuations joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line.split("  #")[0].strip() for line in text.splitlines()]
    return [shlex.split(line)[3:] for line in lines if line.startswith("python3 -m dep_engine ")]


def test_readme_commands_parse_and_name_files_that_exist():
    """Each README command as written from a fresh clone: options known, methods and modes valid,
    and every input file inside the repository (nothing outside it, like ../shared)."""
    from dep_engine.evaluation import parse_method
    from dep_engine.prompt import get_mode

    commands = readme_commands()
    assert {argv[0] for argv in commands} == {"users", "generate", "train", "evaluate", "pool", "likelihood",
                                              "convert-paper-checkpoint"}
    written = set()  # folders an earlier README command writes (train --out runs/adapter)
    for argv in commands:
        args = cli.build_parser().parse_args(argv)
        for option in ("--history", "--adapter", "--data", "--eval-reviews"):
            if option in argv:
                value = argv[argv.index(option) + 1]
                assert ".." not in Path(value).parts, f"{argv}: {value} is outside the repository"
                assert (ROOT / value).exists() or value in written, f"{argv}: {value} does not exist"
        for run in getattr(args, "runs", []) if args.command == "pool" else ():
            assert run in written, f"{argv}: no README command before it writes {run}"
        written.add(getattr(args, "out", None))
        for method in getattr(args, "methods", "").split(",") if args.command == "evaluate" else ():
            parse_method(method, args.k)
        for mode in args.modes if args.command == "train" else ():
            get_mode(mode)
    assert any("assets/examples/my_reviews.csv" in argv for argv in commands)


SCRIPT_TRAIN_ARGS = shlex.split("--device cuda --no-4bit --epochs 3 --batch-size 32 --lr 1e-3 --eval-every 50 "
                                "--val-samples 128 --max-minutes 5")  # experiments/voice_round.sh's COMMON and TRAIN


@pytest.mark.parametrize("variants", sorted((ROOT / "experiments").glob("*.variants")), ids=lambda p: p.name)
def test_gpu_round_variants_parse(variants):
    """Every variant the GPU script trains, scores and evaluates parses (with the script's own arguments),
    so a lent GPU's minutes are not lost to a typo."""
    parser = cli.build_parser()
    lines = [line for line in variants.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines
    for line in lines:
        name, train_args, eval_args = (part.strip() for part in line.split("|"))
        train = parser.parse_args(["train", *SCRIPT_TRAIN_ARGS, *shlex.split(train_args), "--out", f"runs/{name}"])
        evaluate = parser.parse_args(["evaluate", *shlex.split(eval_args), "--out", f"runs/{name}/val"])
        likelihood = parser.parse_args(["likelihood", "--adapter", f"runs/{name}",
                                        *shlex.split(eval_args), "--out", "x.json"])
        assert (train.func, evaluate.func, likelihood.func) == (cli.cmd_train, cli.cmd_evaluate, cli.cmd_likelihood)


BAD_ARGUMENTS = [
    (["generate", "--history", "no_such_history.csv", "--item-title", "A capo"], "no_such_history.csv"),
    (["generate", "--adapter", "no_such_adapter"], "no_such_adapter"),
    (["generate", "--data", "no_such_data"], "no_such_data"),
    (["generate", "--modes", "generic,bogus"], "bogus"),
    (["train", "--modes", "his,bogus", "--out", "{tmp}/adapter"], "bogus"),
    (["train", "--data", "no_such_data", "--out", "{tmp}/adapter"], "no_such_data"),
    (["train", "--k", "99", "--out", "{tmp}/adapter"], "k must be within 0-16, got 99"),
    (["evaluate", "--methods", "dep,bogus@k=2", "--out", "{tmp}/eval"], "bogus"),
    (["evaluate", "--eval-reviews", "no_such_reviews", "--out", "{tmp}/eval"], "no_such_reviews"),
    (["evaluate", "--adapter", "no_such_adapter", "--out", "{tmp}/eval"], "no_such_adapter"),
    (["likelihood", "--mode", "bogus"], "bogus"),
    (["likelihood", "--adapter", "no_such_adapter"], "no_such_adapter"),
    (["likelihood", "--out", "{tmp}"], "is a folder"),
]


@pytest.mark.parametrize("argv, named", BAD_ARGUMENTS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_arguments_are_refused_before_any_model_loads(argv, named, tmp_path, monkeypatch, capsys):
    def no_models(*_, **__):
        raise AssertionError("models were loaded before the arguments were checked")

    from dep_engine.engine import DEPEngine

    monkeypatch.setattr(DEPEngine, "__init__", no_models)  # the one class every command builds its models with
    assert cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and named in error


def test_missing_history_file_is_one_line_from_the_real_command():
    """The process itself, not only `cli.main`: exit status 2 and one line naming the file, no trace
    (that no model loads first is checked above, in process)."""
    done = run_cli("generate", "--history", "no_such_history.csv", "--item-title", "A capo", timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "error: no_such_history.csv: no such history file"


def test_users_lists_the_most_reviewed_first():
    done = run_cli("users", "--limit", "6", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    counts = [int(row[1].split()[0]) for row in rows]
    assert len(rows) == 6 and counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    from dep_engine.data import by_user, load_dataset
    from dep_engine.engine import BUNDLED_DATA

    most = max(len(h) for h in by_user(load_dataset(BUNDLED_DATA).reviews).values())
    assert counts[0] == most


def test_readme_history_example_runs_end_to_end_with_the_bundled_models():
    """The README's `generate --history assets/examples/my_reviews.csv ...`, with fewer tokens."""
    done = run_cli("generate", "--history", "assets/examples/my_reviews.csv", "--item-title",
                   "Fender guitar picks, 12 pack", "--rating", "4", "--review-title", "Good grip",
                   "--max-new-tokens", "16")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "Product: Fender guitar picks, 12 pack  |  rating 4  |  title: Good grip" in out
    sample_titles = [line.split(",")[0].strip('"') for line in SAMPLE_HISTORY.read_text().splitlines()[1:]]
    used = out.split("Past reviews used (4):")[1].split("===")[0]
    assert sum(title[:60] in used for title in sample_titles) == 4
    for mode in ("generic", "dep"):
        text = out.split(f"=== {mode} ===")[1].split("===")[0].split("timings:")[0]
        assert len(text.split()) >= 3, f"{mode}: {text!r}"
    assert "UNTRAINED" not in out and "tokens_per_second" in out
    assert "Loading weights" not in done.stderr + out and "Traceback" not in done.stderr
