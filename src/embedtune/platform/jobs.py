"""Customization and evaluation job requests, and their mapping onto an embedtune :class:`Recipe`.

Field names follow NVIDIA's platforms so scripts port: the NeMo Platform v2 body (``model``, ``dataset``
{training, validation}, ``training`` {finetuning_type, lora, max_seq_length, retrieval}, ``schedule``,
``batch``, ``optimizer``, ``output``) and the older Customizer body (``config``, ``dataset`` {namespace,
name}, ``hyperparameters`` {finetuning_type, epochs, batch_size, learning_rate, weight_decay, lora
{adapter_dim, alpha, adapter_dropout}}, ``output_model``). Anything else of the recipe can be set through
``recipe`` (nested sections, as in a recipe YAML).
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Discriminator, Field, Tag, model_validator

from embedtune.config import PathName, RecipeError, validate_recipe
from embedtune.pipeline import STAGE_NAMES
from embedtune.platform.errors import PlatformError
from embedtune.platform.schemas import RequestModel

DEFAULT_LAST_STAGE = "eval"  # export is opt-in: it needs time and the serving path can use torch


class Strict(RequestModel):
    """Job request sections: unknown fields refused, every text storable (see :class:`RequestModel`)."""


class LoraParams(Strict):
    rank: int | None = Field(None, ge=1, validation_alias=AliasChoices("rank", "adapter_dim"))
    alpha: int | None = Field(None, ge=1)
    dropout: float | None = Field(None, ge=0, lt=1, validation_alias=AliasChoices("dropout", "adapter_dropout"))
    merge: bool | None = Field(None, description="accepted for compatibility; embedtune's lora is merged")


class RetrievalParams(Strict):
    train_n_passages: int | None = Field(None, ge=1, description="1 positive + (n-1) hard negatives")
    query_prefix: str | None = None
    passage_prefix: str | None = None
    temperature: float | None = Field(None, gt=0)


class TrainingParams(Strict):
    training_type: Literal["sft"] = "sft"
    finetuning_type: Literal["all_weights", "lora_merged", "lora"] | None = None
    lora: LoraParams | None = None
    max_seq_length: int | None = Field(None, gt=0)
    retrieval: RetrievalParams | None = None


class ScheduleParams(Strict):
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    validation_split: float | None = Field(None, ge=0, lt=1)


class BatchParams(Strict):
    global_batch_size: int | None = Field(None, ge=1)
    micro_batch_size: int | None = Field(None, ge=1)


class OptimizerParams(Strict):
    learning_rate: float | None = Field(None, gt=0)
    warmup_steps: int | None = Field(None, ge=0)
    weight_decay: float | None = Field(None, ge=0)
    lr_decay_style: str | None = None


class Hyperparameters(Strict):
    """The older Customizer's flat hyperparameters (also a compact form of the v2 sections)."""

    training_type: Literal["sft"] = "sft"
    finetuning_type: Literal["all_weights", "lora_merged", "lora"] | None = None
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    warmup_steps: int | None = Field(None, ge=0)
    max_seq_length: int | None = Field(None, gt=0)
    lora: LoraParams | None = None


class DatasetRef(Strict):
    training: str | None = None
    validation: str | None = Field(None, description="a BEIR dataset the eval stage scores on")
    shuffle: bool | None = None
    # older Customizer: {"namespace": ..., "name": ...}
    namespace: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _one_training_set(self) -> DatasetRef:
        if not (self.training or self.name):
            raise ValueError("dataset needs 'training' (or the older 'name')")
        return self

    @property
    def training_name(self) -> str:
        return self.training or (f"{self.namespace}/{self.name}" if self.namespace else str(self.name))


# A name, or an object: the body's shape picks the branch, so an error is reported for that one only
# (``dataset.object.namespace``), not as "not a string" first.
DatasetField = Annotated[
    Annotated[str, Tag("name")] | Annotated[DatasetRef, Tag("object")],
    Discriminator(lambda v: "name" if isinstance(v, str) else "object"),
]


