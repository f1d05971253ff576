"""Run llama.cpp's ``convert_hf_to_gguf.py`` on an HF folder (a subprocess entry).

    python -m moechat.export.bench_anchors.llama_convert CONVERTER_DIR FOLDER OUT OUTTYPE

The converter runs untouched except for the vocabulary, which the benchmark does not use
(every engine gets the same prompt ids): a BPE pre-tokenizer it does not recognise (it
hashes the ids of a fixed text and looks the hash up among released tokenizers) is taken
as llama.cpp's default split instead of stopping the conversion, with a warning on stderr; a folder
without ``tokenizer.model`` moves on to the BPE path without importing sentencepiece.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    root, folder, out, outtype = Path(argv[0]), argv[1], argv[2], argv[3]
    sys.path[:0] = [str(root / "gguf-py"), str(root)]
    from conversion import base

    base_pre = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):  # type: ignore[no-untyped-def]
        try:
            return base_pre(self, tokenizer)
        except NotImplementedError:
            print(
                "llama_convert: unknown BPE pre-tokenizer, llama.cpp's default assumed",
                file=sys.stderr,
            )
            return "default"

    sentencepiece = base.TextModel._create_vocab_sentencepiece

    def create_vocab_sentencepiece(self):  # type: ignore[no-untyped-def]
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError("no tokenizer.model")  # what the converter raises
        return sentencepiece(self)

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    base.TextModel._create_vocab_sentencepiece = create_vocab_sentencepiece
    script = str(root / "convert_hf_to_gguf.py")
    sys.argv = [script, folder, "--outfile", out, "--outtype", outtype]
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
