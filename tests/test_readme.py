"""The README's commands work as written, offline, in a fresh directory.

The commands are read from README.md each time (never listed here): every line of its
fenced ``bash`` blocks (``&&`` and ``;`` split a line into commands), the ``qae ...`` command
that opens each bullet under "Other commands:", and its ``python`` blocks. Each one runs
as a subprocess in an empty temporary directory with no network: the Hugging Face
libraries in offline mode, an empty Hugging Face cache, and every HTTP(S) proxy pointed
at a closed local port, so a request fails at once instead of reaching the internet.

Budgets shrink only through flags appended after the command as written (argparse keeps
the last value): two training steps of 4 prompts x 4 responses, two samples of two
problems for ``qae eval``, one seed for ``qae compare``, a small ``qae simulate``. The
placeholder ``PATH`` after ``--model`` ("any Hugging Face causal LM") becomes a tiny
random model built here. Shown as skipped, with the reason: package installs, the test
suite itself, and what needs GPUs or another engine (``--config dapo``, vLLM, verl, TRL).

A command passes when it exits 0 and writes nothing in the directory it runs in except
under ``runs/`` (git-ignored) or the paths it names. Commands that train or evaluate are
marked slow (a minute or more in total on 2 cores):
``python -m pytest -q -m slow tests/test_readme.py``.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

TINY = {
    "train": "--steps 2 --rollout.prompts_per_step 4 --rollout.group_size 4 --eval.n 2 "
    "--eval.ks 1,2 --data.val_size 8 --log.progress false --log.tensorboard false "
    "--trainer.diagnostics_every 0",
    "eval": "--limit 2 --n 2 --k 1,2 --max-new-tokens 8 --no-progress --workers 0",
    "compare": "--seeds 1 --steps 2 --parallel 1 --set rollout.prompts_per_step=4 "
    "--set rollout.group_size=4 --set eval.n=2 --set eval.ks=1,2 --set data.val_size=8 "
    "--set log.tensorboard=false --set trainer.diagnostics_every=0 --set trainer.threads=1",
    "simulate": "--prompts 16 --steps 5 --repeats 2 --threads 1",
}
"""Flags appended per ``qae`` sub-command; every other command runs exactly as written."""

SLOW = {"train", "eval", "compare"}

SKIP = (
    (re.compile(r"^pip3? install\b"), "installs packages"),
    (re.compile(r"^python3? -m pytest\b"), "runs the test suite itself"),
    (re.compile(r"--config[ =]dapo\b"), "the paper's DAPO recipe: GPUs and an 8B model"),
    (re.compile(r"--rollout\.backend[ =]vllm\b"), "vLLM rollouts need a CUDA GPU"),
    (re.compile(r"\bqae\.integrations\.(verl|trl)\b"), "a verl/TRL launch (GPUs, Ray)"),
    (re.compile(r"^mkdocs\b"), "the documentation site (mkdocs, docs extra)"),
)

_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")
_OPERATORS = {"&&", ";", "||"}


@dataclass(frozen=True)
class Command:
    """One thing a reader of the README would run."""

    text: str
    """The command as written (a shell line, or Python source)."""
    where: str
    """Where it is in the README."""
    python: bool = False


# --------------------------------------------------------------------------------------
# Reading the README


def _fenced_blocks(lines: list[str]) -> list[tuple[int, str, str]]:
    """``(line number, language, text)`` of every fenced code block."""
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^(```|~~~)\s*([\w-]*)", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith(m.group(1)):
            j += 1
        blocks.append((i + 1, m.group(2), "\n".join(lines[i + 1 : j])))
        i = j + 1
    return blocks


def _shell_commands(script: str) -> list[str]:
    """The commands of a shell block: one per line (continuations joined), split at
    ``&&``, ``||`` and ``;``; comments dropped."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        lex.commenters = "#"
        current: list[str] = []
        for token in [*lex, ";"]:
            if token in _OPERATORS:
                if current:
                    commands.append(shlex.join(current))
                current = []
            else:
                current.append(token)
    return commands


def _other_commands(lines: list[str]) -> list[tuple[int, str]]:
    """The ``qae ...`` code span that opens each bullet of the "Other commands:" list."""
    start = next((i for i, x in enumerate(lines) if x.strip().startswith("Other commands")), None)
    if start is None:
        return []
    found = []
    for i in range(start + 1, len(lines)):
        line = lines[i]
        if line.startswith("#") or (line.strip() and not line.startswith(("-", " "))):
            break
        m = re.match(r"^[-*]\s+`(qae [^`]+)`", line)
        if m:
            found.append((i + 1, m.group(1)))
    return found


def readme_commands(text: str) -> list[Command]:
    """Every command of the README, in page order."""
    lines = text.splitlines()
    found = []
    for line, lang, body in _fenced_blocks(lines):
        if lang in ("bash", "sh", "shell", "console"):
            found += [Command(c, f"README.md:{line}") for c in _shell_commands(body)]
        elif lang == "python":
            found.append(Command(body, f"README.md:{line}", python=True))
    found += [Command(c, f"README.md:{line}") for line, c in _other_commands(lines)]
    return found


