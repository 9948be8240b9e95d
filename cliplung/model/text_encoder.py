"""The text tower: open_clip's ``TextTransformer`` fed with prompt embeddings, and its tokenizer.

The tower is built from an open_clip model config: ``cliplung/model/configs/<name>.json`` first (the
debug preset's ``cliplung-tiny``), then open_clip's own configs (``ViT-B-16`` for the paper preset).
Weights are random unless ``model.text_pretrained`` is the path of an open_clip checkpoint
(:func:`load_text_weights`): a file (``.pt`` / ``.bin`` read with ``torch.load(weights_only=True)``,
or ``.safetensors``) holding an open_clip checkpoint (``{"state_dict": ...}``), a plain open_clip
``CLIP`` / ``CustomTextCLIP`` state dict, a ``TextTransformer`` state dict or a cliplung model
state dict, or a directory holding one (a Hugging Face hub snapshot of an open_clip model:
``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``). The text-tower keys are
extracted (``module.`` / ``text.`` / ``text_encoder.tower.`` prefixes stripped, ``visual.*`` and other
keys ignored) and checked against the model config before they are loaded: the vocabulary against
the tokenizer's (CLIP's BPE, 49408 tokens), the context length, the width, the projection
(width × ``embed_dim``) and the number of layers, each mismatch a :class:`ConfigError` naming
``model.text_pretrained``, the file and both values. **Nothing is downloaded at run time**: an
open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``) is refused with the command that fetches
its weights once (see README, "Pretrained text tower").

OpenAI's weights were trained with QuickGELU, which the weights do not show: load them with the
``*-quickgelu`` model config (``model.text_model: ViT-B-16-quickgelu``).

Forward pass on prompt embeddings ``X ∈ R^{N×L×W}`` (token embeddings with the context vectors
already in place) and the end-of-text positions ``e ∈ {0..L-1}^N``::

    H = Transformer(X + P[:L], causal mask M[:L, :L])        P: positional embedding
    t_i = LN_final(H[i, e_i]) · W_proj ∈ R^E                  (E = embed_dim)

which is open_clip's ``TextTransformer.forward`` (argmax pooling: the EOT id 49407 is the largest
token id, so ``argmax(ids) = e``) except that it starts from embeddings instead of ids and may run on
fewer than ``context_length`` positions. With the causal mask, position ``e`` attends only to
positions ``≤ e``, so cutting every sequence after the longest prompt's EOT changes nothing.
:meth:`TextEncoder.forward_packed` goes one step further: with ``M`` the ancestor mask of a prefix
tree of prompts (``M_ij = 0`` if token ``j`` precedes token ``i`` in ``i``'s own prompt, else −∞) and
``P`` taken at each token's own position, one sequence holds many prompts and each EOT feature
is still that of its prompt run alone.

The token-embedding table is always frozen (it only supplies the fixed words of the prompts; the
published code stores those as constant buffers). ``trainable=False`` freezes the rest too.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import open_clip
import open_clip.model
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import text_global_pool
from torch import nn

from cliplung.config import ConfigError

__all__ = [
    "CONFIG_DIR",
    "HUB_WEIGHT_FILES",
    "TextEncoder",
    "check_text_weights",
    "extract_text_state_dict",
    "load_text_weights",
    "simple_tokenizer",
    "text_model_config",
]

CONFIG_DIR = Path(__file__).parent / "configs"
"""cliplung's own open_clip-format model configs (``<name>.json``)."""

_TEXT_KEYS = (
    "token_embedding.",
    "positional_embedding",
    "transformer.",
    "ln_final.",
    "text_projection",
    "cls_emb",
)
_PREFIXES = ("module.", "_orig_mod.", "text_encoder.tower.", "tower.", "text.")


def text_model_config(name: str) -> dict[str, Any]:
    """The open_clip model config (``embed_dim``, ``text_cfg``, ...) named ``model.text_model``."""
    local = CONFIG_DIR / f"{name}.json"
    if local.is_file():
        return json.loads(local.read_text())
    cfg = open_clip.get_model_config(name) if "/" not in name and ":" not in name else None
    if cfg is None:
        choices = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ConfigError(
            f"model.text_model: unknown model config {name!r}; use one of cliplung's {choices} or an "
            f"open_clip config such as 'ViT-B-16' (see open_clip.list_models())"
        )
    return cfg


