"""A user's mistake on any `launch` command is one `error: ...` line and exit status 2, before any work; a bug keeps its traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import cli, describe, export, interrogate, prepare, stage_flags
from launch import eval as launch_eval
from llm.train.loop import ResumeMismatch

REPO = Path(__file__).parents[1]
TINY = str(REPO / "configs" / "tiny.py")


def _mistake(capsys, entry, *args) -> str:
    """Runs `cli.main(entry, *args)`, which must exit 2 with one `error:` line; returns that line's message."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(entry, *args)
    assert exit_.value.code == cli.EXIT_MISTAKE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("error: ") == 1 and "Traceback" not in err, err
    return err.removeprefix("error: ").strip()


@pytest.mark.slow
def test_commands_print_one_error_line_and_no_traceback(tmp_path):
    # As a new user runs them: a real `python -m`, so the exit status and stderr are the terminal's.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("LAUNCH_TRACEBACK", None)
    (tmp_path / "a_file").write_text("")
    commands = {
        "did you mean 'train.steps'": ["launch.train", "--config", TINY, "--workdir", str(tmp_path / "w"),
                                       "--config.train.stepz=3"],
        "nope holds neither a release": ["launch.export", "--checkpoint", str(tmp_path / "nope"), "--format", "gguf",
                                          "--out", str(tmp_path / "a.gguf")],
        f"{tmp_path / 'a_file'} is a file": ["launch.eval", "--checkpoint", str(tmp_path / "nope"),
                                             "--out", str(tmp_path / "a_file" / "cards")],
    }
    running = {wanted: subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for wanted, argv in commands.items()}
    for wanted, process in running.items():
        _, err = process.communicate(timeout=120)
        assert process.returncode == 2, (wanted, err)
        assert err.startswith("error: ") and wanted in err and "Traceback" not in err, err
        assert err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # nothing was written


@pytest.fixture
def no_cluster(monkeypatch):
    monkeypatch.setattr(stage_flags, "initialize_distributed", lambda: None)


def _train(*argv):
    def never(config, workdir):
        raise AssertionError("the stage ran")

    return stage_flags.run_stage, "python -m launch.train", never, list(argv)


@pytest.mark.parametrize("override, wanted", [
    ("--config.train.stepz=3", "unknown config key 'train.stepz': train has no field 'stepz'; did you mean 'train.steps'?"),
    ("--config.train.steps=abc", "--config.train.steps=abc: invalid literal for int()"),
    ("--config.train.steps", "--config.train.steps needs a value"),
    ("--config.model.n_head=5", "model.n_embd=128 is not divisible by model.n_head=5"),
    ("--config.mesh.fsdp=3", "cannot fill 8 devices"),
    ("--config.optimizer.schedule=linear", "optimizer.schedule must be 'cosine' or 'wsd', got 'linear'"),
    ("--config.sharding.embed=('model',)", "names unknown mesh axes ['model']"),
])
def test_stage_config_mistakes_fail_before_the_workdir_is_made(override, wanted, tmp_path, capsys, no_cluster):
    message = _mistake(capsys, *_train("--config", TINY, "--workdir", str(tmp_path / "w"), override))
    assert wanted in message
    assert not (tmp_path / "w").exists()


