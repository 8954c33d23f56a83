"""The refinement recipe (FineWeb's, on datatrove) end to end, offline.

A WARC built here with warcio holds one page for each thing the recipe must handle; the test
checks where each lands. The real Common Crawl sample in ../shared runs too when present.
"""

import glob
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("datatrove")
warcio = pytest.importorskip("warcio")
pq = pytest.importorskip("pyarrow.parquet")

from llm.config import load_config  # noqa: E402
from llm.errors import UserError  # noqa: E402
from llm.refine import recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "refine_fineweb.py")
SAMPLE = ROOT.parent / "shared" / "data" / "pretrain" / "common_crawl_sample"

ARTICLE = [
    "The old harbour town was built on a narrow strip of land between the cliffs and the sea, and for "
    "three centuries its people lived from fishing, salt and the trade in wool that passed through its port.",
    "In the spring of each year the boats went out to the northern banks, where the cod gathered in great "
    "numbers, and they came back in the autumn with their holds full of fish that had been salted on board.",
    "The merchants who bought the fish sold it in the markets of the south, and with the money they built "
    "the stone houses along the quay that visitors still admire when they walk through the town today.",
    "When the railway arrived at the end of the nineteenth century, the town changed again: hotels were "
    "opened for the families who came from the cities in summer, and the harbour slowly lost its boats.",
    "Today the museum in the former customs house tells this story with models of the ships, old nets and "
    "the letters that sailors wrote to their families during the long months they spent away from home.",
    "A guided walk leaves from the museum every morning at ten, and it is the best way to learn how the "
    "streets, the churches and the quay were shaped by the sea over so many generations of hard work.",
]
GARDEN = [
    "Growing tomatoes in a small garden is easier than most people think, as long as the plants get at "
    "least six hours of sun each day and the soil is rich, loose and well drained after the rain.",
    "Start the seeds indoors about eight weeks before the last frost, and move the young plants outside only "
    "when the nights are warm, because cold air can stop their growth for weeks and weaken the stems.",
    "Water the plants deeply twice a week rather than a little every day, so that the roots grow down into "
    "the ground and the plants can survive a dry spell in the middle of the summer without much help.",
    "If you have questions about the varieties we sell, write to jane.doe@gardenmail.net or visit the shop "
    "website, which is hosted on our own server at 93.184.216.34 and is updated every week in the season.",
    "Pick the fruit when it is fully coloured and slightly soft, and keep it at room temperature, since the "
    "cold of a refrigerator takes away much of the flavour that makes a home-grown tomato worth the effort.",
]
CAFE = [
    "Our café opened its doors in a quiet street near the station, and from the first week the regulars "
    "came for the coffee, the fresh bread and the cakes that are baked every morning before dawn.",
    "The menu changes with the seasons: in winter there is soup with crusty rolls, and in summer we serve "
    "cold salads, fruit tarts and lemonade made with lemons that come from a farm near the coast.",
    "We try to buy everything from producers we know by name, and we are proud that most of what you eat "
    "here has travelled less than a hundred kilometres before it reaches your plate at our tables.",
    "On Sunday afternoons a small group of musicians plays in the corner by the window, and many families "
    "stay for hours, reading the newspaper, talking with friends and sharing a slice of cake or two.",
    "The café is closed on Mondays, and in August we take a short holiday, but the rest of the year you "
    "will find us here from seven in the morning until the last customer leaves in the evening.",
]
FRENCH = [
    "La vieille ville portuaire a été construite sur une étroite bande de terre entre les falaises et la mer, "
    "et pendant trois siècles ses habitants ont vécu de la pêche, du sel et du commerce de la laine.",
    "Au printemps, les bateaux partaient vers les bancs du nord, où la morue se rassemblait en grand nombre, "
    "et ils revenaient à l'automne avec leurs cales pleines de poissons salés à bord pendant le voyage.",
    "Les marchands qui achetaient le poisson le vendaient sur les marchés du sud, et avec cet argent ils ont "
    "construit les maisons de pierre le long du quai que les visiteurs admirent encore aujourd'hui.",
    "Aujourd'hui, le musée installé dans l'ancienne maison des douanes raconte cette histoire avec des "
    "maquettes de navires, de vieux filets et les lettres que les marins écrivaient à leurs familles.",
]


