"""Checkpoints: sharded save/restore of a whole training step, keep-N, and falling back past a damaged step."""

import functools
import os

import jax
import numpy as np
import pytest

from llm import model, sharding
from llm.checkpoint import Checkpointer
from llm.config import ModelConfig, base_config
from llm.tokenizer import Tokenizer
from llm.train.optimizer import make_optimizer
from llm.train.step import StateLayout, init_train_state

CFG = ModelConfig(family="llama", vocab_size=128, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, mlp_dim=128,
                  max_seq_len=32)


def _setup():
    config = base_config("tiny", sharding="fsdp_tp")
    optimizer = make_optimizer(config.optimizer, model.param_axes(CFG))
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    init = functools.partial(model.init_params, CFG)
    layout = StateLayout.create(model.param_axes(CFG), jax.eval_shape(init, jax.random.key(0)), optimizer, mesh,
                                dict(config.sharding))
    params, opt_state = init_train_state(init, optimizer, layout, jax.random.key(0))
    return config, params, opt_state, layout.abstract()


def _largest_file(directory):
    files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
    return max(files, key=os.path.getsize)


def test_sharded_state_config_and_tokenizer_round_trip_and_keep_n(tmp_path):
    config, params, opt_state, (abstract_params, abstract_opt) = _setup()
    tokenizer = Tokenizer.load("gpt2")
    checkpointer = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        shifted = jax.tree.map(lambda x: x + step, params)
        checkpointer.save(step, shifted, opt_state, config=config, tokenizer=tokenizer)
    restored = checkpointer.restore_latest(abstract_params, abstract_opt)
    assert restored.step == 3 and sorted(checkpointer.manager.all_steps()) == [2, 3]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b + 3), restored.params, params)
    assert restored.params["blocks"]["attn"]["q"].sharding == params["blocks"]["attn"]["q"].sharding
    assert restored.config.to_dict() == config.to_dict()
    assert restored.tokenizer.encode("Checkpoint <|im_end|>") == tokenizer.encode("Checkpoint <|im_end|>")
    assert restored.tokenizer.token_id("<|im_end|>") == tokenizer.token_id("<|im_end|>")
    checkpointer.close()


def test_a_damaged_newest_step_falls_back_to_the_previous_one(tmp_path, capsys):
    config, params, opt_state, (abstract_params, abstract_opt) = _setup()
    checkpointer = Checkpointer(tmp_path, keep=3)
    checkpointer.save(1, params, opt_state, config=config, tokenizer=Tokenizer.load("gpt2"))
    checkpointer.save(2, jax.tree.map(lambda x: x + 1, params), opt_state, config=config,
                      tokenizer=Tokenizer.load("gpt2"))
    checkpointer.wait()
    victim = _largest_file(tmp_path / "2" / "state")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    restored = checkpointer.restore_latest(abstract_params, abstract_opt)
    assert restored.step == 1
    jax.tree.map(np.testing.assert_array_equal, restored.params, params)
    assert "checkpoint step 2 is unreadable" in capsys.readouterr().out
    checkpointer.close()


def test_when_every_step_is_damaged_restore_refuses_to_start_over(tmp_path):
    config, params, opt_state, (abstract_params, abstract_opt) = _setup()
    checkpointer = Checkpointer(tmp_path, keep=3)
    checkpointer.save(1, params, opt_state, config=config, tokenizer=Tokenizer.load("gpt2"))
    checkpointer.wait()
    victim = _largest_file(tmp_path / "1" / "state")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(RuntimeError, match="no checkpoint step .* is readable"):
        checkpointer.restore_latest(abstract_params, abstract_opt)
    checkpointer.close()


def test_saving_a_step_twice_is_an_error(tmp_path):
    config, params, opt_state, _ = _setup()
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(2, params, opt_state, config=config, tokenizer=Tokenizer.load("gpt2"))
    with pytest.raises(Exception, match="step 2 already exists"):
        checkpointer.save(2, params, opt_state, config=config, tokenizer=Tokenizer.load("gpt2"))
    checkpointer.close()


def test_params_alone_restore_from_a_whole_training_step(tmp_path):
    config, params, opt_state, (abstract_params, _) = _setup()
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(3, params, opt_state, config=config, tokenizer=Tokenizer.load("gpt2"), run={"stage": "x"})
    step, restored = checkpointer.restore_params(abstract_params)
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, restored, params)
    saved_step, saved_config, run = checkpointer.saved_run()
    assert (saved_step, saved_config.to_dict(), run) == (3, config.to_dict(), {"stage": "x"})
    checkpointer.close()


def test_no_checkpoint_yet_restores_nothing(tmp_path):
    _, _, _, (abstract_params, abstract_opt) = _setup()
    assert Checkpointer(tmp_path / "empty").restore_latest(abstract_params, abstract_opt) is None
