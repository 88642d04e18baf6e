"""The fine-tuned model's card (``finetune/model/README.md``), written from the run's own facts.

sentence-transformers writes an automatic card that, for a model loaded from a folder, says base model
"Unknown", no licence and no figures. This one names the base model and its licence (from the base
folder's card front matter), the data and recipe the run used, and the validation table the run measured.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

_FRONT = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.DOTALL)
_H1 = re.compile(r"^# +(.+?)\s*$", re.MULTILINE)


def base_facts(path: str | Path, spec_name: str) -> dict[str, Any]:
    """Name, licence, languages and hub id of the base model, from its folder's README.md when it has one."""
    card = Path(path) / "README.md"
    text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
    front: dict[str, Any] = {}
    if (match := _FRONT.match(text)) is not None:
        try:
            loaded = yaml.safe_load(match.group(1))
            front = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            front = {}
    heading = _H1.search(text[match.end():] if match else text)
    hub_id = spec_name if re.fullmatch(r"[\w.-]+/[\w.-]+", spec_name) and not Path(spec_name).exists() else None
    return {"name": (heading.group(1).strip() if heading else None) or hub_id or Path(str(path)).name,
            "license": front.get("license"), "language": front.get("language"), "hub_id": hub_id}


def model_card(base: dict[str, Any], recipe: dict[str, Any], counts: dict[str, Any], metrics: dict[str, Any],
               run_name: str) -> str:
    """The card's Markdown: YAML front matter the Hugging Face hub reads, then what the run did."""
    licence = base.get("license")
    front = {"license": licence or "other", "library_name": "sentence-transformers",
             "pipeline_tag": "sentence-similarity",
             "tags": ["sentence-transformers", "feature-extraction", "sentence-similarity", "embedtune"],
             **({"base_model": base["hub_id"]} if base.get("hub_id") else {}),
             **({"language": base["language"]} if base.get("language") else {})}
    ft = recipe.get("finetune", {})
    base_ndcg, best = metrics.get("base_val_ndcg@10"), metrics.get("best_val_ndcg@10")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
        f"# {run_name}: {base['name']} fine-tuned for retrieval on the run's documents", "",
        f"Fine-tuned by [embedtune](https://pypi.org/project/embedtune/) from **{base['name']}**"
        + (f" (`{base['hub_id']}`)" if base.get("hub_id") else "") + ".",
        f"Licence: **{licence}**, the base model's (the fine-tuned weights derive from it)." if licence else
        "Licence: **unknown**: the base model's card declares none; check its terms before sharing this model.",
        "", "## Data", "",
        f"{counts.get('examples')} synthetic query-passage examples generated from the run's corpus (sdg stage), "
        f"{counts.get('train_examples')} used for training and {counts.get('val_queries')} queries held out for "
        f"validation; {counts.get('negatives')} mined hard negatives per query"
        + (f" ({counts['filled_negatives']} queries filled with random passages)" if counts.get("filled_negatives")
           else "") + ".",
        "", "## Recipe", "",
        "| setting | value |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in [
            ("finetuning type", ft.get("finetuning_type")), ("loss", counts.get("loss")),
            ("steps", counts.get("steps")), ("epochs", counts.get("epochs")),
            ("global batch", counts.get("global_batch_size")), ("learning rate", ft.get("learning_rate")),
            ("temperature", ft.get("temperature")), ("Matryoshka dims", metrics.get("matryoshka_dims") or "off"),
            ("precision", metrics.get("precision")), ("seed", ft.get("seed"))]),
        "", "## Evaluation", "",
        f"Validation nDCG@10 on the {counts.get('val_queries')} held-out synthetic queries (the run's "
        "`eval/report.md` scores the held-out documents' queries, with BM25 and hybrid rows):", "",
        "| model | nDCG@10 |", "|---|---|",
        f"| base ({base['name']}) | {_fmt(base_ndcg)} |", f"| fine-tuned (best step {metrics.get('best_step')}) | "
        f"{_fmt(best)} |",
        "", "## Use", "", "```python", "from sentence_transformers import SentenceTransformer", "",
        'model = SentenceTransformer("path/to/this/folder")',
        'query = model.encode_query(["your question"])', 'docs = model.encode_document(["a passage"])', "```", "",
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a (no validation set)"
