"""`evaluate` module: text <-> video retrieval metrics of STAN / Mug-STAN.

Load it offline with `evaluate.load("metrics/video_text_retrieval")`.

Why it imports the package: `evaluate` copies this script alone into its module cache
(only sibling files named in relative imports travel with it), so the script cannot
reach the repository's code by path. The computation therefore lives once, in
`modeling_stan.evaluation.metrics`, and this file only adapts it to the `evaluate` API. The package
must be importable: `pip install -e <repo>`, or run from the repository root.
"""

import datasets
import evaluate
import numpy as np


# The import is indented on purpose: `evaluate` scans top-level import lines and would
# answer a missing package with a misleading "pip install modeling_stan".
try:
    from modeling_stan.evaluation import metrics as stan_metrics
except ImportError as error:
    raise ImportError("video_text_retrieval needs the `modeling_stan` package: pip install -e <repo>") from error


_DESCRIPTION = """
Text-to-video and video-to-text retrieval: R@1, R@5, R@10 (percent), median rank (MdR) and
mean rank (MnR). Ties are split: with h candidates scoring strictly higher than the ground
truth and t others tied with it, the ground truth's place is uniform among h+1 ... h+t+1, so
a query counts clamp((k - h) / (t + 1), 0, 1) towards R@k and h + t/2 + 1 towards MdR/MnR;
a collapsed model (all scores equal) scores chance. With several captions per video, each
caption is a text query, and in video-to-text a video's rank is the best rank among its captions.
Optional re-ranking: dual softmax (DSL) or QB-Norm (dynamic inverted softmax).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one row per text query, its scores against every video
        (the `(num_texts, num_videos)` similarity matrix, text-major).
    references: for each text, the index of its ground-truth video.
    dsl (`bool`, default False): re-rank both directions with the dual softmax.
    dsl_lambda (`float`, default 100): inverse temperature of the dual softmax.
    qb_bank_t2v: optional `(num_bank_texts, num_videos)` scores of querybank texts (e.g. the
        training captions) against the test videos: QB-Norm for text-to-video.
    qb_bank_v2t: optional `(num_bank_videos, num_texts)` scores of querybank videos against
        the test texts: QB-Norm for video-to-text.
    qb_beta (`float`, default 20), qb_k (`int`, default 1): QB-Norm parameters.
Returns:
    `t2v_R@1`, `t2v_R@5`, `t2v_R@10`, `t2v_MdR`, `t2v_MnR` and the same with `v2t_`.
Examples:
    >>> retrieval = evaluate.load("metrics/video_text_retrieval")
    >>> retrieval.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[0, 1])["t2v_R@1"]
    100.0
"""

_CITATION = (
    stan_metrics.STAN_BIBTEX
    + """
@inproceedings{bogolin2022qbnorm,
  title={Cross Modal Retrieval with Querybank Normalisation},
  author={Bogolin, Simion-Vlad and Croitoru, Ioana and Jin, Hailin and Liu, Yang and Albanie, Samuel},
  booktitle={CVPR},
  year={2022}
}
"""
)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VideoTextRetrieval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # float64 rows keep float64 similarities lossless (float32 ones convert exactly).
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        dsl=False,
        dsl_lambda=100.0,
        qb_bank_t2v=None,
        qb_bank_v2t=None,
        qb_beta=20.0,
        qb_k=1,
    ):
        if dsl and (qb_bank_t2v is not None or qb_bank_v2t is not None):
            raise ValueError("video_text_retrieval: choose one re-ranking, dsl or a QB-Norm bank, not both.")
        sim = np.asarray(predictions, dtype=np.float64)
        text_to_video = np.asarray(references, dtype=np.int64)
        sim_t2v, sim_v2t = sim, sim
        if dsl:
            sim_t2v = stan_metrics.dual_softmax(sim, lam=dsl_lambda, axis=0)
            sim_v2t = stan_metrics.dual_softmax(sim, lam=dsl_lambda, axis=1)
        if qb_bank_t2v is not None:
            sim_t2v = stan_metrics.querybank_normalize(sim, np.asarray(qb_bank_t2v), beta=qb_beta, k=qb_k)
        if qb_bank_v2t is not None:
            # QB-Norm normalises query rows: video queries are the rows of the transpose.
            sim_v2t = stan_metrics.querybank_normalize(sim.T, np.asarray(qb_bank_v2t), beta=qb_beta, k=qb_k).T
        return stan_metrics.text_to_video_and_video_to_text(sim_t2v, text_to_video, sim_v2t=sim_v2t)
