"""Training checkpoints with orbax: one step holds everything a resumed run needs.

    manager = Checkpointer(workdir / "checkpoints", keep=3)
    manager.save(step, params, opt_state, config=config, tokenizer=tokenizer, data_iterator=it, run=identity)
    restored = manager.restore_latest(abstract_params, abstract_opt_state, data_iterator=it)

Each step directory holds `state` (params, optimizer state, step), `config` (the
ConfigDict as JSON), `tokenizer` (its rank file and metadata as JSON), `run` (what
identifies the run beyond the config: stage, process count), when a grain
iterator is given, `data` (its position, through grain's orbax handler), and when
the stage keeps state of its own (RLHF's monitor), `stage` (that state as JSON), so
it always belongs to the step it is saved with. Writes are
asynchronous and atomic: orbax writes into a temporary directory and renames it
when complete, so a killed run leaves only whole steps behind. A step that is
whole on disk but unreadable (a truncated file) is reported and skipped in favour
of the one before it; a failed write raises at the next save or `wait`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from llm.tokenizer import Tokenizer

@dataclasses.dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any
    config: ml_collections.ConfigDict
    tokenizer: Tokenizer
    stage_state: dict | None = None  # the stage's own state at this step, when it keeps one


class Checkpointer:
    """An orbax `CheckpointManager` over the items of a training step."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, async_writes: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_writes, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def save(self, step: int, params: Any, opt_state: Any, *, config: ml_collections.ConfigDict,
             tokenizer: Tokenizer, data_iterator: Any = None, run: dict | None = None,
             stage_state: dict | None = None) -> None:
        """Starts writing `step` in the background; the previous write is finished (and checked) first."""
        items = {
            "state": ocp.args.StandardSave({"params": params, "opt_state": opt_state, "step": step}),
            "config": ocp.args.JsonSave(config.to_dict()),
            "tokenizer": ocp.args.JsonSave(_tokenizer_to_json(tokenizer)),
            "run": ocp.args.JsonSave(run or {}),
        }
        if data_iterator is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if stage_state is not None:
            items["stage"] = ocp.args.JsonSave(stage_state)
        self.wait()  # orbax finishes the previous write before it starts this one anyway; this also checks it
        if not self.manager.save(step, args=ocp.args.Composite(**items), force=True):
            raise RuntimeError(f"checkpoint step {step} was not written to {self.manager.directory}")

    def wait(self) -> None:
        """Blocks until the last write is finished; raises if it failed."""
        self.manager.wait_until_finished()
        self.manager.check_for_errors()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, abstract_params: Any, abstract_opt_state: Any, data_iterator: Any = None) -> Restored | None:
        """The newest readable step, restored onto the shardings of the abstract state; None if there is none.

        `abstract_*` are pytrees of `jax.ShapeDtypeStruct` with shardings (from
        `jax.eval_shape` and the state shardings), so every device reads only its shard.
        `data_iterator`, when given, is moved to the saved position in place.
        """
        self.wait()
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                return self._restore(step, abstract_params, abstract_opt_state, data_iterator)
            except Exception as e:  # a step orbax finalised but cannot read: say so, use the previous one
                print(f"checkpoint step {step} is unreadable ({type(e).__name__}: {e}); trying an earlier step")
        if steps:  # starting over would write new steps beside (and eventually over) the damaged ones
            raise RuntimeError(f"no checkpoint step in {self.manager.directory} is readable (steps {steps}); "
                               f"move the directory aside to start afresh")
        return None

    def saved_run(self) -> tuple[int, ml_collections.ConfigDict, dict] | None:
        """(step, config, run identity) of the newest step whose config reads; None without one.

        Cheap (two small JSON files): the driver compares them with the current run
        before it writes anything.
        """
        self.wait()
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                items = {"config": ocp.args.JsonRestore()}
                if os.path.isdir(os.path.join(os.fspath(self.manager.directory), str(step), "run")):
                    items["run"] = ocp.args.JsonRestore()
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception:  # unreadable: restore_latest reports it and falls back
                continue
            config = ml_collections.ConfigDict(_lists_to_tuples(restored["config"]))
            return step, config, dict(restored.get("run") or {})
        return None

    def restore_tokenizer(self, step: int) -> Tokenizer:
        restored = self.manager.restore(step, args=ocp.args.Composite(tokenizer=ocp.args.JsonRestore()))
        return _tokenizer_from_json(restored["tokenizer"])

    def restore_params(self, abstract_params: Any) -> tuple[int, Any]:
        """(step, params) of the newest readable step, without its optimizer or data state (`init_from`)."""
        self.wait()
        for step in sorted(self.manager.all_steps(), reverse=True):
            item = {"params": abstract_params}
            path = os.path.join(os.fspath(self.manager.directory), str(step), "state")
            try:
                with ocp.PyTreeCheckpointer() as reader:
                    restored = reader.restore(path, args=ocp.args.PyTreeRestore(
                        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
                return step, restored["params"]
            except Exception as e:
                print(f"checkpoint step {step} is unreadable ({type(e).__name__}: {e}); trying an earlier step")
        raise FileNotFoundError(f"no readable checkpoint step in {self.manager.directory}")

    def _restore(self, step: int, abstract_params: Any, abstract_opt_state: Any, data_iterator: Any) -> Restored:
        abstract = {"params": abstract_params, "opt_state": abstract_opt_state,
                    "step": jax.ShapeDtypeStruct((), jax.numpy.int32)}
        items = {
            "state": ocp.args.StandardRestore(abstract),
            "config": ocp.args.JsonRestore(),
            "tokenizer": ocp.args.JsonRestore(),
        }
        if data_iterator is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        if os.path.isdir(os.path.join(os.fspath(self.manager.directory), str(step), "stage")):
            items["stage"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = restored["state"]
        return Restored(
            step=int(state["step"]), params=state["params"], opt_state=state["opt_state"],
            config=ml_collections.ConfigDict(_lists_to_tuples(restored["config"])),
            tokenizer=_tokenizer_from_json(restored["tokenizer"]),
            stage_state=restored.get("stage"),
        )

    def close(self) -> None:
        self.manager.close()


def _lists_to_tuples(tree: Any) -> Any:
    """JSON has no tuples; configs use them (mesh rules), never lists."""
    if isinstance(tree, dict):
        return {k: _lists_to_tuples(v) for k, v in tree.items()}
    return tuple(_lists_to_tuples(v) for v in tree) if isinstance(tree, list) else tree


def _tokenizer_to_json(tokenizer: Tokenizer) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "tokenizer.tiktoken")
        tokenizer.save(path)
        with open(path) as f, open(path.replace(".tiktoken", ".json")) as g:
            return {"ranks": f.read(), "meta": json.load(g)}


def _tokenizer_from_json(blob: dict) -> Tokenizer:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "tokenizer.tiktoken")
        with open(path, "w") as f:
            f.write(blob["ranks"])
        with open(path.replace(".tiktoken", ".json"), "w") as f:
            json.dump(blob["meta"], f)
        return Tokenizer.load(path)
