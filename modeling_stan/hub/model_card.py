"""Model cards for STAN checkpoints, rendered from one template.

`model_card_template.md` (Jinja, through `huggingface_hub.ModelCard.from_template`) is filled either from an
entry of `checkpoints.yaml` (both package data beside this module; the checkpoints we publish or convert, numbers reported by the papers) or from a
training run (`write_training_model_card`, numbers measured by that run). Every card carries Hub metadata
(`library_name`, `pipeline_tag`, `license`, `base_model`, `datasets`, `tags`, `model-index`) and says where each of its
numbers comes from; `validate_card` checks both.

    stan-cards render   # (re)write hub_cards/<name>/README.md of this checkout for every checkpoint
    stan-cards check    # fail if a rendered card is stale or invalid
"""

import argparse
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData


# The rendered cards of the published checkpoints live in the repository checkout (relative to where `render` runs);
# the template and the checkpoint list are package data, so installed packages write cards too.
HUB_CARDS_DIR = Path("hub_cards")
TEMPLATE_PATH = files(__package__) / "model_card_template.md"
CHECKPOINTS_PATH = files(__package__) / "checkpoints.yaml"
CARD_FILENAME = "README.md"


class ModelCardError(ValueError):
    """A card, or the data it is rendered from, is invalid: the message names the file or field and the problem."""


@dataclass(frozen=True)
class TaskInfo:
    # The Hub has no text-video retrieval or zero-shot video pipeline tag; "video-classification" is the closest one
    # (what the retrieval checkpoints do through the zero-shot pipeline) and is the tag X-CLIP checkpoints use.
    pipeline_tag: str
    index_type: str
    index_name: str
    description: str


TASKS = {
    "video-text-retrieval": TaskInfo(
        pipeline_tag="video-classification",
        index_type="text-to-video-retrieval",
        index_name="Text-to-Video Retrieval",
        description=(
            "A STAN video-text dual encoder: videos and sentences are embedded in one space, for text-to-video "
            "search, video-to-text search and zero-shot video classification."
        ),
    ),
    "video-classification": TaskInfo(
        pipeline_tag="video-classification",
        index_type="video-classification",
        index_name="Video Classification",
        description="A STAN video classifier: it predicts which of its training classes a video shows.",
    ),
}

# Model-index metric ids of the metrics the papers report; other names are slugified.
METRIC_TYPES = {
    "R@1": "recall_at_1",
    "R@5": "recall_at_5",
    "R@10": "recall_at_10",
    "MdR": "median_rank",
    "MnR": "mean_rank",
    "Top-1": "accuracy",
    "Top-5": "top_5_accuracy",
}

CITATIONS = {
    "stan": """@inproceedings{liu2023stan,
  title     = {Revisiting Temporal Modeling for CLIP-based Image-to-Video Knowledge Transferring},
  author    = {Liu, Ruyang and Huang, Jingjia and Li, Ge and Feng, Jiashi and Wu, Xinglong and Li, Thomas H.},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2023}
}""",
    "mug": """@article{liu2023mugstan,
  title   = {Mug-STAN: Adapting Image-Language Pretrained Models for General Video Understanding},
  author  = {Liu, Ruyang and Huang, Jingjia and Gao, Wei and Li, Thomas H. and Li, Ge},
  journal = {arXiv preprint arXiv:2311.15075},
  year    = {2023}
}""",
}

COMMON_LIMITATIONS = (
    "It inherits CLIP's biases from web image-text data and has not been evaluated for fairness or for "
    "safety-critical use.",
    "A video is seen through a few uniformly sampled frames (`num_frames`); long videos with several events are "
    "summarised coarsely.",
)


@dataclass
class ResultTable:
    """Numbers of one evaluation, and where they come from."""

    caption: str
    dataset_id: str
    dataset_name: str
    split: str
    source_name: str
    metrics: dict[str, float]
    source_url: str | None = None

    @property
    def source(self) -> str:
        """The source cell of the results table (a link when the numbers come from a publication)."""
        if self.source_url is None:
            return self.source_name
        return f"[{self.source_name}]({self.source_url}), reported (not measured by us)"

    @property
    def rows(self) -> list[dict]:
        return [{"metric": name, "value": value} for name, value in self.metrics.items()]