def page(title, paragraphs):
    body = "".join(f"<p>{p}</p>\n" for p in paragraphs)
    return f"<html><head><title>{title}</title></head><body><article><h1>{title}</h1>\n{body}</article></body></html>"


MENU = ("<html><body><nav><ul>" + "".join(f"<li><a href='/{w}'>{w}</a></li>" for w in
        ["Home", "About", "Products", "Blog", "Contact", "Login", "Cart", "Help"]) + "</ul></nav>"
        "<footer><a href='/privacy'>Privacy</a> | <a href='/terms'>Terms</a> | © 2024 Shop</footer></body></html>")
PAGES = {  # url -> (payload bytes, content type)
    "http://blocked-by-list.com/harbour": (page("Harbour", ARTICLE), "text/html; charset=utf-8"),
    "http://fr.example.org/port": (page("Le port", FRENCH), "text/html; charset=utf-8"),
    "http://dup.example.org/a": (page("Harbour history", ARTICLE), "text/html; charset=utf-8"),
    "http://dup.example.org/b": (page("Harbour history", ARTICLE[:-1] + [ARTICLE[-1].replace("ten", "eleven")]),
                                 "text/html; charset=utf-8"),
    "http://dup.example.org/c": (page("Harbour history", ARTICLE[:-1] + [ARTICLE[-1].replace("morning", "day")]),
                                 "text/html; charset=utf-8"),
    "http://garden.example.org/tomatoes": (page("Tomatoes", GARDEN), "text/html; charset=utf-8"),
    "http://menu.example.org/": (MENU, "text/html; charset=utf-8"),
    "http://short.example.org/": (page("Hi", ["Welcome to my home page. I am a student and I like to write about the books I read, "
                                                           "the music I play and the weather in my town."]), "text/html; charset=utf-8"),
    "http://cafe.example.org/latin1": (page("Café", CAFE), "text/html; charset=iso-8859-1"),
    "http://img.example.org/logo.png": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, "image/png"),
}


def record(writer, url, payload, content_type):
    from warcio.statusandheaders import StatusAndHeaders

    if isinstance(payload, str):
        payload = payload.encode("latin-1" if "8859" in content_type else "utf-8")
    headers = StatusAndHeaders("200 OK", [("Content-Type", content_type)], protocol="HTTP/1.1")
    writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(payload), http_headers=headers))


