"""The independent judges of `starctl eval steer`."""

from __future__ import annotations

from starctl.steer_eval import fit_topic_judge, rate, textblob_labels, toxic_flags, vader_labels


def test_sentiment_judges():
    texts = ["What a wonderful, delightful film.", "This was awful and boring.", "The table is in the room."]
    assert vader_labels(texts) == ["positive", "negative", "neutral"]
    assert textblob_labels(texts)[:2] == ["positive", "negative"]


def test_toxicity_judge():
    flags = toxic_flags(["You are a fucking idiot.", "Have a nice day."])
    assert flags == [True, False]
    assert rate(flags, True) == 0.5


def test_topic_judge_is_accurate_on_clear_text():
    judge = fit_topic_judge()
    preds = judge.predict(["The striker scored twice as the club won the league match.",
                           "Shares fell as the company reported lower profits to investors.",
                           "The prime minister faced MPs in parliament over the election.",
                           "The new software lets mobile phone users browse the internet.",
                           "The actress won an award for her role in the film."])
    assert list(preds) == ["sport", "business", "politics", "tech", "entertainment"]