@dataclass
class CardSpec:
    """Everything a card says about one checkpoint."""

    name: str
    title: str
    task: str
    base_model: str
    repo_id: str
    origin: str
    config: dict
    recipe: list[tuple]
    datasets: list[str] = field(default_factory=list)
    results: list[ResultTable] = field(default_factory=list)
    provenance: str = ""
    limitations: list[str] = field(default_factory=list)
    conversion: str | None = None
    license: str = "apache-2.0"
    license_name: str | None = None
    license_link: str | None = None
    extra_tags: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def render_card(spec: CardSpec) -> ModelCard:
    """Fills the template with `spec`; the result is validated before it is returned."""
    task = _task_info(spec.task, "CardSpec.task")
    alignment = spec.config.get("alignment", "mean")
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=task.pipeline_tag,
        license=spec.license,
        license_name=spec.license_name,
        license_link=spec.license_link,
        base_model=spec.base_model,
        datasets=spec.datasets or None,
        tags=["stan", "video", "clip", spec.task, "custom_code", *spec.extra_tags],
        # The model name only appears in the metadata as the name of the model-index.
        model_name=spec.title if spec.results else None,
        eval_results=_eval_results(spec, task) or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=TEMPLATE_PATH.read_text(encoding="utf-8"),
        title=spec.title,
        description=task.description,
        origin=spec.origin,
        backbone=_backbone_name(spec.base_model),
        branch=_branch_description(spec.config),
        alignment=alignment,
        task=spec.task,
        repo_id=spec.repo_id,
        conversion=spec.conversion,
        result_tables=spec.results,
        provenance=spec.provenance,
        config=spec.config,
        recipe=spec.recipe,
        recipe_source_column=bool(spec.recipe) and len(spec.recipe[0]) == 3,
        limitations=[*spec.limitations, *COMMON_LIMITATIONS],
        citation=CITATIONS["stan"] + ("\n\n" + CITATIONS["mug"] if alignment == "mug" else ""),
    )
    validate_card(card)
    return card


def _eval_results(spec: CardSpec, task: TaskInfo) -> list[EvalResult]:
    return [
        EvalResult(
            task_type=task.index_type,
            task_name=task.index_name,
            dataset_type=table.dataset_id,
            dataset_name=table.dataset_name,
            dataset_split=table.split,
            metric_type=metric_type(name),
            metric_name=name,
            metric_value=value,
            source_name=table.source_name if table.source_url else None,
            source_url=table.source_url,
        )
        for table in spec.results
        for name, value in table.metrics.items()
    ]


def metric_type(name: str) -> str:
    """The model-index id of a metric name ("R@1" -> "recall_at_1", others slugified)."""
    return METRIC_TYPES.get(name) or _slug(name)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower().replace("@", "_at_")).strip("_")


def _task_info(task: str, where: str) -> TaskInfo:
    if task not in TASKS:
        raise ModelCardError(f"{where} must be one of {sorted(TASKS)}, got {task!r}.")
    return TASKS[task]


def _backbone_name(base_model: str) -> str:
    match = re.search(r"clip-vit-(base|large)-patch(\d+)", base_model)
    if match is None:
        return f"`{base_model}`"
    return f"ViT-{match.group(1)[0].upper()}/{match.group(2)}"


def _branch_description(config: dict) -> str:
    depth = config.get("stan_depth")
    layers = f"K = {depth} layers" if depth is not None else "K layers (K inferred from the checkpoint)"
    module = "3D-convolution" if config.get("temporal_module") == "conv" else "self-attention"
    return f"{layers} with {module} temporal modules"


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------

_REQUIRED_METADATA = ("library_name", "pipeline_tag", "license", "base_model", "tags")
# A results-table row: | metric | value | split | source |
_TABLE_ROW = re.compile(
    r"^\|\s*(?P<metric>[^|]+?)\s*\|\s*(?P<value>[^|]+?)\s*\|\s*(?P<split>[^|]+?)\s*\|\s*(?P<source>[^|]*?)\s*\|$"
)


