"""Load checkpoints into :class:`CausalLM` without unpickling arbitrary objects.

Formats: a Hugging Face-style folder (config.json + model.safetensors or
pytorch_model.bin), a MiniMind native ``.pth`` state dict sized by a preset or flags,
and (see ``moechat.models.gguf``) GGUF files. Code shipped in a checkpoint folder
(``trust_remote_code`` modules) is never imported.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from moechat.models.config import ModelConfig, preset
from moechat.models.families import to_internal_keys
from moechat.models.modeling import CausalLM
from moechat.runtime.errors import MoechatError

_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadedCheckpoint:
    config: ModelConfig
    model: CausalLM
    source: Path
    weight_files: list[Path]
    tokenizer_dir: Path | None  # where tokenizer.json / tokenizer_config.json live


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or torch.load(weights_only=True) for .bin/.pth (no arbitrary pickles)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise MoechatError(f"cannot read {path}: {err}") from None
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol is not for users
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, i.e. running the file's code:
        # never pass that on.
        raise MoechatError(
            f"{path} holds Python objects besides tensors: moechat reads weights-only "
            "checkpoints (objects could run code); save the weights alone "
            "(model.state_dict()) or as safetensors"
        ) from None
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MoechatError(f"cannot read {path} as a weights-only state dict: {first}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # training checkpoints wrap the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MoechatError(f"{path} does not hold a state dict of tensors")
    return state


def clean_key(key: str) -> str | None:
    """A checkpoint key without wrapper prefixes; None for recomputed buffers."""
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    if "rotary_emb" in key or key.endswith(("freqs_cos", "freqs_sin")):
        return None  # recomputed buffers
    return key


def normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() for key, v in state.items() if (k := clean_key(key)) is not None}


def check_sizes(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    """Cheap checks of config.json's sizes against the weights, before building anything
    (a config claiming a million layers must not build a million modules first)."""
    layers = {int(m[1]) for k in state if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if layers and len(layers) != cfg.num_hidden_layers:
        raise MoechatError(
            f"checkpoint does not match the config: config.json says {cfg.num_hidden_layers} "
            f"layers, the weights hold {len(layers)}"
        )
    if cfg.use_moe:  # a config claiming 2**31 experts must not build them on the meta device
        for what, pattern, count in (
            ("routed experts", r"\.mlp\.experts\.(\d+)\.", cfg.n_routed_experts),
            ("shared experts", r"\.mlp\.shared_experts\.(\d+)\.", cfg.n_shared_experts),
        ):
            found = {int(m[1]) for k in state if (m := re.search(pattern, k))}
            if len(found) != count and (found or count > len(state)):
                raise MoechatError(
                    f"checkpoint does not match the config: config.json says {count} {what} "
                    f"per layer, the weights hold {len(found)}"
                )
    embed = state.get("model.embed_tokens.weight", state.get("lm_head.weight"))
    expected = (cfg.vocab_size, cfg.hidden_size)
    if embed is not None and tuple(embed.shape) != expected:
        raise MoechatError(
            f"checkpoint does not match the config: the embedding table is "
            f"{tuple(embed.shape)}, config.json says vocab x hidden = {expected}"
        )


def check_names_and_shapes(
    cfg: ModelConfig, state: dict[str, torch.Tensor], max_positions: int = 4096
) -> None:
    """``state`` (internal names; tensors may be on the meta device) against the
    parameters of ``cfg``'s model built on the meta device: names and shapes must match."""
    with torch.device("meta"):
        expected = dict(CausalLM(cfg, max_positions=max_positions).state_dict())
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise MoechatError(f"checkpoint does not match the {cfg.model_type} config: {detail}")
    for key, tensor in state.items():
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise MoechatError(
                f"checkpoint does not match the config: {key} has shape {tuple(tensor.shape)}, "
                f"config expects {tuple(expected[key].shape)} (wrong preset or flags?)"
            )


def build_model(
    cfg: ModelConfig, state: dict[str, torch.Tensor], max_positions: int = 4096
) -> CausalLM:
    """Instantiate ``cfg`` and load ``state`` strictly (names and shapes must match).

    Names and shapes are checked against a model built on the meta device first, so a
    config whose sizes disagree with the weights fails before anything is allocated.
    """
    state = to_internal_keys(normalise_keys(state), cfg)
    check_sizes(cfg, state)
    if cfg.tie_word_embeddings or "lm_head.weight" not in state:
        if "lm_head.weight" in state and "model.embed_tokens.weight" not in state:
            state["model.embed_tokens.weight"] = state["lm_head.weight"]
        if "lm_head.weight" in state and not torch.equal(
            state["lm_head.weight"], state["model.embed_tokens.weight"]
        ):
            cfg = cfg.with_changes(tie_word_embeddings=False)
        else:
            cfg = cfg.with_changes(tie_word_embeddings=True)
            state.pop("lm_head.weight", None)
    check_names_and_shapes(cfg, state, max_positions)
    model = CausalLM(cfg, max_positions=max_positions)
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings)
    return model.eval()


def load_hf_folder(folder: Path, max_positions: int = 4096) -> LoadedCheckpoint:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise MoechatError(f"{folder} has no config.json (is it a Hugging Face model folder?)")
    try:
        cfg = ModelConfig.from_hf_config(json.loads(config_file.read_text(encoding="utf-8")))
    except json.JSONDecodeError as err:
        raise MoechatError(f"{config_file} is not valid JSON: {err}") from None
    files = weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_state_dict(f))
    return LoadedCheckpoint(cfg, build_model(cfg, state, max_positions), folder, files, folder)


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: the shards an index names, or every weight file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise MoechatError(f"{index} is not a valid shard index: {err}") from None
        for name in names:
            if not isinstance(name, str) or Path(name).name != name:
                raise MoechatError(f"{index} names a shard outside the folder: {name!r}")
            if not (folder / name).is_file():
                raise MoechatError(f"{index} names a missing shard: {name}")
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise MoechatError(f"{folder} has no model.safetensors or pytorch_model.bin")
    return files


def load_pth(path: Path, cfg: ModelConfig, max_positions: int = 4096) -> LoadedCheckpoint:
    return LoadedCheckpoint(
        cfg, build_model(cfg, read_state_dict(path), max_positions), path, [path], None
    )


def load_checkpoint(
    source: Path,
    preset_name: str | None = None,
    overrides: dict | None = None,
    max_positions: int = 4096,
) -> LoadedCheckpoint:
    """Dispatch on the source: folder, ``.pth``/``.pt``/``.bin`` file, or ``.gguf``."""
    source = Path(source)
    if not source.exists():
        raise MoechatError(f"checkpoint not found: {source}")
    if source.is_dir():
        return load_hf_folder(source, max_positions)
    if source.suffix == ".gguf":
        from moechat.models.gguf import load_gguf

        return load_gguf(source, max_positions=max_positions)
    if preset_name is None and not overrides:
        raise MoechatError(
            f"{source.name} is a bare state dict: give its size with --preset (e.g. minimind2-moe)"
        )
    cfg = preset(preset_name) if preset_name else ModelConfig()
    if overrides:
        cfg = cfg.with_changes(**overrides)
    return load_pth(source, cfg, max_positions)
