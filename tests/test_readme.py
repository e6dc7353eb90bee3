"""Every shell command of the README (and docs/*.md) as written: each opendit program's command line is parsed by that
program's own parser (an unknown or misspelt flag, a bad value, a missing recipe file fails the test), `make` targets
exist, scripts exist, and every command that trains on the digits is a recipe file (or carries the demo's settings:
run as written, anything else trains a different model than the one its numbers describe)."""

import os
import shlex

import pytest

from helpers import REPO, SCRIPT_MODULES, shell_commands

DOCS = ["README.md", *(os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(REPO, "docs")))
                       if f.endswith(".md"))]
# the demo's budget (Makefile DEMO_ARGS): a digits training command either names a recipe or carries these
DEMO_SETTINGS = {"--batch_size": "128", "--lr": "2e-3", "--lr_schedule": "cosine", "--warmup_steps": "100",
                 "--ema_decay": "0.995", "--mixed_precision": "fp32"}
SUBCOMMANDS = {"train": "opendit.cli.train", "sample": "opendit.cli.sample", "sample-ddp": "opendit.cli.sample_ddp",
               "score-digits": "opendit.cli.score_digits", "eval": "opendit.cli.evaluate",
               "extract-features": "opendit.cli.extract_features", "convert": "opendit.cli.convert",
               "run": "opendit.cli.launch", "export": "opendit.cli.export", "serve": "opendit.cli.serve"}
SECTIONS = {"opendit.cli.train": "train", "opendit.cli.sample": "sample", "opendit.cli.sample_ddp": "sample",
            "opendit.cli.serve": "sample"}


def readme_commands() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        out += [(doc, c) for c in shell_commands(open(os.path.join(REPO, doc)).read())]
    return out


def words_of(command: str) -> list[str]:
    """The command's words: environment assignments and abbreviations ("...", "(same)") dropped."""
    words = [w for w in shlex.split(command) if w != "..."]
    while words and "=" in words[0] and not words[0].startswith("-"):
        words = words[1:]
    if "(same)" in words:
        words = words[:words.index("(same)")]
    return words


def program_of(words: list[str]):
    """(module, argv) of an opendit program's command line, else None."""
    if not words:
        return None
    head = os.path.basename(words[0])
    if head in ("opendit",) and len(words) > 1 and words[1] in SUBCOMMANDS:
        module, argv = SUBCOMMANDS[words[1]], words[2:]
        if module == "opendit.cli.launch":  # opendit run [its flags] SCRIPT [the script's flags]
            script = next(i for i, w in enumerate(argv) if w.endswith(".py"))
            return [("opendit.cli.launch", argv[:script + 1]),
                    (SCRIPT_MODULES[os.path.basename(argv[script])], argv[script + 1:])]
        return [(module, argv)]
    if head in ("python", "python3", "torchrun"):
        script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
        if script is not None and os.path.basename(words[script]) in SCRIPT_MODULES:
            return [(SCRIPT_MODULES[os.path.basename(words[script])], words[script + 1:])]
    return None


def makefile_targets() -> set[str]:
    targets = set()
    for line in open(os.path.join(REPO, "Makefile")):
        if ":" in line and not line.startswith(("\t", "#", " ")) and "=" not in line.split(":")[0]:
            targets.update(line.split(":")[0].split())
    return targets


CHECKED = [(doc, c) for doc, c in readme_commands()
           if program_of(words_of(c)) or words_of(c)[:1] in (["make"], ["bash"])]


@pytest.mark.parametrize("doc,command", CHECKED)
def test_readme_command_parses_with_its_program(doc, command, monkeypatch):
    import importlib

    from opendit.cli.recipes import parse_with_config

    monkeypatch.chdir(REPO)  # recipes/ and scripts/ are named relative to the checkout
    words = words_of(command)
    if words[0] == "make":
        assert all(t in makefile_targets() for t in words[1:] if "=" not in t), command
        return
    if words[0] == "bash":
        assert os.path.isfile(os.path.join(REPO, words[1])), command
        return
    for module, argv in program_of(words):
        parser = importlib.import_module(module).build_parser()
        try:
            args, full = parse_with_config(parser, argv, SECTIONS.get(module, "sample")) if module in SECTIONS \
                else (parser.parse_args(argv), argv)
        except SystemExit:
            pytest.fail(f"{doc}: `{command}` does not parse with {module}'s parser")
        if module == "opendit.cli.train" and getattr(args, "dataset", None) == "digits":
            uses_recipe = os.path.basename(args.config or "").startswith("digits-")
            carried = {k: full[full.index(k) + 1] for k in DEMO_SETTINGS if k in full}
            assert uses_recipe or carried == DEMO_SETTINGS, \
                f"{doc}: `{command}` trains on the digits without a recipe or the demo's settings"


def test_the_checked_commands_cover_the_readme():
    """Every program the README runs is checked (a guard against the parser above silently skipping them)."""
    modules = {m for _, c in CHECKED for m, _ in (program_of(words_of(c)) or [])}
    assert {"opendit.cli.train", "opendit.cli.sample", "opendit.cli.sample_ddp", "opendit.cli.evaluate", "opendit.cli.convert",
            "opendit.cli.extract_features", "opendit.cli.launch", "opendit.cli.export", "opendit.cli.serve"} <= modules
    assert len(CHECKED) >= 30


def test_a_misspelt_flag_fails_the_check(monkeypatch):
    """The check can fail: a command with a misspelt flag does not parse."""
    import importlib

    from opendit.cli.recipes import parse_with_config

    monkeypatch.chdir(REPO)
    (module, argv), = program_of(words_of("python scripts/dit/train.py --config recipes/digits-flow.toml --lr_shedule cosine"))
    with pytest.raises(SystemExit):
        parse_with_config(importlib.import_module(module).build_parser(), argv, "train")