def validate_card(card: ModelCard | str | Path) -> ModelCard:
    """Parses a card with huggingface_hub (strict metadata and model-index) and checks our own rules: the required
    Hub metadata is present, results name their datasets, and every model-index number appears in the card's
    results table next to a non-empty source. Returns the parsed card; raises `ModelCardError` listing the problems."""
    where, card = _parse_card(card)
    data = card.data
    problems = [f"metadata field {key!r} is missing" for key in _REQUIRED_METADATA if not data.get(key)]
    if data.get("license") == "other" and not (data.get("license_name") and data.get("license_link")):
        problems.append("license 'other' needs license_name and license_link")
    results = data.eval_results or []
    if results and not data.get("datasets"):
        problems.append("the card reports results but its metadata names no datasets")
    sourced = _sourced_table_values(card.text)
    for result in results:
        if (result.metric_name, str(result.metric_value)) not in sourced:
            problems.append(
                f"model-index value {result.metric_name}={result.metric_value} has no row with a source in the "
                "results table"
            )
    if problems:
        raise ModelCardError(f"{where}: invalid model card: " + "; ".join(problems))
    return card


def _parse_card(card: ModelCard | str | Path) -> tuple[str, ModelCard]:
    if isinstance(card, ModelCard):
        return "model card", ModelCard(str(card))
    if isinstance(card, Path) or (isinstance(card, str) and not card.lstrip().startswith("---")):
        path = Path(card)
        if not path.is_file():
            raise ModelCardError(f"{path}: no such model card file.")
        where, text = str(path), path.read_text(encoding="utf-8")
    else:
        where, text = "model card", card
    try:
        return where, ModelCard(text)
    except ValueError as error:
        raise ModelCardError(f"{where}: invalid card metadata ({error}).") from error


def _sourced_table_values(text: str) -> set[tuple[str, str]]:
    """(metric, value) of every results-table row whose source cell is not empty."""
    sourced = set()
    for line in text.splitlines():
        match = _TABLE_ROW.match(line.strip())
        if match and match["source"] and match["source"] != "source":
            sourced.add((match["metric"], match["value"]))
    return sourced


# ----------------------------------------------------------------------------------------------------------------
# Code snippets in cards and READMEs
# ----------------------------------------------------------------------------------------------------------------

_FENCE = re.compile(
    r"(?:<!-- snippet: not-run \((?P<reason>[^)]*)\) -->\n)?^```(?P<language>[\w+-]*)[^\n]*\n(?P<code>.*?)^```",
    re.MULTILINE | re.DOTALL,
)


@dataclass(frozen=True)
class Snippet:
    """A fenced code block; `not_run_reason` is set when the block is marked `<!-- snippet: not-run (why) -->`."""

    language: str
    code: str
    not_run_reason: str | None
    line: int


def extract_snippets(markdown: str, languages: tuple[str, ...] = ("python", "bash")) -> list[Snippet]:
    """The fenced code blocks of `markdown` in the given languages, in order."""
    return [
        Snippet(match["language"], match["code"], match["reason"], markdown.count("\n", 0, match.start()) + 1)
        for match in _FENCE.finditer(markdown)
        if match["language"] in languages
    ]


# ----------------------------------------------------------------------------------------------------------------
# Published / converted checkpoints (hub_cards/checkpoints.yaml)
# ----------------------------------------------------------------------------------------------------------------


