"""The blocks the project adds to datatrove's FineWeb pipeline (Penedo et al. 2024, `examples/fineweb.py`).

Every filter, the extractor and the deduplication are datatrove's own; these blocks only make the
recipe run offline and count what it skips:

- `CountingWarcReader`: datatrove's `WarcReader` silently drops non-HTML, binary and undecodable
  responses and crashes on a truncated gzip member; this one counts each skip by reason (a stat of
  the reader, so it reaches `stats.json`) and stops reading a truncated file at its last whole record.
  It decodes with the HTTP header's charset, then charset-normalizer (datatrove uses cchardet, which
  has no wheel for every Python): a Latin-1 page is kept, not dropped.
- `OfflineURLFilter`: tldextract with its bundled public-suffix snapshot (no fetch).
- `LangIdPy3`: py3langid (its model ships in the wheel) behind datatrove's `LID` interface;
  `FastTextFile` is fastText on a local model file (FineWeb's `lid.176.bin`, or the `.ftz`).
- `TokenCount`: token counts with `llm.tokenizer.Tokenizer` (FineWeb counts GPT-2 tokens; so does
  the default), not a hub download.
- `fineweb_row`: the parquet writer's adapter to FineWeb's nine columns.
"""

from __future__ import annotations

import re
import zlib

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import LanguageFilter, URLFilter
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.utils.lid import LID

HTML_TYPES = ("text/html", "application/xhtml+xml")
_CHARSET = re.compile(r"charset=[\"']?([\w.:-]+)", re.I)


class CountingWarcReader(BaseDiskReader):
    """WARC responses as documents (id, url, date from the record headers); every skip counted by reason."""

    name = "🕷 Warc (counted skips)"
    _requires_dependencies = ["warcio"]

    def __init__(self, data_folder, glob_pattern: str | None = None, paths_file=None, limit: int = -1,
                 default_metadata: dict | None = None):
        super().__init__(data_folder, paths_file=paths_file, limit=limit, glob_pattern=glob_pattern,
                         default_metadata=default_metadata)

    def read_file(self, filepath: str) -> DocumentsPipeline:
        from warcio.archiveiterator import ArchiveIterator
        from warcio.exceptions import ArchiveLoadFailed

        with self.data_folder.open(filepath, "rb") as f:
            records = iter(ArchiveIterator(f))
            index = 0
            while True:
                try:
                    record = next(records)
                    with self.track_time():
                        data, reason = _response(record)
                except StopIteration:
                    return
                except (ArchiveLoadFailed, EOFError, zlib.error, OSError, ValueError) as error:
                    # A truncated or corrupt record: nothing after it can be found again in a gzip stream.
                    self.stat_update("skipped_truncated_record")
                    self.stat_update(f"truncated_file:{filepath}")
                    del error
                    return
                index += 1
                if reason:
                    self.stat_update(f"skipped_{reason}")
                    continue
                document = self.get_document_from_dict(data, filepath, index)
                if document:
                    yield document


def _response(record) -> tuple[dict | None, str | None]:
    """(document fields, None) for an HTML response, else (None, why it is skipped)."""
    if record.rec_type not in ("response", "conversion"):
        return None, "not_response"  # warcinfo, request, metadata records: every WARC has them
    http_type = record.http_headers.get_header("Content-Type", "") if record.http_headers else ""
    mime = record.rec_headers.get_header("WARC-Identified-Payload-Type") or http_type.split(";")[0].strip()
    if record.rec_type == "response" and mime.lower() not in HTML_TYPES:
        return None, "not_html"
    payload = record.content_stream().read()
    if getattr(record.raw_stream, "limit", 0) > 0:
        # Fewer bytes than the record's Content-Length: the file ends inside this record.
        raise EOFError("truncated WARC record")
    if not payload.strip():
        return None, "empty_response"
    html = _decode(payload, http_type)
    if html is None:
        return None, "undecodable"
    headers = record.rec_headers
    return {"text": html, "id": headers.get_header("WARC-Record-ID"), "url": headers.get_header("WARC-Target-URI"),
            "date": headers.get_header("WARC-Date")}, None


