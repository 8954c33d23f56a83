"""Evaluation: pass@k, multiple-choice scoring, generative tasks, the report card."""

import pytest

from llm.evals.passk import mean_pass_at_k, pass_at_k


def test_pass_at_k_equals_hand_values():
    # n=5 samples, c=2 right. pass@1 = c/n; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10; pass@5 = 1 (some right sample is drawn).
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 5) == 1.0
    # c=0 can never pass; c=n always does.
    assert [pass_at_k(5, 0, k) for k in (1, 2, 5)] == [0.0, 0.0, 0.0]
    assert [pass_at_k(5, 5, k) for k in (1, 2, 5)] == [1.0, 1.0, 1.0]
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6.
    assert mean_pass_at_k([1, 0], n=4, k=2) == pytest.approx(0.25)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)
