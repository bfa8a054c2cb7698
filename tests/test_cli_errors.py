"""One error style everywhere (``qae <verb>: error: ...`` in one line; exit 2 for a usage
error, 1 for a runtime failure, 130 for Ctrl-C) and bounded inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_flags import TINY_TRAIN

from qae.cli import main
from qae.eval.datasets import load_prompts
from qae.io.runlog import read_metrics

TINY = TINY_TRAIN
EVAL = ["--data", "builtin:arithmetic", "--limit", "2", "--n", "2", "--k", "1,2"]
EVAL += ["--no-progress", "--workers", "0"]


def _error_line(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# --------------------------------------------------------------------------------------
# --resume with nothing to resume


def test_resume_with_nothing_to_resume_is_an_error_that_says_what_it_looked_for(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a fresh run without --out would land in ./runs
    missing = tmp_path / "missing"
    assert main(["train", *TINY, "--steps", "1", "--resume", "--out", str(missing)]) == 2
    assert "does not exist" in _error_line(capsys) and not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", *TINY, "--steps", "1", "--resume", "--out", str(empty)]) == 2
    line = _error_line(capsys)
    assert "nothing to resume" in line and str(empty / "checkpoints" / "step_*") in line
    assert not (empty / "metrics.jsonl").exists()
    assert main(["train", *TINY, "--steps", "1", "--resume"]) == 2
    assert "--resume needs --out" in _error_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_resume_of_a_run_killed_before_its_first_checkpoint_refuses(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(["train", *TINY, "--steps", "1", "--log.checkpoint_every", "0", "--out", str(run)])
        == 0
    )
    capsys.readouterr()
    for ck in (run / "checkpoints").iterdir():  # as if killed before the first checkpoint
        if ck.is_dir():
            shutil.rmtree(ck)
    assert main(["train", "--resume", "--out", str(run)]) == 2
    assert "stopped before its first checkpoint" in _error_line(capsys)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1]  # history kept


# --------------------------------------------------------------------------------------
# One line, whatever failed


def test_a_yaml_error_in_the_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  steps: [1, 2\nmodel: x\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    line = _error_line(capsys)
    assert line.startswith("qae train: error: config file") and "not valid YAML: line" in line
    (tmp_path / "latin1.yaml").write_bytes(b"trainer:\n  steps: 3 # caf\xe9\n")
    assert main(["train", "--config", str(tmp_path / "latin1.yaml")]) == 2
    assert "latin1.yaml" in _error_line(capsys)


def test_os_errors_are_one_line_with_exit_status_1(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", *TINY, "--steps", "1", "--out", str(blocker / "run")]) == 1
    line = _error_line(capsys)
    assert line.startswith("qae train: error: ") and str(blocker / "run") in line
    if sys.platform.startswith("linux"):  # sysfs: nobody, root included, may write there
        assert main(["train", *TINY, "--steps", "1", "--out", "/sys/qae-test-run"]) == 1
        assert "/sys/qae-test-run" in _error_line(capsys)


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs /dev/full")
def test_a_full_disk_stops_the_run_in_one_line_with_the_resume_command(
    tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):  # the second checkpoint's state hits a full disk
        calls.append(f)
        if len(calls) < 2:
            return real(obj, f, *args, **kwargs)
        with open("/dev/full", "wb") as full:
            return real(obj, full, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    flags = [*TINY, "--steps", "3", "--log.checkpoint_every", "1", "--out", str(run)]
    assert main(["train", *flags]) == 1
    line = _error_line(capsys)
    assert line.startswith("qae train: error: No space left on device")
    assert "step 2 reached, last checkpoint at step 1" in line
    assert line.endswith(f"resume with: qae train --resume --out {run}")
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()  # space freed: the printed command finishes the run
    assert main(["train", "--resume", "--out", str(run)]) == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def test_ctrl_c_prints_the_step_reached_and_the_resume_command(tmp_path, capsys, monkeypatch):
    import qae.train.trainer

    real = qae.train.trainer.train_step

    def step_then_ctrl_c(step, *args, **kwargs):
        if step == 3:
            raise KeyboardInterrupt
        return real(step, *args, **kwargs)

    monkeypatch.setattr(qae.train.trainer, "train_step", step_then_ctrl_c)
    run = tmp_path / "run"
    flags = [*TINY, "--steps", "4", "--log.checkpoint_every", "2", "--out", str(run)]
    try:
        code = main(["train", *flags])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped `qae train` as a traceback")
    assert code == 130
    line = _error_line(capsys)
    assert line == (
        f"qae train: interrupted: step 2 reached, last checkpoint at step 2; "
        f"resume with: qae train --resume --out {run}"
    )


def test_eval_with_a_model_that_cannot_be_loaded_is_one_line(tmp_path, capsys):
    out = ["--out", str(tmp_path / "ev")]
    assert main(["eval", "--model", str(tmp_path / "no-such-model"), *EVAL, *out]) == 2
    line = _error_line(capsys)
    assert line.startswith("qae eval: error: --model") and "could not be loaded" in line
    empty = tmp_path / "empty-model"
    empty.mkdir()
    assert main(["eval", "--model", str(empty), *EVAL, *out]) == 2
    assert "could not be loaded" in _error_line(capsys)


# --------------------------------------------------------------------------------------
# Input bounds


def test_eval_response_budget_beyond_the_context_names_both_numbers(tmp_path, capsys):
    out = ["--out", str(tmp_path / "ev")]
    t0 = time.monotonic()
    assert main(["eval", "--model", "builtin", *EVAL, "--max-new-tokens", "1024", *out]) == 2
    line = _error_line(capsys)
    assert "max_new_tokens=1024" in line and "context of 64 tokens" in line
    assert time.monotonic() - t0 < 60


def test_train_response_budget_beyond_the_context_names_both_numbers(tmp_path, capsys):
    run = tmp_path / "run"
    flags = [*TINY, "--steps", "1", "--rollout.max_new_tokens", "64", "--out", str(run)]
    assert main(["train", *flags]) == 2
    line = _error_line(capsys)
    assert "rollout.max_new_tokens=64" in line and "context of 64 tokens" in line
    assert not (run / "metrics.jsonl").exists()


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_rejects_a_prompt_longer_than_the_context_at_load_time(tmp_path, capsys):
    short = {"problem": "1+2=", "answer": "3"}
    data = _jsonl(tmp_path / "train.jsonl", [short, {"problem": "1+" * 100 + "1=", "answer": "2"}])
    val = _jsonl(tmp_path / "val.jsonl", [short])
    flags = [*TINY, "--steps", "1", "--data.reward", "arithmetic"]
    flags += ["--rollout.max_new_tokens", "4", "--data.val", str(val)]
    assert main(["train", *flags, "--data", str(data), "--out", str(tmp_path / "a")]) == 2
    line = _error_line(capsys)
    assert f"data.train={str(data)!r} row 1 (id '1')" in line
    assert "the prompt is 202 tokens but only 60 fit" in line
    assert "context is 64 tokens" in line and "rollout.max_new_tokens=4" in line
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    flags[flags.index(str(val))] = str(data)  # the same row as a validation prompt
    assert main(["train", *flags, "--data", str(val), "--out", str(tmp_path / "b")]) == 2
    assert f"data.val={str(data)!r} row 1" in _error_line(capsys)


def test_a_prompt_of_millions_of_characters_is_rejected_in_seconds():
    from qae.eval.bounds import check_prompt_lengths
    from qae.train.trainer import load_policy

    _, tokenizer = load_policy("builtin", torch.device("cpu"))
    huge = "1+2=" * 2_500_000  # 10 MB: tokenizing all of it takes half a minute
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="row 0: the prompt is \\d+ or more tokens but only 59"):
        check_prompt_lengths(
            [("row 0", huge)],
            tokenizer,
            limit=59,
            context=(64, "max_position_embeddings"),
            budget="rollout.max_new_tokens=5",
        )
    assert time.monotonic() - t0 < 5


def test_regimes_caps_the_group_size_with_a_clear_message(capsys):
    proc = subprocess.run(
        [sys.executable, "-m", "qae.cli", "regimes", "-G", "100000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line == (
        "qae regimes: error: --group-size must be in [2, 1024] (one line per count of "
        "correct responses), got 100000"
    )
    assert main(["regimes", "-G", "1"]) == 2
    assert _error_line(capsys).startswith("qae regimes: error: --group-size")
    assert main(["regimes", "-G", "1024"]) == 0


@pytest.mark.parametrize("k", ["2", "0", "1", "-0.5"])
def test_regimes_rejects_a_bad_k_before_printing_anything(k, capsys):
    assert main(["regimes", "-G", "8", "--k", k]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no title or half a table before the error
    lines = [x for x in captured.err.splitlines() if x.strip()]
    assert lines == [f"qae regimes: error: --k must be a quantile level in (0, 1), got {float(k)}"]
    assert main(["regimes", "-G", "8", "--k", "0.4"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3 + 9  # title, header, rule, 0..8


# --------------------------------------------------------------------------------------
# Data rows


def test_data_errors_name_the_file_and_the_row(tmp_path):
    empty = _jsonl(tmp_path / "empty.jsonl", [{"problem": "1+1=", "answer": "2"}] * 2)
    empty.write_text(empty.read_text() + json.dumps({"problem": "2+2=", "answer": ""}) + "\n")
    with pytest.raises(ValueError, match=f"{empty}: row 2 has an empty answer"):
        load_prompts(empty)
    missing = _jsonl(tmp_path / "missing.jsonl", [{"problem": "1+1=", "answer": "2"}, {"q": "x"}])
    with pytest.raises(ValueError, match=f"{missing}: row 1: no problem field found"):
        load_prompts(missing)
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(
        b'{"problem": "1+1=", "answer": "2"}\n{"problem": "caf\xe9", "answer": "1"}\n'
    )
    with pytest.raises(ValueError, match=f"{latin}:2: not UTF-8"):
        load_prompts(latin)
    (tmp_path / "latin1.json").write_bytes(b'[{"problem": "caf\xe9", "answer": "1"}]')
    with pytest.raises(ValueError, match="latin1.json: not UTF-8"):
        load_prompts(tmp_path / "latin1.json")