def _decode(payload: bytes, content_type: str) -> str | None:
    """UTF-8, else the declared charset, else charset-normalizer's guess; None for binary."""
    if b"\x00" in payload[:4096]:
        return None  # NUL bytes: a binary body served as text/html
    declared = _CHARSET.search(content_type)
    for charset in ("utf-8", declared.group(1) if declared else None):
        if charset:
            try:
                return payload.decode(charset)
            except (UnicodeDecodeError, LookupError):
                pass
    from charset_normalizer import from_bytes

    best = from_bytes(payload).best()
    return str(best) if best is not None else None


class OfflineURLFilter(URLFilter):
    """datatrove's URL filter (its bundled blocklists) with tldextract's bundled suffix list: no network."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        from tldextract import TLDExtract

        self.tldextractor = TLDExtract(suffix_list_urls=(), cache_dir=None)


class LangIdPy3(LID):
    """py3langid's normalised probabilities as datatrove's LID scores (the model ships in the wheel)."""

    def __init__(self, languages: list[str] | None = None):
        super().__init__(languages)
        self._identifier = None

    def predict(self, doc: Document):
        if self._identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        ranked = self._identifier.rank(doc.text.replace("\n", " "))
        scores = {lang: float(p) for lang, p in ranked}
        best = max(scores.items(), key=lambda x: x[1])
        return best, ({lang: scores.get(lang, 0.0) for lang in self.languages} if self.languages else scores)


class FastTextFile(LID):
    """fastText language ID from a local model file (FineWeb's `lid.176.bin`); nothing is downloaded."""

    def __init__(self, path: str, languages: list[str] | None = None):
        super().__init__(languages)
        self.path, self._model = path, None

    def predict(self, doc: Document):
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(self.path)
        labels, probs = self._model.predict(doc.text.replace("\n", " "), k=-1)
        scores = {label.removeprefix("__label__"): float(p) for label, p in zip(labels, probs)}
        best = max(scores.items(), key=lambda x: x[1])
        return best, ({lang: scores.get(lang, 0.0) for lang in self.languages} if self.languages else scores)


class OfflineLanguageFilter(LanguageFilter):
    """datatrove's `LanguageFilter` (its keep rule and metadata) over a LID chosen by the recipe."""

    _requires_dependencies = []

    def __init__(self, model: LID, languages: list[str], language_threshold: float, exclusion_writer=None):
        # backend "ft176" only builds an unused FT176LID object (it downloads lazily); replaced below.
        super().__init__(languages=languages, language_threshold=language_threshold,
                         exclusion_writer=exclusion_writer)
        self.model = model

    def filter(self, doc: Document):
        return super().filter(doc) or (False, "not_" + "_".join(self.languages))


class TokenCount(PipelineStep):
    """`token_count` in each document's metadata, with the project's tokenizer (FineWeb: GPT-2 tokens)."""

    name = "📊 Token count (llm.tokenizer)"
    type = "🔢 - TOKENIZER"

    def __init__(self, tokenizer: str = "gpt2"):
        super().__init__()
        self.tokenizer_name, self._tokenizer = tokenizer, None

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from llm.tokenizer import Tokenizer

        self._tokenizer = self._tokenizer or Tokenizer.load(self.tokenizer_name)
        for doc in data:
            with self.track_time():
                doc.metadata["token_count"] = len(self._tokenizer.encode(doc.text))
            self.stat_update("tokens", value=doc.metadata["token_count"])
            self.stat_update("total")
            self.stat_update("forwarded")
            yield doc


def fineweb_row(writer, document: Document) -> dict:
    """One row in FineWeb's schema (`HuggingFaceFW/fineweb` parquet): exactly its nine columns."""
    meta = document.metadata
    return {"text": document.text, "id": document.id, "dump": meta.get("dump", ""), "url": meta.get("url", ""),
            "date": meta.get("date", ""), "file_path": meta.get("file_path", ""),
            "language": meta.get("language", ""), "language_score": float(meta.get("language_score", 0.0)),
            "token_count": int(meta.get("token_count", 0))}
