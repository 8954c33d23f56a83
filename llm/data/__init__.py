"""Pretraining data: FineWeb-schema sources and the grain pipeline that tokenizes, packs and batches them."""

from llm.data.pipeline import dropped_rows, make_pipeline
from llm.data.prepare import prepare
from llm.data.sources import open_source
from llm.errors import DataError

__all__ = ["DataError", "dropped_rows", "make_pipeline", "open_source", "prepare"]
