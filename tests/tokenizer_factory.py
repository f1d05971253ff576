"""A tiny, deterministic byte-level BPE tokenizer for self-contained tests.

``train_tiny_tokenizer(path)`` trains on built-in English + Chinese text and saves a
``tokenizer.json`` shaped like MiniMind's: ByteLevel pre-tokenizer/decoder, no normalizer,
no post-processor, and the special tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``
with ids 0, 1, 2. With the default 400 tokens most Chinese characters stay split across
several byte tokens, which is what the streaming tests need.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, how are you today?",
    "I am fine, thank you. And you?",
    "Mixture of experts models route each token to a few experts.",
    "The router picks the top two experts for every token.",
    "Small language models can run on a laptop without a GPU.",
    "Please write a short poem about the sea.",
    "The weather is nice and the sky is blue.",
    "What is the capital of France? The capital of France is Paris.",
    "Can you explain how attention works in a transformer?",
    "Attention lets every token look at the tokens before it.",
    "The key and value cache stores past states so decoding is fast.",
    "Numbers like 1, 2, 3, 42 and 2024 appear in text too.",
    "She said: it's a good day to learn something new.",
    "We don't need the internet to chat with this model.",
    "They're reading a book about history and science.",
    "Tokenizers split text into pieces called tokens.",
    "A byte level tokenizer never needs an unknown token.",
    "You are a helpful assistant.",
    "Tell me a joke about computers.",
    "Why did the computer go to the doctor? It had a virus.",
    "Sampling with a temperature makes the output more varied.",
    "Greedy decoding always picks the most likely next token.",
    "Top p sampling keeps the smallest set of likely tokens.",
    "The cat sat on the mat and looked out of the window.",
    "Good morning! Good night! See you later.",
    "This is a test of the emergency broadcast system.",
    "Python is a popular programming language.",
    "def add(a, b): return a + b",
    "for i in range(10): print(i)",
]

_CHINESE = [
    "你好，今天过得怎么样？",
    "我很好，谢谢你。你呢？",
    "混合专家模型把每个词元分配给少数几个专家。",
    "路由器为每个词元选择前两个专家。",
    "小型语言模型可以在没有显卡的笔记本电脑上运行。",
    "请写一首关于大海的短诗。",
    "今天天气很好，天空是蓝色的。",
    "法国的首都是哪里？法国的首都是巴黎。",
    "你能解释一下注意力机制是如何工作的吗？",
    "注意力让每个词元都能看到它前面的词元。",
    "键值缓存保存过去的状态，所以解码很快。",
    "我们不需要互联网就能和这个模型聊天。",
    "他们正在读一本关于历史和科学的书。",
    "分词器把文本切分成叫做词元的小片段。",
    "你是一个乐于助人的助手。",
    "给我讲一个关于电脑的笑话。",
    "中国的长城非常有名，每年都有很多游客。",
    "春天来了，花儿都开了。",
    "学习新知识是一件快乐的事情。",
    "北京是中国的首都，上海是一个大城市。",
    "我喜欢吃米饭和面条。",
    "这本书很有意思，我已经读了两遍。",
    "人工智能正在改变我们的生活。",
    "谢谢你的帮助，再见！",
    "早上好！晚上好！明天见。",
    "温度越高，输出越随机。",
    "贪心解码总是选择最可能的下一个词元。",
    "猫坐在垫子上，看着窗外。",
    "程序员喜欢用Python写代码。",
    "这是一个测试句子，包含中文和English混合。",
]


def corpus_lines() -> list[str]:
    """The built-in training text: a few hundred deterministic lines."""
    lines: list[str] = []
    n_en, n_zh = len(_ENGLISH), len(_CHINESE)
    for i in range(n_en):
        lines.append(_ENGLISH[i])
        lines.append(_CHINESE[i % n_zh])
        lines.append(f"{_ENGLISH[i]} {_CHINESE[(i * 7 + 3) % n_zh]}")
        lines.append(f"{_CHINESE[(i * 11 + 5) % n_zh]}{_CHINESE[(i * 13 + 1) % n_zh]}")
        lines.append(f"{_ENGLISH[(i * 5 + 2) % n_en]}\n{_ENGLISH[(i * 3 + 1) % n_en]}")
        lines.append(f"user\n{_ENGLISH[i]}\nassistant\n{_CHINESE[(i * 17 + 4) % n_zh]}")
        lines.append(f"system\n{_ENGLISH[18]}\nuser\n{_CHINESE[(i * 19 + 6) % n_zh]}")
        lines.append(f"{_CHINESE[i % n_zh]} {_ENGLISH[(i * 23 + 7) % n_en]}")
        lines.append(f"{_ENGLISH[(i * 29 + 8) % n_en]}  {_ENGLISH[(i * 31 + 9) % n_en]}")
        lines.append(f"{_CHINESE[(i * 37 + 10) % n_zh]}\n\n{_CHINESE[(i * 41 + 11) % n_zh]}")
    return lines


def build_tiny_tokenizer(vocab_size: int = 400) -> Tokenizer:
    """Train and return the tiny byte-level BPE tokenizer (in memory)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return tok


def train_tiny_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    """Train the tiny tokenizer and save it; return the ``tokenizer.json`` path.

    ``path`` is either a ``*.json`` file path or a directory (created if needed) that
    receives ``tokenizer.json``.
    """
    path = Path(path)
    out = path if path.suffix == ".json" else path / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(vocab_size).save(str(out))
    return out