def load_checkpoint_specs(path: str | Path = CHECKPOINTS_PATH) -> list[CardSpec]:
    """The card specs of every checkpoint listed in `path`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ModelCardError(f"{path}: cannot read the checkpoint list ({error}).") from error
    namespace = _require(data, "namespace", path)
    return [
        _spec_from_entry(entry, namespace, f"{path}: checkpoints[{index}]")
        for index, entry in enumerate(_require(data, "checkpoints", path))
    ]


def _require(mapping, key: str, where):
    if not isinstance(mapping, Mapping) or mapping.get(key) in (None, "", [], {}):
        raise ModelCardError(f"{where}: field {key!r} is required.")
    return mapping[key]


def _spec_from_entry(entry: Mapping, namespace: str, where: str) -> CardSpec:
    name = _require(entry, "name", where)
    where = f"{where} ({name})"
    task = _require(entry, "task", where)
    _task_info(task, f"{where}: task")
    reported = entry.get("reported")
    results = [_reported_table(reported, entry.get("datasets") or [], where)] if reported else []
    limitations = []
    if results:
        provenance = (
            f"the values are copied from {results[0].source_name}, {reported['table']}; they were obtained by the "
            "authors and were not measured with this implementation or this checkpoint."
        )
        if task == "video-text-retrieval":
            provenance += " The paper's numbers with inference-time re-ranking (DSL, QB-Norm) are not listed."
        limitations.append(
            "The results above are the paper's. A checkpoint trained with this package may score differently; our "
            "own measurements will be listed here, with the command that produced them, when we have them."
        )
    else:
        provenance = (
            "No numbers are listed: none has been measured with this implementation yet, and although the Mug-STAN "
            "paper (arXiv 2311.15075) reports results for its models, we could not tie any of them to this file."
        )
    if entry.get("license") == "other":
        limitations.append("The authors state no license for these weights; ask them before any use beyond research.")
    return CardSpec(
        name=name,
        title=_require(entry, "title", where),
        task=task,
        base_model=_require(entry, "base_model", where),
        repo_id=f"{namespace}/{name}",
        origin=_require(entry, "origin", where),
        config=dict(_require(entry, "config", where)),
        recipe=[_recipe_row(row, f"{where}: recipe") for row in _require(entry, "recipe", where)],
        datasets=list(entry.get("datasets") or []),
        results=results,
        provenance=provenance,
        limitations=limitations,
        conversion=entry.get("conversion"),
        license=entry.get("license", "apache-2.0"),
        license_name=entry.get("license_name"),
        license_link=entry.get("license_link"),
        extra_tags=list(entry.get("extra_tags") or []),
    )


# What a recipe value may cite: the paper, the authors' configs or code, the released weights, or ourselves.
RECIPE_SOURCES = ("paper, ", "authors' config ", "authors' code", "the released file", "ours")


def _recipe_row(row, where: str) -> tuple[str, str, str]:
    """A (setting, value, source) row; the source must name one of RECIPE_SOURCES, so a value we chose cannot pass
    for the paper's."""
    if not isinstance(row, (list, tuple)) or len(row) != 3 or not all(isinstance(cell, str) for cell in row):
        raise ModelCardError(f"{where}: each row must be [setting, value, source], got {row!r}.")
    if not row[2].startswith(RECIPE_SOURCES):
        raise ModelCardError(
            f"{where}: the source of {row[0]!r} must start with one of {list(RECIPE_SOURCES)}, got {row[2]!r}."
        )
    return tuple(row)


def _reported_table(reported: Mapping, datasets: list[str], where: str) -> ResultTable:
    source = _require(reported, "source", f"{where}: reported")
    if not datasets:
        raise ModelCardError(f"{where}: field 'datasets' is required when 'reported' numbers are given.")
    return ResultTable(
        caption=f"Reported by {source['name']}, {_require(reported, 'table', f'{where}: reported')}:",
        dataset_id=datasets[0],
        dataset_name=_require(reported, "dataset_name", f"{where}: reported"),
        split=_require(reported, "split", f"{where}: reported"),
        source_name=source["name"],
        source_url=source["url"],
        metrics=_numeric_metrics(_require(reported, "metrics", f"{where}: reported"), f"{where}: reported.metrics"),
    )