def skip_reason(command: Command) -> str | None:
    """Why a command is not run here, or None."""
    if command.python:
        if "qae.integrations" in command.text:
            return "a verl/TRL example (GPUs, a model and a dataset)"
        tree = ast.parse(command.text)
        if any(isinstance(n, ast.Constant) and n.value is Ellipsis for n in ast.walk(tree)):
            return "a code sketch with ... placeholders"
        return None
    for pattern, reason in SKIP:
        if pattern.search(command.text):
            return reason
    argv = shlex.split(command.text)
    for prev, token in zip(argv, argv[1:], strict=False):
        if _PLACEHOLDER.match(token) and prev != "--model":
            return f"the placeholder {token} names nothing to run"
    return None


def _subcommand(command: Command) -> str | None:
    argv = [] if command.python else shlex.split(command.text)
    return argv[1] if len(argv) > 1 and argv[0] == "qae" else None


def _params() -> list:
    params = []
    for command in readme_commands(README.read_text(encoding="utf-8")):
        reason = skip_reason(command)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if _subcommand(command) in SLOW:
            marks.append(pytest.mark.slow)
        label = command.text.splitlines()[0][:70]
        params.append(pytest.param(command, id=f"{command.where} {label}", marks=marks))
    return params


# --------------------------------------------------------------------------------------
# Running a command as a new user would


def offline_env(home: Path) -> dict[str, str]:
    """The environment of a machine without a network and with nothing cached."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens, a connect fails at once
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[key] = env[key.lower()] = dead
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(home / "hf"),
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def shrink(command: str, model: Path) -> str:
    """The command with ``--model PATH`` filled in and the tiny budget flags appended."""
    argv = shlex.split(command)
    argv = [
        str(model) if prev == "--model" and _PLACEHOLDER.match(tok) else tok
        for prev, tok in zip(["", *argv], argv, strict=False)
    ]
    if len(argv) > 1 and argv[0] == "qae" and argv[1] in TINY:
        argv += shlex.split(TINY[argv[1]])
    if argv[0] == "qae":  # the installed console script, as the README means it
        argv = [sys.executable, "-m", "qae.cli", *argv[1:]]
    return shlex.join(argv)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer causal LM with a character tokenizer and a 4096-token context:
    any text fits, so it stands in for "any Hugging Face causal LM" (``--model PATH``)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny-lm")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(path)
    config = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def _allowed_outputs(command: Command) -> set[str]:
    """Top-level names a command may create where it runs: ``runs`` and what it names."""
    if command.python:
        return {"runs"}
    return {"runs"} | {tok.split("/")[0] for tok in shlex.split(command.text)}


# --------------------------------------------------------------------------------------
# Tests


def test_the_readme_lists_commands_to_run():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    run = [c for c in commands if skip_reason(c) is None]
    subs = {_subcommand(c) for c in run}
    assert len(run) >= 5, [c.text for c in commands]
    assert {"train", "eval"} <= subs, subs  # the README's point: train, then evaluate


def test_extraction_reads_blocks_chains_and_the_command_list():
    text = (
        "```bash\npip install -e . && qae train  # go\nqae eval --model PATH \\\n"
        "    --data aime24\n```\n\nOther commands:\n\n- `qae regimes -G 4`: the gate;\n"
        "  `qae report` too\n- `qae train --config dapo`: GPUs.\n\n## Next\n\n- `qae no`\n"
    )
    commands = readme_commands(text)
    assert [c.text for c in commands] == [
        "pip install -e .",
        "qae train",
        "qae eval --model PATH --data aime24",
        "qae regimes -G 4",
        "qae train --config dapo",
    ]
    reasons = [skip_reason(c) for c in commands]
    assert reasons[0] == "installs packages" and reasons[4].startswith("the paper's DAPO")
    assert reasons[1:4] == [None, None, None]
    shrunk = shrink(commands[2].text, Path("/m"))
    assert "--model /m --data aime24 --limit 2 --n 2" in shrunk
    assert skip_reason(Command("qae report RUN_DIR", "x")).startswith("the placeholder")


@pytest.mark.parametrize("command", _params())
def test_readme_command_runs_offline(command: Command, tmp_path: Path, request):
    work = tmp_path / "fresh"
    work.mkdir()
    env = offline_env(tmp_path)
    if command.python:
        argv = [sys.executable, "-c", command.text]
    else:
        needs_model = re.search(r"--model\s+[A-Z][A-Z0-9_]*\b", command.text)
        model = request.getfixturevalue("tiny_lm") if needs_model else Path("unused")
        argv = ["bash", "-euo", "pipefail", "-c", shrink(command.text, model)]
    proc = subprocess.run(
        argv, cwd=work, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, (
        f"{command.where}: `{command.text}` failed offline (exit {proc.returncode}), run as\n"
        f"{argv[-1]}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    )
    stray = set(os.listdir(work)) - _allowed_outputs(command)
    assert not stray, f"{command.where}: `{command.text}` wrote {sorted(stray)} into the cwd"
