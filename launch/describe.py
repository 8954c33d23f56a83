"""Shows a config's model without allocating it: parameter count, shapes and shardings.

    python -m launch.describe --config configs/gpt2_124m.py [--config.mesh.fsdp=8 ...]

Everything is computed with `jax.eval_shape`, so an 8B model is described in
seconds on a laptop; the mesh is built over whatever devices JAX sees.
"""

import functools
import sys

import jax

from launch import cli
from llm import model, sharding
from llm.config import config_from_argv, model_config


def main(argv: list[str]) -> None:
    with cli.user_input():
        config, rest = config_from_argv(argv)
        if rest:
            raise cli.UserError(f"unknown arguments: {rest}")
        cfg = model_config(config)
        mesh = sharding.make_mesh(config.mesh)
        rules = dict(config.sharding)
        sharding.check_rules(rules)
    shapes = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.key(config.seed))
    shardings = sharding.param_shardings(model.param_axes(cfg), shapes, mesh, rules)
    print(cfg)
    print(f"mesh {dict(mesh.shape)} over {len(jax.devices())} {jax.default_backend()} device(s)")
    rows = jax.tree_util.tree_leaves_with_path(jax.tree.map(lambda s, sh: (s.shape, sh.spec), shapes, shardings),
                                               is_leaf=lambda x: isinstance(x, tuple))
    for path, (shape, spec) in rows:
        print(f"  {jax.tree_util.keystr(path):40s} {str(shape):28s} {spec}")
    print(f"parameters: {model.count_params(cfg):,}")


if __name__ == "__main__":
    cli.main(main, sys.argv[1:])