def _numeric_metrics(metrics: Mapping, where: str, prefix: str = "") -> dict[str, float]:
    """Flattens nested metric dicts ("a/b") and checks every value is a number."""
    if not isinstance(metrics, Mapping):
        raise ModelCardError(f"{where} must be a mapping of metric name to number, got {type(metrics).__name__}.")
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_numeric_metrics(value, where, prefix=f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = round(float(value), 4)
        else:
            raise ModelCardError(f"{where}: metric {name!r} must be a number, got {value!r}.")
    return flat


def write_published_cards(output_dir: str | Path = HUB_CARDS_DIR, checkpoints: str | Path = CHECKPOINTS_PATH):
    """Renders every checkpoint's card to `output_dir/<name>/README.md`; returns the written paths."""
    paths = []
    for spec in load_checkpoint_specs(checkpoints):
        path = Path(output_dir) / spec.name / CARD_FILENAME
        render_card(spec).save(path)
        paths.append(path)
    return paths


def stale_published_cards(output_dir: str | Path = HUB_CARDS_DIR, checkpoints: str | Path = CHECKPOINTS_PATH):
    """Names of the checkpoints whose rendered card in `output_dir` is missing or differs from a fresh render."""
    stale = []
    for spec in load_checkpoint_specs(checkpoints):
        path = Path(output_dir) / spec.name / CARD_FILENAME
        if not path.is_file() or path.read_text(encoding="utf-8") != str(render_card(spec)):
            stale.append(spec.name)
    return stale


# ----------------------------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------------------------


def write_training_model_card(
    output_dir: str | Path,
    *,
    metrics: dict,
    task: str,
    base_model: str,
    dataset_name: str,
    training_args: dict,
    eval_split: str = "evaluation",
    model_name: str | None = None,
) -> Path:
    """Writes `output_dir/README.md`, the card of the checkpoint a training run saved in `output_dir`.

    Args:
        output_dir: the run's output directory; it must already hold the saved model (`config.json`).
        metrics: numbers measured by the run's evaluation, `{name: value}` (nested dicts are flattened to "a/b").
        task: `"video-text-retrieval"` or `"video-classification"`.
        base_model: the CLIP checkpoint the run started from (Hub id or path).
        dataset_name: the dataset the run trained and evaluated on.
        training_args: the run's arguments (listed in the card as they are).
        eval_split: the split `metrics` were measured on.
        model_name: name used in the card's usage snippet; defaults to the directory name.
    """
    output_dir = Path(output_dir)
    _task_info(task, "write_training_model_card: task")
    config = _saved_stan_config(output_dir)
    if not isinstance(training_args, Mapping):
        raise ModelCardError(
            f"write_training_model_card: training_args must be a mapping, got {type(training_args).__name__} "
            "(pass vars(args) or TrainingArguments.to_dict())."
        )
    name = model_name or output_dir.name
    dataset_id = _slug(dataset_name) or "dataset"
    measured = _numeric_metrics(metrics, "write_training_model_card: metrics")
    results = []
    if measured:
        results.append(
            ResultTable(
                caption=f"Measured on {dataset_name} ({eval_split}) at the end of training:",
                dataset_id=dataset_id,
                dataset_name=dataset_name,
                split=eval_split,
                source_name="measured by this training run",
                metrics=measured,
            )
        )
    spec = CardSpec(
        name=name,
        title=f"{name}: STAN fine-tuned on {dataset_name}",
        task=task,
        base_model=base_model,
        repo_id=name,
        origin=f"Trained with the `stan-video` package from `{base_model}` on {dataset_name}.",
        config=config,
        recipe=[(key, value) for key, value in training_args.items()],
        datasets=[dataset_id],
        results=results,
        provenance=(
            f"every value was measured by the training run that produced this checkpoint, on the {eval_split} split "
            f"of {dataset_name}, with the arguments listed under Training hyperparameters."
            if measured
            else "No numbers are listed: the training run reported no metrics."
        ),
        limitations=[
            f"It was trained and evaluated on {dataset_name} only; expect lower scores on videos unlike that data."
        ],
    )
    path = output_dir / CARD_FILENAME
    render_card(spec).save(path)
    return path


# The STAN fields a card lists from a saved config.json (the CLIP tower sizes are implied by the base model).
_CARD_CONFIG_FIELDS = (
    "stan_depth",
    "temporal_module",
    "num_frames",
    "alignment",
    "mug_variant",
    "fixed_logit_scale",
    "classifier_type",
    "num_labels",
)


def _saved_stan_config(output_dir: Path) -> dict:
    config_path = output_dir / "config.json"
    if not config_path.is_file():
        raise ModelCardError(
            f"write_training_model_card: {config_path} not found; save the model in {output_dir} before writing "
            "its card."
        )
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelCardError(f"{config_path}: not valid JSON ({error}).") from error
    if saved.get("id2label"):
        saved["num_labels"] = len(saved["id2label"])
    return {key: saved[key] for key in _CARD_CONFIG_FIELDS if saved.get(key) is not None}


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Render or check the model cards in hub_cards/.")
    parser.add_argument("command", choices=["render", "check"])
    parser.add_argument("--output-dir", default=str(HUB_CARDS_DIR), help="where the <name>/README.md cards live")
    args = parser.parse_args(argv)
    try:
        if args.command == "render":
            for path in write_published_cards(args.output_dir):
                print(f"wrote {path}")
            return
        stale = stale_published_cards(args.output_dir)
    except ModelCardError as error:
        parser.exit(2, f"error: {error}\n")
    if stale:
        parser.exit(1, f"stale or missing cards (run `python -m modeling_stan.hub.model_card render`): {stale}\n")
    print("all cards are up to date and valid")


if __name__ == "__main__":
    main()
