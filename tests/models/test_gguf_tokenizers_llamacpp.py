"""GGUF pre-tokenizers of DeepSeek-V3-architecture files against implementations we did
not write: ``deepseek-v3`` (DeepSeek-V3 / R1; ``joyai-llm`` names the same regexes in
llama.cpp), ``glm4`` (GLM-4.7-Flash, a ``deepseek2`` file; ``chatglm-bpe`` the same) and
``kimi-k2`` (Kimi-K2 and Moonlight-16B-A3B, whose tiktoken tokenizer llama.cpp's
converter hashes to that name).

One tiny byte-level BPE vocabulary, trained without any pre-split so that merges run
across digits, spaces, punctuation and words (a wrong split changes the ids), is written
to a GGUF naming each pre-tokenizer. moechat's tokenizer.json from that file must give

- the ids of tests/bpe_reference.py: the name's regexes (llama.cpp's llama-vocab.cpp;
  kimi-k2: Moonshot's pattern) run with the ``regex`` package, merges applied by rank,
  no ``tokenizers``: runs everywhere, CI included;
- the ids of llama.cpp's own tokenizer on the same file (llama-cpp-python,
  ``vocab_only``), where llama-cpp-python is installed. For kimi-k2 llama.cpp runs its
  own code rather than Moonshot's pattern and departs from it on camelCase words and
  combining marks (:data:`KIMI_LLAMA_CPP_DIFFERS`); moechat keeps Moonshot's tokens.

The texts tell each part of the deepseek-v3 regexes apart (a reference with any one part
changed gives other ids), so a wrong regex fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("regex")

from bpe_reference import PATTERNS, ReferenceBPE  # noqa: E402
from test_gguf_tokenizers import CORPUS, gpt2, train_byte_level, write_bpe_gguf  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from moechat.models.gguf import open_gguf, write_tokenizer_files  # noqa: E402
from moechat.models.gguf_tokenizer import field  # noqa: E402
from moechat.runtime.tokenizer import TextTokenizer  # noqa: E402

TEXTS = [
    "1 22 333 4444 55555 666666 7777777 and 3.14159, 2024-06-01",
    "日本語のテキストです。ひらがな カタカナ ｶﾀｶﾅ 漢字かな交じり文 中文，还有 한국어",
    'Hello,world!foo.Bar (x)abc "q"word [y]z \'tis x.y.z',
    "line one\n\nline two\r\n  indented   runs   \t tab\n \n\n   ",
    "end.\n\nnext!\r\nmore:\n- item;\n\n",
    "emoji 😀👍🏽 and ✨ sparkles 🎉🎉",
    "naïve café résumé Ærøskøbing déjà re\u0301sume\u0301 A\u030a ½ ² ① Ⅻ",
    "$3.50 + 2^10 = 1024 <tag> a|b ~x `y` @z #42 100% &amp;",
    "don't I'LL we've They'RE it's HE'D",
    "Ｆｕｌｌ１２３４５ ٣٤٥٦ ¿Qué? ¡Sí! «ok» — “quotes”\u00a0nbsp\u3000ideo",
    "<|im_start|>user\nhi<|im_end|>",
    "汉字abc12345DEF 漢字かなカナ混じりtext 中文English混合 (括号)里 𠀀𪜀 㐀",
    "getUserName iPhone HTMLParser McDonald's O'Neil x'LL",
]
# texts llama.cpp 0.3.36 cuts otherwise than Moonshot's kimi-k2 pattern ("getUserName"
# whole; "e" and U+0301 apart)
KIMI_LLAMA_CPP_DIFFERS = {TEXTS[6], TEXTS[12]}
# tokenizer.ggml.pre -> the regexes of tests/bpe_reference.py it must equal
NAMES = {"deepseek-v3": "deepseek-v3", "joyai-llm": "deepseek-v3", "glm4": "glm4",
         "chatglm-bpe": "glm4", "kimi-k2": "kimi-k2"}  # fmt: skip


@pytest.fixture(scope="module")
def vocab_tokenizer() -> Tokenizer:
    """Byte-level BPE trained on the texts too, so that merges cross every boundary the
    regexes draw (combining marks, kana, digit runs, newlines)."""
    return gpt2(*train_byte_level((CORPUS + TEXTS) * 4, 1500))


@pytest.fixture(scope="module")
def files(vocab_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """pre-tokenizer name -> a deepseek2 GGUF holding the vocabulary under that name."""
    root = tmp_path_factory.mktemp("gguf-pre")
    tok = vocab_tokenizer
    return {
        name: write_bpe_gguf(root / f"{name}.gguf", "deepseek2", name, tok, add_bos=True)
        for name in NAMES
    }


def _reference(path: Path, pre: str | list[str]) -> ReferenceBPE:
    reader = open_gguf(path)
    tokens, merges = (field(reader, f"tokenizer.ggml.{k}") for k in ("tokens", "merges"))
    ref = ReferenceBPE(tokens, merges, pre if isinstance(pre, str) else "gpt2")
    if not isinstance(pre, str):
        ref.patterns = pre
    return ref


def _moechat(path: Path, folder: Path) -> TextTokenizer:
    return TextTokenizer.from_file(write_tokenizer_files(open_gguf(path), folder))


@pytest.mark.parametrize("name", ["deepseek-v3", "glm4", "kimi-k2"])
def test_pre_tokenizer_matches_llama_cpp_regexes(files, name, tmp_path) -> None:
    ours = _moechat(files[name], tmp_path)
    ref = _reference(files[name], NAMES[name])
    for text in TEXTS:
        ids = ref.encode(text)
        assert ours.encode_text(text) == ids, text
        assert ours.decode(ids) == text


def test_texts_tell_each_deepseek_v3_regex_apart(files) -> None:
    """Each part of the regexes changed (as a plausible wrong transcription would) gives
    other ids on these texts, so test_pre_tokenizer_matches_llama_cpp_regexes would fail."""
    digits, cjk, rest = PATTERNS["deepseek-v3"]
    wrong = {
        "digits unbounded": [r"\p{N}+", cjk, rest],
        "digits one by one": [r"\p{N}", cjk, rest],
        "no kana": [digits, "[\u4e00-\u9fa5]+", rest],
        "no punctuation+word": [digits, cjk, rest[rest.index("[A-Za-z]+|") + 10 :]],
        "no marks": [digits, cjk, rest.replace(r"[\p{L}\p{M}]+", r"\p{L}+")],
        "newlines not glued": [digits, cjk, rest.replace(r"+[\r\n]*", "+")],
        "GPT-2's": PATTERNS["gpt2"],
        "GLM-4's": PATTERNS["glm4"],
    }
    right = _reference(files["deepseek-v3"], "deepseek-v3")
    expected = [right.encode(t) for t in TEXTS]
    for what, patterns in wrong.items():
        ref = _reference(files["deepseek-v3"], patterns)
        assert [ref.encode(t) for t in TEXTS] != expected, what


@pytest.mark.parametrize("name", list(NAMES))
def test_pre_tokenizer_matches_llama_cpp_runtime(files, name, tmp_path) -> None:
    """llama.cpp's own tokenizer on the same file (controls typed in the text stay text,
    as moechat's runtime keeps them)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(files[name]), vocab_only=True, verbose=False)
    ours = _moechat(files[name], tmp_path)
    for text in TEXTS:
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        if name == "kimi-k2" and text in KIMI_LLAMA_CPP_DIFFERS:
            assert ours.encode_text(text) != ids, text  # the known departure, still there
        else:
            assert ours.encode_text(text) == ids, text
    # BOS as the file asks (llama.cpp's glm4 too: the file's bos_token_id wins)
    built = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert llm.tokenize(b"hi", add_bos=True, special=False) == built.encode("hi").ids