class OutputParams(Strict):
    name: str | None = None


class CustomizationJobCreate(Strict):
    name: str | None = None
    description: str = ""
    model: str | None = Field(None, description="registered model name (default: 'default')")
    config: str | None = Field(None, description="older Customizer: the model config name")
    dataset: DatasetField
    stages: list[str] | None = Field(
        None, description="consecutive pipeline stages; default: corpus..eval for documents, finetune for "
                          "a prepared training set (plus eval when a validation dataset is given)")
    training: TrainingParams | None = None
    schedule: ScheduleParams | None = None
    batch: BatchParams | None = None
    optimizer: OptimizerParams | None = None
    hyperparameters: Hyperparameters | None = None
    output: OutputParams | None = None
    output_model: str | None = Field(None, description="older Customizer: the output model name")
    recipe: dict[str, Any] = Field(default_factory=dict, description="any other recipe keys, by section")

    @property
    def base_model(self) -> str:
        return self.model or self.config or "default"

    @property
    def training_dataset(self) -> str:
        return self.dataset if isinstance(self.dataset, str) else self.dataset.training_name

    @property
    def validation_dataset(self) -> str | None:
        return None if isinstance(self.dataset, str) else self.dataset.validation

    @property
    def output_name(self) -> str | None:
        return (self.output.name if self.output else None) or self.output_model


class EvaluationJobCreate(Strict):
    name: str | None = None
    model: str | None = Field(None, description="registered model name")
    deployment: str | None = Field(None, description="or a deployment: scores what is actually served")
    dataset: str = Field(description="a BEIR dataset of the workspace")
    split: PathName = Field("test", description="qrels/<split>.tsv: a file name, no path")
    k_values: list[Annotated[int, Field(ge=1, le=10_000)]] = Field(default_factory=lambda: [1, 5, 10, 100],
                                                                  max_length=32)
    top_k: int = Field(100, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=65_536)

    @model_validator(mode="after")
    def _one_target(self) -> EvaluationJobCreate:
        if (self.model is None) == (self.deployment is None):
            raise ValueError("give exactly one of 'model' or 'deployment'")
        return self


# ------------------------------------------------------------------------------------------- mapping


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    if value is None:
        return
    node = data
    *parents, leaf = dotted.split(".")
    for i, p in enumerate(parents):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):  # the request's recipe gave a value where a section belongs
            where = ".".join(parents[: i + 1])
            raise PlatformError(422, f"recipe.{where} must be an object (a section of keys), not "
                                     f"{type(node).__name__}", param=f"recipe.{where}", code="invalid_value")
    node[leaf] = value


def recipe_overrides(spec: CustomizationJobCreate) -> dict[str, Any]:
    """The recipe keys the request's named fields set (named fields win over ``recipe``)."""
    data = copy.deepcopy(spec.recipe)
    hp = spec.hyperparameters or Hyperparameters()
    tr, sc = spec.training or TrainingParams(), spec.schedule or ScheduleParams()
    ba, op = spec.batch or BatchParams(), spec.optimizer or OptimizerParams()
    lora = tr.lora or hp.lora or LoraParams()
    rt = tr.retrieval or RetrievalParams()
    ftype = tr.finetuning_type or hp.finetuning_type
    _set(data, "finetune.finetuning_type", "lora_merged" if ftype == "lora" else ftype)
    _set(data, "finetune.epochs", sc.epochs or hp.epochs)
    _set(data, "finetune.max_steps", sc.max_steps or hp.max_steps)
    _set(data, "finetune.validation_fraction", sc.validation_split)
    batch = ba.global_batch_size or hp.batch_size
    _set(data, "finetune.global_batch_size", batch)
    if batch is not None:
        _set(data, "finetune.auto_scale_batch", False)  # an explicit batch size is meant literally
    _set(data, "finetune.micro_batch_size", ba.micro_batch_size)
    _set(data, "finetune.learning_rate", op.learning_rate or hp.learning_rate)
    _set(data, "finetune.weight_decay", op.weight_decay if op.weight_decay is not None else hp.weight_decay)
    _set(data, "finetune.warmup_steps", op.warmup_steps if op.warmup_steps is not None else hp.warmup_steps)
    _set(data, "finetune.lr_scheduler", op.lr_decay_style)
    _set(data, "finetune.lora.rank", lora.rank)
    _set(data, "finetune.lora.alpha", lora.alpha)
    _set(data, "finetune.lora.dropout", lora.dropout)
    _set(data, "finetune.passages_per_query", rt.train_n_passages)
    _set(data, "finetune.temperature", rt.temperature)
    _set(data, "model.max_seq_length", tr.max_seq_length or hp.max_seq_length)
    _set(data, "model.query_prompt", rt.query_prefix)
    _set(data, "model.passage_prompt", rt.passage_prefix)
    return data


