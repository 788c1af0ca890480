"""Our naive Bayes scoring gives River's probabilities, faster."""

import pytest
from river import naive_bayes as river_nb
from synthetic import topic_stream

from stream_learner.core.features import TextFeaturizer
from stream_learner.learners import naive_bayes


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (naive_bayes.MultinomialNB(alpha=0.1), river_nb.MultinomialNB(alpha=0.1)),
        (naive_bayes.ComplementNB(alpha=0.3), river_nb.ComplementNB(alpha=0.3)),
        (naive_bayes.ComplementNB(alpha=1.0), river_nb.ComplementNB(alpha=1.0)),
    ],
)
def test_probabilities_equal_rivers(ours, theirs):
    featurizer = TextFeaturizer(n_buckets=2**10)
    for record in topic_stream(300, seed=9, noise=0.2):
        x = featurizer.transform_one(record.text)
        assert ours.predict_proba_one(x) == pytest.approx(
            theirs.predict_proba_one(x), rel=1e-9, abs=1e-12
        )
        ours.learn_one(x, record.label)
        theirs.learn_one(x, record.label)
    unseen = featurizer.transform_one("entirely unseen words zzz")
    assert ours.predict_proba_one(unseen) == pytest.approx(
        theirs.predict_proba_one(unseen), rel=1e-9
    )
    assert ours.predict_proba_one({}) == pytest.approx(theirs.predict_proba_one({}), rel=1e-9)
