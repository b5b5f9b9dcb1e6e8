"""do_predict's pieces: a row cut at its last answer, and the four scores LLaMA-Factory reports."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlmtune.train.predict import bleu4, rouge_l, rouge_n, scores, split_row, tokens

X = -100


def test_split_row_cuts_before_the_last_answer():
    row = {"input_ids": [1, 2, 3, 4, 5, 6, 7], "labels": [X, X, 3, X, X, 6, 7], "images": []}
    prompt, label = split_row(row)
    assert (prompt["input_ids"], prompt["labels"], label) == ([1, 2, 3, 4, 5], [X] * 5, [6, 7])
    assert split_row({"input_ids": [1, 2], "labels": [X, X]}) is None
    # an image pad (9) in what would be cut off: the row cannot be predicted from its prompt
    assert split_row({"input_ids": [1, 9, 6], "labels": [X, 9, 6]}, (9,)) is None


def test_tokens_split_cjk_characters():
    assert tokens("a cat 你好x") == ["a", "cat", "你", "好", "x"]


def test_scores_exact_values():
    assert bleu4(["a", "b", "c", "d"], ["a", "b", "c", "d"]) == 1.0
    # one unigram of two matches, no higher n-gram: NIST geometric smoothing 1/2, 1/(2*1), 1/(4*0→1), ...
    assert bleu4(["a", "x"], ["a", "y"]) == pytest.approx(math.exp((math.log(1 / 2) + math.log(1 / 2) +
                                                                    math.log(1 / 4) + math.log(1 / 8)) / 4))
    assert rouge_n(["a", "b", "c"], ["a", "b", "d"], 1) == pytest.approx(2 / 3)
    assert rouge_n(["a", "b", "c"], ["a", "b", "d"], 2) == pytest.approx(1 / 2)
    assert rouge_l(["a", "x", "b", "c"], ["a", "b", "c"]) == pytest.approx(2 * 3 / 7)
    assert scores([{"predict": "a b", "label": "a b"}]) == {
        "predict_bleu-4": pytest.approx(100 * math.exp(-1.5 * 0) * math.exp((0 + 0 + math.log(1 / 2) + math.log(1 / 4)) / 4)),
        "predict_rouge-1": 100.0, "predict_rouge-2": 100.0, "predict_rouge-l": 100.0}


@given(st.lists(st.sampled_from("abcd"), min_size=1, max_size=12), st.lists(st.sampled_from("abcd"), min_size=1,
                                                                             max_size=12))
def test_scores_are_in_range_and_perfect_for_identity(hyp, ref):
    for f in (bleu4, rouge_l, lambda h, r: rouge_n(h, r, 1), lambda h, r: rouge_n(h, r, 2)):
        assert 0.0 <= f(hyp, ref) <= 1.0 + 1e-12
    assert rouge_l(ref, ref) == pytest.approx(1.0) and rouge_n(ref, ref, 1) == pytest.approx(1.0)