def choose_stages(requested: list[str] | None, dataset_format: str, has_validation: bool) -> list[str]:
    """The consecutive stages to run; a prepared training set starts at finetune."""
    start = "finetune" if dataset_format == "training" else "corpus"
    if requested is None:
        last = DEFAULT_LAST_STAGE if (start == "corpus" or has_validation) else "finetune"
        return list(STAGE_NAMES[STAGE_NAMES.index(start): STAGE_NAMES.index(last) + 1])
    unknown = [s for s in requested if s not in STAGE_NAMES]
    if unknown or not requested:
        raise PlatformError(422, f"unknown stage(s) {unknown or requested}; stages are: {', '.join(STAGE_NAMES)}",
                            param="stages", code="invalid_value")
    idx = [STAGE_NAMES.index(s) for s in requested]
    if idx != list(range(idx[0], idx[0] + len(idx))):
        raise PlatformError(422, f"stages must be consecutive, in pipeline order: {', '.join(STAGE_NAMES)}",
                            param="stages", code="invalid_value")
    if requested[0] != start:
        what = "a prepared training set" if start == "finetune" else f"a '{dataset_format}' dataset"
        raise PlatformError(422, f"with {what} the stages must start at '{start}', not '{requested[0]}'",
                            param="stages", code="invalid_value")
    return list(requested)


def build_recipe(spec: CustomizationJobCreate, *, job_id: str, model_path: str, dataset_format: str,
                 dataset_path: str, validation_path: str | None,
                 resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full, validated recipe (as a JSON dict) the worker runs; ``resolved`` holds the server paths the
    platform found for the recipe's dataset references (see :func:`embedtune.platform.sandbox.check_recipe`)."""
    data = recipe_overrides(spec)
    for key, value in (resolved or {}).items():
        _set(data, key, value)
    data["name"] = job_id
    _set(data, "model.name", model_path)
    if dataset_format in ("corpus", "beir"):
        corpus = f"{dataset_path}/corpus.jsonl" if dataset_format == "beir" else dataset_path
        _set(data, "corpus.path", corpus)
    _set(data, "eval.dataset", validation_path)
    try:
        return validate_recipe(data).model_dump(mode="json")
    except RecipeError as exc:
        param = f"recipe.{exc.key}" if exc.key else "recipe"
        raise PlatformError(422, str(exc), param=param, code="invalid_recipe") from None


def hyperparameters_of(recipe: dict[str, Any]) -> dict[str, Any]:
    """What a model's lineage records: the fine-tuning settings that shaped it."""
    ft = dict(recipe.get("finetune", {}))
    keep = ("finetuning_type", "epochs", "max_steps", "learning_rate", "weight_decay", "warmup_steps",
            "global_batch_size", "micro_batch_size", "auto_scale_batch", "passages_per_query", "temperature",
            "lora")
    out = {k: ft[k] for k in keep if k in ft}
    out["max_seq_length"] = recipe.get("model", {}).get("max_seq_length")
    return out
