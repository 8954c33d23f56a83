"""The driver end to end with the pretraining stage on the bundled sample.

Learning, kill -9 resume, refusing another run's checkpoints, init_from, the NaN
guard, and two processes with parameters sharded across them.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llm.config import load_config
from llm.release import load_release
from llm.stages import pretrain
from llm.train.losses import lm_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_RUN = [
    "--config.model.vocab_size=1024", "--config.data.tokenizer=train:1024", "--config.data.seq_len=64",
    "--config.data.batch_size=8", "--config.model.n_layer=2", "--config.train.log_every=1",
    "--config.train.eval_batches=2", "--config.train.sample_every=0", "--config.optimizer.warmup_steps=3",
]


def _config(*overrides):
    return load_config(os.path.join(ROOT, "configs", "tiny.py"), [*SMALL_RUN, *overrides])


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow
def test_tiny_run_learns_leaves_its_outputs_and_starts_another_stage(tmp_path):
    summary = pretrain.run(_config("--config.train.steps=40", "--config.train.eval_every=20"), str(tmp_path / "a"))
    # From the untrained model's uniform guess to the unigram statistics and beyond.
    assert summary.evals["val_bpb"] < 0.9 * summary.first_evals["val_bpb"], summary
    for name in ("metrics.jsonl", "loss.png", "report.md", "tokenizer.tiktoken", "release/model.safetensors",
                 "checkpoints/40"):
        assert os.path.exists(tmp_path / "a" / name), name
    assert [step for step, _ in _losses(tmp_path / "a")] == list(range(1, 41))

    # init_from a release, and from a training workdir (its newest checkpoint: the same params):
    # the new run's first loss is the loss of those params on its first batch.
    cfg, params, _ = load_release(str(tmp_path / "a" / "release"))
    for source in ("a/release", "a"):
        config = _config("--config.train.steps=1", "--config.train.eval_every=1000",
                         f"--config.init_from={tmp_path / source}", "--config.seed=3")
        first_batch = next(pretrain.build(config, str(tmp_path / "probe")).batches)
        loss, count, _ = lm_loss(cfg, params, first_batch)
        workdir = tmp_path / ("from_" + source.replace("/", "_"))
        pretrain.run(config, str(workdir))
        [(_, first_loss)] = _losses(workdir)
        assert first_loss == pytest.approx(float(loss / count), rel=1e-5), source


def _launch(workdir, steps, *overrides):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "launch.train", "--config", "configs/tiny.py", "--workdir", str(workdir),
            *SMALL_RUN, f"--config.train.steps={steps}", "--config.train.checkpoint_every=4",
            "--config.train.eval_every=1000", *overrides]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_9_and_resume_reproduces_the_uninterrupted_losses_exactly(tmp_path):
    reference = _launch(tmp_path / "reference", 16)
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    expected = dict(_losses(tmp_path / "reference"))

    killed = _launch(tmp_path / "resumed", 16)
    deadline = time.time() + 600
    while not (tmp_path / "resumed" / "checkpoints" / "4").exists() or len(_losses(tmp_path / "resumed")) < 6:
        assert killed.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    logged_before_kill = len(_losses(tmp_path / "resumed"))
    resumed = _launch(tmp_path / "resumed", 16)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]

    resumed_from = int(out.split("resumed from step ")[1].split()[0])
    assert resumed_from in (4, 8, 12) and resumed_from < logged_before_kill
    losses = _losses(tmp_path / "resumed")
    # Every step has the loss the uninterrupted run had: bit-identical on CPU (same data
    # order, same state), and is logged once (the replayed steps' old rows are dropped).
    assert [step for step, _ in losses] == list(range(1, 17))
    for step, loss in losses:
        assert loss == expected[step], (step, loss, expected[step])

    # The same workdir with another model: refused before anything is written, every file untouched.
    before = _snapshot(tmp_path / "resumed")
    changed = _launch(tmp_path / "resumed", 16, "--config.model.n_layer=3")
    out, err = changed.communicate(timeout=600)
    assert changed.returncode != 0
    assert "model.n_layer: 2 there, 3 here" in err and "Use a new --workdir" in err, err[-3000:]
    assert _snapshot(tmp_path / "resumed") == before


def _snapshot(directory):
    """Every file under `directory` with its bytes."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                files[os.path.relpath(os.path.join(root, name), directory)] = f.read()
    return files


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    config = _config("--config.train.steps=60", "--config.train.checkpoint_every=1", "--config.train.eval_every=1000",
                     "--config.optimizer.learning_rate=1e6", "--config.optimizer.grad_clip=0.0",
                     "--config.optimizer.warmup_steps=0")
    with pytest.raises(FloatingPointError, match=r"(loss is (nan|inf)|non-finite parameters) at step \d+; stopping"):
        pretrain.run(config, str(tmp_path))
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
    last = manager.latest_step()
    assert last is not None
    restored = manager.restore(last, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored["state"]["params"]))
    assert all(math.isfinite(loss) for _, loss in _losses(tmp_path))


