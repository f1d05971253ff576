"""Write a tokenizer-only GGUF with llama.cpp's converter's own vocabulary code (a
subprocess entry, like llamacpp_convert.py).

Usage: python llamacpp_vocab.py LLAMA_CPP_DIR '[["HF_FOLDER", "OUT.gguf", "ARCH", "KIND", "PRE"], ...]'
(one GGUF per job, in one process).

KIND "sentencepiece" runs ``TextModel._set_vocab_sentencepiece`` (tokenizer.model, as for
Llama / Mistral / Mixtral), "gpt2" runs ``TextModel._set_vocab_gpt2`` (tokenizer.json via
AutoTokenizer). Those methods only need the folder, the hyper-parameters and a writer, so
they run on a stand-in for the model object and no weights are needed. The BPE
pre-tokenizer name the converter finds by hashing a real tokenizer's ids is PRE here (a
tiny test vocabulary hashes to nothing).
"""

import json
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

root = sys.argv[1]
sys.path[:0] = [str(Path(root) / "gguf-py"), root]

import gguf  # noqa: E402
from conversion import base  # noqa: E402

for folder, out, arch, kind, pre in json.loads(sys.argv[2]):
    model = SimpleNamespace(
        dir_model=Path(folder),
        hparams={},
        gguf_writer=gguf.GGUFWriter(out, arch),
        find_hparam=lambda keys, optional=False: None,
        get_vocab_base_pre=lambda tokenizer, pre=pre: pre,
    )
    for name in ("_create_vocab_sentencepiece", "get_vocab_base", "does_token_look_special"):
        setattr(model, name, partial(getattr(base.TextModel, name), model))
    if kind == "sentencepiece":
        base.TextModel._set_vocab_sentencepiece(model)
    else:
        base.TextModel._set_vocab_gpt2(model)
    w = model.gguf_writer
    w.add_context_length(1024)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