def build_warc(path):
    """All of PAGES, then a record cut off in the middle (the file ends inside its gzip member)."""
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for url, (payload, ctype) in PAGES.items():
            record(writer, url, payload, ctype)
        tail = io.BytesIO()
        record(WARCWriter(tail, gzip=True), "http://cut.example.org/", page("Cut", GARDEN), "text/html")
        f.write(tail.getvalue()[: len(tail.getvalue()) // 2])


def offline_config(warc_glob, **extra):
    overrides = [f"--config.input.paths={warc_glob}", "--config.executor.tasks=1", "--config.executor.workers=1",
                 "--config.url_filter.extra_domains=blocked-by-list.com", "--config.input.dump=CC-MAIN-TEST"]
    return load_config(CONFIG, overrides + [f"--config.{k}={v}" for k, v in extra.items()])


def removed(workdir):
    """url -> (filter folder, reason) for every document a filter removed."""
    out = {}
    for path in glob.glob(os.path.join(workdir, "removed", "*", "*.jsonl*")):
        with gzip.open(path, "rt") as f:
            for line in f:
                meta = json.loads(line)["metadata"]
                out[meta["url"]] = (Path(path).parent.name, meta.get("filter_reason"))
    return out


def output(workdir):
    files = sorted(glob.glob(os.path.join(workdir, "output", "*.parquet")))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refine")
    build_warc(tmp / "crawl-00000.warc.gz")
    workdir = str(tmp / "run")
    recipe.run(offline_config(str(tmp / "*.warc.gz")), workdir)
    return workdir


@pytest.mark.slow
def test_each_page_lands_where_fineweb_puts_it(refined):
    gone, kept = removed(refined), {r["url"]: r for r in output(refined)}
    assert gone["http://blocked-by-list.com/harbour"] == ("1_url", "domain")
    assert gone["http://fr.example.org/port"] == ("2_language", "not_en")
    assert gone["http://short.example.org/"][0] in ("3_gopher_repetition", "4_gopher_quality", "5_c4")
    dups = [u for u in ("http://dup.example.org/a", "http://dup.example.org/b", "http://dup.example.org/c")]
    assert sum(u in kept for u in dups) == 1 and sum(gone.get(u, ("",))[0] == "7_minhash" for u in dups) == 2
    assert gone["http://menu.example.org/"] == ("2_language", "not_en")  # what extraction leaves is a few link words
    assert set(kept) >= {"http://garden.example.org/tomatoes", "http://cafe.example.org/latin1"}
    garden = kept["http://garden.example.org/tomatoes"]["text"]
    assert "jane.doe@gardenmail.net" not in garden and "93.184.216.34" not in garden
    assert "email@example.com" in garden and "22.214.171.124" in garden and "Our café opened" in kept["http://cafe.example.org/latin1"]["text"]  # Latin-1 decoded


@pytest.mark.slow
def test_output_is_fineweb_schema_and_a_training_source(refined):
    from llm.data.sources import open_source
    from llm.data.sources import FINEWEB_COLUMNS
    from llm.tokenizer import Tokenizer

    table = pq.read_table(glob.glob(os.path.join(refined, "output", "*.parquet"))[0])
    assert tuple(table.schema.names) == FINEWEB_COLUMNS
    assert str(table.schema.field("language_score").type) == "double"
    assert str(table.schema.field("token_count").type) == "int64"
    row = table.to_pylist()[0]
    assert row["language"] == "en" and row["dump"] == "CC-MAIN-TEST" and row["id"].startswith("<urn:uuid:")
    assert row["token_count"] == len(Tokenizer.load("gpt2").encode(row["text"]))
    source = open_source(os.path.join(refined, "output"))  # launch.train / launch.prepare read it as it is
    texts = [text for chunk in source.chunks() for text in source.read(chunk).texts]
    written = [t for f in glob.glob(os.path.join(refined, "output", "*.parquet")) for t in pq.read_table(f)["text"].to_pylist()]
    assert texts and sorted(texts) == sorted(written)


@pytest.mark.slow
def test_stats_count_every_page(refined):
    stats = json.loads(Path(refined, "stats.json").read_text())
    assert stats["skipped"]["not_html"] == 1 and stats["skipped"]["truncated_record"] == 1
    assert stats["input_documents"] == len(PAGES) - 1  # every HTML response read, the PNG skipped
    by_step = {r["step"]: r for r in stats["steps"]}
    assert by_step["😈 Url-filter"]["dropped"] == {"domain": 1}
    # The French page, and the menu page: its few link words score under 0.65 as English.
    assert by_step["🌍 Language ID"]["dropped"] == {"not_en": 2}
    assert by_step["🎯 MinHash stage 4"]["dropped"] == {"duplicate": 2}
    assert stats["output_documents"] == len(output(refined)) == 3
    assert stats["output_tokens"] == sum(r["token_count"] for r in output(refined))
    assert "FineWeb" in Path(refined, "report.md").read_text()


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no WARC files at"):
        recipe.split_input(str(tmp_path / "nothing" / "*.warc.gz"))
    with pytest.raises(UserError, match="fasttext_model"):
        recipe.language_model(offline_config("x", **{"language.fasttext_model": str(tmp_path / "lid.176.bin")}))


needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason="needs ../shared/data/pretrain/common_crawl_sample")
SAMPLE_RUN = ["--config.executor.tasks=2", "--config.executor.workers=1"]


def launch_refine(workdir, *args, **popen):
    cmd = [sys.executable, "-m", "launch.refine", "--config", CONFIG, "--workdir", str(workdir), *SAMPLE_RUN, *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def contents(workdir):
    """Every output and exclusion file's content (decompressed: gzip headers carry a time stamp)."""
    files = sorted(glob.glob(os.path.join(workdir, "output", "*")) + glob.glob(os.path.join(workdir, "removed", "*", "*")))
    return {os.path.relpath(f, workdir): (gzip.open(f).read() if f.endswith(".gz") else Path(f).read_bytes())
            for f in files}


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sample") / "run"
    proc = launch_refine(workdir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return workdir


@pytest.mark.slow
@needs_sample
def test_real_common_crawl_sample_end_to_end_and_pretrains(sample_run, tmp_path):
    stats = json.loads((sample_run / "stats.json").read_text())
    assert stats["input_documents"] == 37 and 0 < stats["output_documents"] < 37
    rows = output(sample_run)
    assert len(rows) == stats["output_documents"] and all(r["language"] == "en" for r in rows)
    train = [sys.executable, "-m", "launch.train", "--config", str(ROOT / "configs" / "tiny.py"),
             "--workdir", str(tmp_path / "tiny"), f"--config.data.source={sample_run / 'output'}",
             "--config.model.vocab_size=1024", "--config.data.tokenizer=train:1024", "--config.data.seq_len=64",
             "--config.data.batch_size=8", "--config.model.n_layer=2", "--config.train.steps=4",
             "--config.train.eval_every=4", "--config.train.eval_batches=1", "--config.train.sample_every=0",
             "--config.optimizer.warmup_steps=1", "--config.data.val_fraction=0.1"]
    done = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "done: step 4" in done.stdout + done.stderr, done.stderr[-3000:]


@pytest.mark.slow
@needs_sample
def test_kill_9_mid_run_then_rerun_gives_identical_files(sample_run, tmp_path):
    workdir = tmp_path / "killed"
    proc = launch_refine(workdir, start_new_session=True)
    marker = workdir / "logs" / "base" / "completions" / "00000"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # into the second task of the base job, writing its shard
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (workdir / "stats.json").exists()
    rerun = launch_refine(workdir)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-3000:]
    reference = contents(sample_run)
    assert any(k.startswith("output") for k in reference) and contents(workdir) == reference


def test_launcher_reports_a_missing_input_as_one_error_line(tmp_path):
    proc = launch_refine(tmp_path / "w", f"--config.input.paths={tmp_path}/none/*.warc.gz")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out.strip().splitlines()[-1].startswith("error: no WARC files at")


def test_slurm_jobs_depend_on_each_other_in_fineweb_order(tmp_path):
    config = load_config(CONFIG, [f"--config.input.paths={tmp_path}/*.warc.gz", "--config.executor.kind=slurm",
                                  "--config.executor.slurm.partition=cpu"])
    build_warc(tmp_path / "a.warc.gz")
    jobs = recipe.executors(config, str(tmp_path / "w"))  # built, not submitted
    assert [type(j).__name__ for j in jobs] == ["SlurmPipelineExecutor"] * 5
    assert [j.world_size for j in jobs] == [2, 2, 14, 1, 2]  # buckets: one task per MinHash bucket
    assert all(later.depends is earlier for earlier, later in zip(jobs, jobs[1:]))
    with pytest.raises(UserError, match="executor.kind"):
        recipe.executors(load_config(CONFIG, [f"--config.input.paths={tmp_path}/*.warc.gz",
                                              "--config.executor.kind=dask"]), str(tmp_path / "w"))