def _launch_processes(workdir, tokenizer, n_processes, devices_each, port, steps=6):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices_each), "PYTHONUNBUFFERED": "1",
           "JAX_HEARTBEAT_TIMEOUT_SECONDS": "10"}
    # Parameters FSDP-sharded over every device: with two processes, each holds only half of each.
    args = [sys.executable, "-m", "launch.train", "--config", "configs/tiny.py", "--workdir", str(workdir),
            *SMALL_RUN, f"--config.data.tokenizer={tokenizer}", f"--config.train.steps={steps}",
            "--config.data.num_shards=2", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
            f"--config.train.sample_every={steps}", "--config.train.sample_tokens=4",
            "--config.train.checkpoint_every=1000", "--config.train.eval_every=1000"]
    procs = []
    for i in range(n_processes):
        dist = {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(n_processes),
                "JAX_PROCESS_ID": str(i)} if n_processes > 1 else {}
        procs.append(subprocess.Popen(args, cwd=ROOT, env={**env, **dist}, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _tokenizer_file(tmp_path):
    from llm.data.sources import open_source, training_texts
    from llm.bpe import train_bpe

    path = str(tmp_path / "tok.tiktoken")
    train_bpe(training_texts(open_source("sample"), 0.01), 1024, progress=False).save(path)
    return path


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_devices(tmp_path):
    import portpicker

    # Each run trains its BPE (deterministic); of the two processes only process 0 trains it, the other receives it.
    [single] = _launch_processes(tmp_path / "one", "train:1024", 1, 8, None)
    assert single.wait(timeout=600) == 0, single.stderr.read()[-3000:]
    pair = _launch_processes(tmp_path / "two", "train:1024", 2, 4, portpicker.pick_unused_port())
    outputs = [proc.communicate(timeout=600) for proc in pair]
    for proc, (_, err) in zip(pair, outputs):
        assert proc.returncode == 0, err[-3000:]
    assert "| sample | 'The" in outputs[0][0]  # samples from parameters gathered across the processes
    assert "bpe: reading" in outputs[0][1] and "bpe: reading" not in outputs[1][1]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in two] == list(range(1, 7))
    np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=1e-5)
    # The release gathered the sharded parameters whole, and it loads and samples.
    cfg, params, tokenizer = load_release(str(tmp_path / "two" / "release"))
    _, reference, _ = load_release(str(tmp_path / "one" / "release"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, reference)
    [text] = pretrain.sample_texts(cfg, params, tokenizer, ["The"], 8)
    assert text.startswith("The") and len(text) > 3


@pytest.mark.slow
def test_when_one_process_dies_the_other_exits_with_an_error(tmp_path):
    import portpicker

    survivor, victim = _launch_processes(tmp_path / "run", _tokenizer_file(tmp_path), 2, 4,
                                         portpicker.pick_unused_port(), steps=100_000)
    deadline = time.time() + 300
    while not (tmp_path / "run" / "metrics.jsonl").exists() or len(_losses(tmp_path / "run")) < 3:
        assert survivor.poll() is None and victim.poll() is None and time.time() < deadline
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    try:
        code = survivor.wait(timeout=120)  # heartbeat timeout 10 s, then the runtime aborts
    except subprocess.TimeoutExpired:
        survivor.kill()
        pytest.fail("the surviving process hung after its peer died")
    assert code != 0


def test_the_resume_identity_names_each_field_of_a_mixture_and_survives_a_checkpoint():
    from llm.checkpoint import _lists_to_tuples
    from llm.train.loop import run_identity

    config = load_config(os.path.join(ROOT, "configs", "sft_tiny.py"))
    saved = type(config)(_lists_to_tuples(json.loads(json.dumps(config.to_dict()))))  # as a checkpoint keeps it
    assert run_identity("sft", saved) == run_identity("sft", config)
    changed = load_config(os.path.join(ROOT, "configs", "sft_tiny.py"), ["--config.data.sources.oasst.epochs=3"])
    ours, theirs = run_identity("sft", changed), run_identity("sft", config)
    assert [k for k in ours if ours[k] != theirs[k]] == ["data.sources.oasst.epochs"]
    assert run_identity("pretrain", config)["stage"] != run_identity("sft", config)["stage"]