def test_missing_config_and_unwritable_workdir_name_the_path(tmp_path, capsys, no_cluster):
    assert _mistake(capsys, *_train("--config", str(tmp_path / "nonexistent.py"), "--workdir", str(tmp_path))) == (
        f"config file not found: {tmp_path / 'nonexistent.py'}")
    (tmp_path / "a_file").write_text("")
    message = _mistake(capsys, *_train("--config", TINY, "--workdir", str(tmp_path / "a_file" / "run")))
    assert message == f"--workdir {tmp_path / 'a_file' / 'run'}: cannot be created, {tmp_path / 'a_file'} is a file"
    assert _mistake(capsys, *_train("--config", TINY, "--workdir", str(tmp_path / "a_file"))) == (
        f"--workdir {tmp_path / 'a_file'}: is a file, not a directory")
    if os.path.isdir("/proc/self"):  # a folder no one, root included, can create anything in
        assert _mistake(capsys, *_train("--config", TINY, "--workdir", "/proc/forbidden")) == (
            "--workdir /proc/forbidden: cannot be written in /proc (its file system takes no new files)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_read_only_workdir_is_refused(tmp_path, capsys, no_cluster):
    (tmp_path / "ro").mkdir(mode=0o555)
    message = _mistake(capsys, *_train("--config", TINY, "--workdir", str(tmp_path / "ro" / "run")))
    assert message.startswith(f"--workdir {tmp_path / 'ro' / 'run'}: cannot be written in {tmp_path / 'ro'}")


def test_another_runs_checkpoints_and_a_bug(capsys, monkeypatch):
    def mismatch():
        raise ResumeMismatch("runs/x holds checkpoints of a different run\n  model.n_layer: 4 there, 2 here")

    assert _mistake(capsys, mismatch) == "runs/x holds checkpoints of a different run\n  model.n_layer: 4 there, 2 here"
    monkeypatch.setenv("LAUNCH_TRACEBACK", "1")
    with pytest.raises(ResumeMismatch):  # the traceback of a mistake, on request
        cli.main(mismatch)
    monkeypatch.delenv("LAUNCH_TRACEBACK")

    def bug():
        {}["missing"]

    def value_bug():
        raise ValueError("a shape bug deep in a stage")

    with pytest.raises(KeyError):
        cli.main(bug)
    with pytest.raises(ValueError, match="shape bug"):  # ValueError is a mistake only inside cli.user_input()
        cli.main(value_bug)
    with pytest.raises(SystemExit) as exit_:
        cli.main(lambda: 0)
    assert exit_.value.code == 0


@pytest.fixture
def no_load(monkeypatch):
    """Any loading of a model fails the test: the mistake must be found first."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    for module in (export, launch_eval, interrogate):
        monkeypatch.setattr(module, "load_release", load)


def test_export_checks_out_before_loading(tmp_path, capsys, no_load):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_dir").mkdir()
    base = ["--checkpoint", str(tmp_path / "release")]
    assert _mistake(capsys, export.main, [*base, "--format", "gguf", "--out", str(tmp_path / "a_dir")]) == (
        f"--out {tmp_path / 'a_dir'}: is a directory; name the file to write")
    assert _mistake(capsys, export.main, [*base, "--format", "gguf", "--out", str(tmp_path / "a_file" / "x.gguf")]) == (
        f"--out {tmp_path / 'a_file' / 'x.gguf'}: cannot be created, {tmp_path / 'a_file'} is a file")
    assert _mistake(capsys, export.main, [*base, "--format", "hf", "--out", str(tmp_path / "a_file")]) == (
        f"--out {tmp_path / 'a_file'}: is a file, not a directory")


def test_export_of_a_missing_checkpoint_names_it(tmp_path, capsys):
    assert _mistake(capsys, export.main, ["--checkpoint", str(tmp_path / "nope"), "--format", "gguf",
                                          "--out", str(tmp_path / "a.gguf")]).startswith(
        f"{tmp_path / 'nope'} holds neither a release")
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    assert "not a GGUF file" in _mistake(capsys, export.main, ["--checkpoint", str(not_gguf), "--format", "hf",
                                                               "--out", str(tmp_path / "hf")])
    assert sorted(os.listdir(tmp_path)) == ["fake.gguf"]


def test_eval_mistakes_fail_before_loading(tmp_path, capsys, no_load):
    base = ["--checkpoint", str(tmp_path / "release")]
    assert _mistake(capsys, launch_eval.main, [*base, "--tasks", "arc_easy,bogus"]).startswith(
        "unknown task(s) ['bogus']; choose from ['arc_challenge'")
    assert _mistake(capsys, launch_eval.main, [*base, "--tasks", "gsm8k", "--n", "2", "--k", "1,4"]) == (
        "--k 1,4: pass@k needs 1 <= k <= --n (the samples per problem, 2)")
    assert _mistake(capsys, launch_eval.main, [*base, "--k", "one"]) == (
        "--k 'one': expected comma-separated numbers of samples, e.g. 1,4")
    (tmp_path / "a_file").write_text("")
    assert _mistake(capsys, launch_eval.main, [*base, "--out", str(tmp_path / "a_file")]) == (
        f"--out {tmp_path / 'a_file'}: is a file, not a directory")


def test_the_other_commands_report_their_mistakes(tmp_path, capsys, no_load):
    assert _mistake(capsys, describe.main, ["--config", TINY, "--config.model.n_kv_head=3"]) == (
        "model.n_head=4 is not divisible by model.n_kv_head=3")
    assert _mistake(capsys, describe.main, ["--config", TINY, "--workdir", "x"]) == (
        "unknown arguments: ['--workdir', 'x']")
    (tmp_path / "a_file").write_text("")
    assert _mistake(capsys, prepare.main, ["--source", "sample", "--out", str(tmp_path / "a_file")]) == (
        f"--out {tmp_path / 'a_file'}: is a file, not a directory")
    assert _mistake(capsys, prepare.main, ["--source", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "d")]
                    ).startswith("no data files at")
    assert _mistake(capsys, interrogate.main, ["--checkpoint", "x", "--questions", "q.jsonl",
                                               "--out", str(tmp_path / "a_file" / "c.jsonl")]) == (
        f"--out {tmp_path / 'a_file' / 'c.jsonl'}: cannot be created, {tmp_path / 'a_file'} is a file")
