"""One short module per training stage, each a `build(config, workdir) -> Stage` over the shared driver."""
