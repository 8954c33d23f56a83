"""lm-evaluation-harness's `local-completions` model (remote tokenizer) against the server, on the committed
ARC-Easy slice: its log-likelihoods equal `launch.eval`'s (`llm.evals.multiple_choice.score`).

Runs where `lm_eval` is installed (`pip install lm_eval tenacity`; not in the test extra: it brings datasets, pandas,
scikit-learn and more).
"""

import os

import httpx
import pytest

from llm.evals.multiple_choice import score
from llm.serve.app import create_app
from llm.tasks.choice_sets import load_arc_easy
from scripted import TOKENIZER, scripted_gpt2
from test_serve import TIMEOUT, Server

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API models need it (its `api` extra)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "evals", "evals", "arc_easy_validation.jsonl")


@pytest.mark.slow
def test_lm_eval_local_completions_loglikelihoods_equal_launch_evals():
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    # Blocks zeroed but embeddings random: every token's log-probability differs, which is all equality needs.
    cfg, params = scripted_gpt2({}, max_seq_len=256)
    server = Server(create_app(lambda: (cfg, params, TOKENIZER), model_name="tiny", max_slots=8))
    try:
        server.wait_until(lambda: httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200, "health")
        items = load_arc_easy(path=FIXTURE).problems("validation", 0, 0)
        expected = score(cfg, params, TOKENIZER, items)
        lm = LocalCompletionsAPI(base_url=f"{server.url}/v1/completions", model="tiny", tokenizer_backend="remote",
                                 max_length=cfg.max_seq_len, batch_size=4, max_retries=1, timeout=int(TIMEOUT))
        requests = [Instance("loglikelihood", {}, (item.context, choice), k)
                    for item in items for k, choice in enumerate(item.choices)]
        got = [loglik for loglik, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        want = [loglik for scores in expected for loglik in scores.logliks]
        assert len(got) == sum(len(item.choices) for item in items) and len({round(w, 2) for w in want}) > 1
        assert got == pytest.approx(want, rel=1e-5, abs=1e-4)
    finally:
        server.close()
