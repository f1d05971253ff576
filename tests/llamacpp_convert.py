"""Run llama.cpp's convert_hf_to_gguf.py on tiny test checkpoints (a subprocess entry).

Usage: python llamacpp_convert.py LLAMA_CPP_DIR '[["FOLDER", "--outtype", "f32", ...], ...]'
(one converter run per argument list, in one process: torch is imported once).

Two things a real checkpoint has and a 400-token test tokenizer cannot:
- the converter names the BPE pre-tokenizer by hashing the ids of a fixed text and
  looking the hash up among real tokenizers; the test tokenizer uses GPT-2's split, so
  it is told "gpt2";
- the Llama/Granite path imports sentencepiece before it looks for tokenizer.model (and
  moves on to the BPE path without one): the missing file is reported first here, so
  sentencepiece need not be installed.
Weights and metadata go through the converter's own code untouched.
"""

import json
import runpy
import sys
from pathlib import Path

root = Path(sys.argv[1])
sys.path[:0] = [str(root / "gguf-py"), str(root)]

from conversion import base  # noqa: E402

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt2"
_sentencepiece = base.TextModel._create_vocab_sentencepiece


def _create_vocab_sentencepiece(self):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError("no tokenizer.model")  # what the converter raises after the import
    return _sentencepiece(self)


base.TextModel._create_vocab_sentencepiece = _create_vocab_sentencepiece
script = str(root / "convert_hf_to_gguf.py")
for args in json.loads(sys.argv[2]):
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
