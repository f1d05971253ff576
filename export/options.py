"""What ``moechat export`` is asked to do: :class:`ExportOptions`, typed and validated.

Values are Literal types (the CLI's ``choices``); a wrong value or a combination that
does not make sense is one :class:`MoechatError` line, raised when the options are made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from moechat.export.int8.quantize import NBITS_BLOCK_SIZES
from moechat.runtime.errors import MoechatError
from moechat.runtime.manifest import MAX_CONTEXT, MIN_CONTEXT

MoeImpl = Literal["contrib", "ops", "qmoe"]  # onnxruntime MoE op, standard ops, int8 QMoE
Attention = Literal["gqa", "ops"]  # GroupQueryAttention, or standard ops
Int8Matmuls = Literal["nbits", "dynamic"]  # MatMulNBits, or dynamic quantisation
Variant = Literal["dml"]  # extra per-provider graphs
Int4Level = Literal["all", "experts"]  # 4-bit matmuls and experts, or routed experts only

INT8_DEFAULT_MOE: MoeImpl = "qmoe"  # fastest on CPU at decode: docs/decisions/0001-*


@dataclass
class ExportOptions:
    moe_impl: MoeImpl | None = None  # None: "contrib" (fp32) or INT8_DEFAULT_MOE (int8)
    attention: Attention = "gqa"
    max_context: int | None = None
    name: str | None = None
    force: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)  # sampling defaults
    extra_manifest: dict[str, Any] = field(default_factory=dict)
    int8: bool = False  # a quantised package: 8-bit weights unless int4 says otherwise
    int4: Int4Level | None = None  # 4-bit weights (sets int8: the same quantisation step)
    int8_matmuls: Int8Matmuls | None = None  # None: "nbits"
    int8_block: int | None = None  # MatMulNBits block (default: default_nbits_block)
    expert_block: int | None = None  # QMoE block of the routed experts (default: 32)
    int8_residual_pass: bool = False  # export.int8.residual_pass (slower, more accurate)
    heldout: Path | None = None  # fidelity text (default: the shipped heldout.txt)
    variants: tuple[Variant, ...] = ()
    fp16: bool = False  # float16 graph and KV cache (for CUDA)
    quick_parity: bool = False  # 2 prompts x 8 decode steps instead of 6 x 16 (the demo)

    def __post_init__(self) -> None:
        _check_choice("--int4", self.int4, Int4Level)
        if self.int4 is not None:
            if self.int8:
                raise MoechatError("--int8 and --int4 are alternatives: choose one")
            self.int8 = True
        validate_options(self)
        if self.moe_impl is None:
            self.moe_impl = INT8_DEFAULT_MOE if self.int8 else "contrib"

    @property
    def fp32_moe_impl(self) -> Literal["contrib", "ops"]:
        """The lowering of the traced fp32 graph (QMoE is rewritten from the MoE op)."""
        return "ops" if self.moe_impl == "ops" else "contrib"


def _check_choice(flag: str, value: object, kind: Any) -> None:
    if value is not None and value not in get_args(kind):
        raise MoechatError(f"{flag} must be one of {', '.join(get_args(kind))} (got {value!r})")


def validate_options(options: ExportOptions) -> None:
    """Reject unknown values and combinations that only make sense for fp32 (or int8)."""
    if options.max_context is not None and not (
        MIN_CONTEXT <= options.max_context <= MAX_CONTEXT
    ):  # 0 is not "the default": it is an error, as is a RoPE table of 10**12 rows
        raise MoechatError(
            f"--max-context must be between {MIN_CONTEXT} and {MAX_CONTEXT} tokens "
            f"(got {options.max_context})"
        )
    _check_choice("--moe-impl", options.moe_impl, MoeImpl)
    _check_choice("--attention", options.attention, Attention)
    _check_choice("--int8-matmuls", options.int8_matmuls, Int8Matmuls)
    for variant in options.variants:
        _check_choice("--variant", variant, Variant)
    if options.int8_block is not None and options.int8_block not in NBITS_BLOCK_SIZES:
        raise MoechatError(f"--int8-block must be one of {', '.join(map(str, NBITS_BLOCK_SIZES))}")
    if options.expert_block is not None:
        from moechat.export.int8.quantize import QMOE_BLOCK_CHOICES

        if options.expert_block not in QMOE_BLOCK_CHOICES:
            raise MoechatError(
                f"--expert-block must be one of {', '.join(map(str, QMOE_BLOCK_CHOICES))}"
            )
        if not (options.int8 or options.int4) or options.moe_impl == "ops":
            raise MoechatError(
                "--expert-block sets the QMoE op's blocks: it needs --int8 or --int4"
            )
    if options.fp16 and options.int8:
        raise MoechatError("--fp16 and --int8 are alternatives: choose one")
    if options.fp16 and options.variants:
        raise MoechatError("--variant adds float32 graphs; it does not combine with --fp16")
    if options.int4 is not None:
        if options.int8_matmuls == "dynamic":
            raise MoechatError("--int4 matmuls are MatMulNBits: not with --int8-matmuls dynamic")
        if options.int4 == "experts" and options.moe_impl == "ops":
            raise MoechatError("--int4-experts quantises the QMoE op's experts: not with ops")
    if options.int8:
        if options.int8_block is not None and options.int8_matmuls == "dynamic":
            raise MoechatError(
                "--int8-block sets MatMulNBits blocks: not with --int8-matmuls dynamic"
            )
        if options.int8_residual_pass and options.int8_matmuls == "dynamic":
            raise MoechatError(
                "--int8-residual-pass is a second MatMulNBits pass: not with --int8-matmuls dynamic"
            )
        if options.moe_impl == "contrib":
            raise MoechatError(
                "--moe-impl contrib is the fp32 MoE op; with --int8 use qmoe (int8 MoE op) or ops"
            )
    else:
        if options.moe_impl == "qmoe":
            raise MoechatError("--moe-impl qmoe is the int8 MoE op: it needs --int8")
        int8_only = (
            ("--heldout", options.heldout),
            ("--int8-matmuls", options.int8_matmuls),
            ("--int8-block", options.int8_block),
            ("--int8-residual-pass", options.int8_residual_pass or None),
        )
        for flag, value in int8_only:
            if value is not None:
                raise MoechatError(f"{flag} only applies to --int8 exports")
