"""Test setup: 8 fake CPU devices, so every sharding path runs for real.

The flags must be set before JAX initialises its backends, which is why this
runs at import time of the conftest, ahead of any test module.
"""

import os

os.environ["JAX_PLATFORMS"] = "cpu"


import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