@functools.cache
def simple_tokenizer() -> SimpleTokenizer:
    """open_clip's CLIP BPE tokenizer (its vocabulary ships with open_clip; nothing is downloaded)."""
    return SimpleTokenizer()


def extract_text_state_dict(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The text-tower entries of an open_clip / cliplung state dict, keyed as in ``TextTransformer``."""
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = key
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix) :], True
        if name.startswith(_TEXT_KEYS) and name != "attn_mask":
            out[name] = value
    return out


HUB_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""File names of an open_clip model in a Hugging Face hub snapshot, in the order they are tried."""


def _weights_file(source: str, model_name: str) -> str:
    """The weights file ``model.text_pretrained`` names (a directory: its hub weights file)."""
    if os.path.isdir(source):
        for name in HUB_WEIGHT_FILES:
            if os.path.isfile(os.path.join(source, name)):
                return os.path.join(source, name)
        raise ConfigError(
            f"model.text_pretrained: directory {source!r} holds none of {list(HUB_WEIGHT_FILES)}"
        )
    if os.path.isfile(source):
        return source
    hint = ""
    if source in open_clip.list_pretrained_tags_by_model(model_name):
        hint = (
            f" {source!r} is an open_clip pretrained tag of {model_name!r}, and cliplung downloads nothing "
            f'at run time: save the weights once on a machine with internet, e.g. python -c "import '
            f"open_clip, torch; m = open_clip.create_model({model_name!r}, pretrained={source!r}); "
            f"torch.save(m.state_dict(), 'text-tower.pt')\", and set model.text_pretrained to that file "
            f"(README: Pretrained text tower)."
        )
    raise ConfigError(
        f"model.text_pretrained: {source!r} is neither an existing file nor a directory holding one.{hint}"
    )


def _read_state(path: str) -> dict[str, Any]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"model.text_pretrained: cannot read {path!r}: {exc}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"model.text_pretrained: {path!r} does not hold a state dict")
    return state


def check_text_weights(
    state: dict[str, torch.Tensor], cfg: dict[str, Any], model_name: str, path: str
) -> None:
    """Refuse text-tower weights that do not fit model config ``cfg`` or CLIP's tokenizer, naming
    the first mismatch (vocabulary, context length, width, projection, layers)."""
    text_cfg = cfg["text_cfg"]
    width, embed_dim = int(text_cfg.get("width", 512)), int(cfg["embed_dim"])
    vocab, context = int(text_cfg.get("vocab_size", 49408)), int(text_cfg.get("context_length", 77))
    tokenizer_vocab = len(simple_tokenizer().encoder)
    where = f"model.text_pretrained: {path!r} does not fit model.text_model {model_name!r}"

    def shape(key: str) -> tuple[int, ...] | None:
        return tuple(state[key].shape) if key in state else None

    if vocab != tokenizer_vocab:
        raise ConfigError(
            f"model.text_model: {model_name!r} has a vocabulary of {vocab} tokens, CLIP's BPE tokenizer "
            f"(the one cliplung's prompts use) has {tokenizer_vocab}"
        )
    checks = [
        (
            "token_embedding.weight",
            (tokenizer_vocab, width),
            "vocabulary x width (the tokenizer's vocabulary)",
        ),
        ("positional_embedding", (context, width), "context length x width"),
        ("text_projection", (width, embed_dim), "width x embed_dim"),
    ]
    for key, expected, what in checks:
        got = shape(key)
        if got is not None and got != expected:
            raise ConfigError(f"{where}: {key} is {got}, the model needs {expected} ({what})")
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")}
    if layers and len(layers) != int(text_cfg.get("layers", 12)):
        raise ConfigError(
            f"{where}: it has {len(layers)} transformer layers, the model config {text_cfg.get('layers', 12)}"
        )


def load_text_weights(source: str, model_name: str) -> dict[str, torch.Tensor]:
    """The checked text-tower weights of the open_clip checkpoint at ``source`` (module docstring)."""
    path = _weights_file(source, model_name)
    text = extract_text_state_dict(_read_state(path))
    if not text:
        raise ConfigError(
            f"model.text_pretrained: {path!r} holds no text-tower weights (looked for keys like "
            f"'token_embedding.weight', 'transformer.resblocks.0.*', 'text.*' or 'text_encoder.tower.*')"
        )
    check_text_weights(text, text_model_config(model_name), model_name, path)
    return text


class TextEncoder(nn.Module):
    """open_clip text tower (``self.tower``) that encodes prompt *embeddings*; see the module doc."""

    def __init__(self, model_name: str, *, pretrained: str | None = None, trainable: bool = True):
        super().__init__()
        cfg = text_model_config(model_name)
        text_cfg = dict(cfg["text_cfg"])
        if text_cfg.get("hf_model_name"):
            raise ConfigError(
                f"model.text_model: {model_name!r} has a Hugging Face text tower; only CLIP text transformers are supported"
            )
        if text_cfg.get("no_causal_mask") or text_cfg.get("embed_cls"):
            raise ConfigError(f"model.text_model: {model_name!r} needs a causal, CLS-free text transformer")
        quick_gelu = bool(cfg.get("quick_gelu", False))
        build = getattr(open_clip.model, "build_text_tower", None) or open_clip.model._build_text_tower
        self.tower = build(cfg["embed_dim"], text_cfg, quick_gelu=quick_gelu, cast_dtype=None)
        if self.tower.text_projection is None or isinstance(self.tower.text_projection, nn.Linear):
            raise ConfigError(
                f"model.text_model: {model_name!r}: only a plain projection matrix is supported"
            )
        self.model_name = model_name
        self.embed_dim: int = cfg["embed_dim"]
        self.width: int = self.tower.width
        self.context_length: int = self.tower.context_length
        if pretrained:
            state = load_text_weights(pretrained, model_name)
            missing, unexpected = self.tower.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ConfigError(
                    f"model.text_pretrained: {pretrained!r} does not match text model {model_name!r}: "
                    f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
                )
        self.tower.token_embedding.weight.requires_grad_(False)
        if not trainable:
            self.tower.requires_grad_(False)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``(..., L)`` → embeddings ``(..., L, W)`` (the table is frozen)."""
        return self.tower.token_embedding(ids)

    def forward(self, embeddings: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """``(N, L, W)`` prompt embeddings, ``(N,)`` EOT positions → unnormalised features ``(N, E)``."""
        length = embeddings.shape[1]
        x = embeddings + self.tower.positional_embedding[:length]
        x = self.tower.transformer(x, attn_mask=self.tower.attn_mask[:length, :length])
        # LayerNorm acts per position, so pooling first is exact and skips the unused positions.
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_index]
        return self.tower.ln_final(pooled) @ self.tower.text_projection

    def forward_packed(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, pool_index: torch.Tensor
    ) -> torch.Tensor:
        """Packed prompt embeddings ``(G, S, W)`` at ``positions (G, S)``, attention allowed where
        ``mask (G, S, S)`` is True → unnormalised features ``(G, P, E)`` read at ``pool_index (G, P)``.

        The mask replaces the causal one, so a prefix tree of prompts runs as one sequence (see
        :meth:`cliplung.model.prompts.PromptLearner.pack`).
        """
        tower = self.tower
        x = x + tower.positional_embedding[positions]
        additive = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        x = tower.transformer(x, attn_mask=additive.repeat_interleave(tower.heads, dim=0))
        rows = torch.arange(x.shape[0], device=x.device)[:, None]
        return tower.ln_final(x[rows, pool_index]) @ tower.text_projection

    def forward_ids(self, ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """open_clip's own path at full length: ``(N, context_length)`` ids (for argmax pooling) and
        their embeddings → features. Used by the per-sample reference formulation."""
        x = embeddings + self.tower.positional_embedding
        x = self.tower.transformer(x, attn_mask=self.tower.attn_mask)
        x = self.tower.ln_final(x)
        pooled = text_global_pool(x, ids, pool_type="argmax")
        return pooled @ self.tower.text_projection
