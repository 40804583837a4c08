"""`evaluate` module: top-k video recognition accuracy with multi-view testing.

Load it offline with `evaluate.load("metrics/video_classification")`. A thin adapter of
`modeling_stan.evaluation.metrics`, which must be importable (`pip install -e <repo>`); see
metrics/video_text_retrieval/video_text_retrieval.py for why it is not self-contained.
"""

import datasets
import evaluate
import numpy as np


try:  # indented so that evaluate's import scanner leaves the error message to us
    from modeling_stan.evaluation import metrics as stan_metrics
except ImportError as error:
    raise ImportError("video_classification needs the `modeling_stan` package: pip install -e <repo>") from error


_DESCRIPTION = """
Top-k accuracy (percent) of video recognition. With multi-view testing (clips x crops),
each video's views are combined by averaging their softmax scores before ranking. Ties are
split: with h classes scoring strictly higher than the label and t others tied with it, a
video counts clamp((k - h) / (t + 1), 0, 1) towards top-k, so constant scores give chance.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one row of class logits per view, video-major (the views of video i are
        rows i * num_views ... i * num_views + num_views - 1).
    references: the class label of each row (identical for the views of one video).
    num_views (`int`, default 1): views per video.
    ks (`tuple` of `int`, default (1, 5)): the k of each reported top-k accuracy.
Returns:
    `top1`, `top5` (one key per k).
Examples:
    >>> accuracy = evaluate.load("metrics/video_classification")
    >>> accuracy.compute(predictions=[[2.0, 0.0], [0.0, 1.0]], references=[0, 0], ks=(1,))
    {'top1': 50.0}
"""

_CITATION = stan_metrics.STAN_BIBTEX


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VideoClassification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, num_views=1, ks=(1, 5)):
        logits = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        # Validates num_views against the number of rows before labels are grouped.
        probabilities = stan_metrics.aggregate_views(logits, num_views)
        per_video = labels.reshape(-1, num_views)
        if (per_video != per_video[:, :1]).any():
            raise ValueError("video_classification: the views of one video must share one label in references.")
        return stan_metrics.topk_accuracy(probabilities, per_video[:, 0], ks=tuple(ks))
