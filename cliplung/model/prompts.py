"""Learnable prompts: CoOp, CoCoOp and CLIP-Lung's channel-wise conditional prompts (CCP).

Every prompt is a token sequence ``[SOT] c_1 … c_n <words> [EOT]`` whose ``n = model.n_ctx`` context
vectors ``c_j ∈ R^W`` (``W`` = text width) are learned; the words are fixed:

* class prompts, one per class: ``"benign."``, ``"unsure."``, ``"malignant."`` (2-class: no unsure);
* attribute prompts, one per LIDC attribute ``k`` (:data:`~cliplung.config.ATTRIBUTES` order):
  ``"the nodule is {attribute}."`` (``attribute_prompts: name``, as published) or a sentence that
  describes the nodule's (rounded) mean rating, e.g. ``"the nodule has marked spiculation."``
  (``attribute_prompts: rating``; see :data:`~cliplung.model.attributes.RATING_PROMPTS`).

Class and attribute prompts share the same context vectors. How they depend on image ``i`` (its
L2-normalised tokens ``v_ij``, ``j = 1..n``; ``φ`` the meta-net ``E → meta_hidden → W``,
``φ(v) = W₂ ReLU(W₁ v + b₁) + b₂``):

==========  ==========================================  =============================================
method      context token ``j`` of image ``i``           note
==========  ==========================================  =============================================
coop        ``c_ij = c_j``                              shared, not conditioned (Zhou et al. 2022a)
cocoop      ``c_ij = c_j + φ(normalize(mean_j v_ij))``  one global bias on every token (2022b)
cliplung    ``c_ij = c_j + φ(v_ij)``                    CCP: channel group ``j`` conditions token ``j``
==========  ==========================================  =============================================

Initialisation (as published): the context vectors start as the token embeddings of the first ``n``
BPE tokens of ``model.ctx_init`` ("a nodule image of" is 6 tokens: a, no, du, le, image, of — the
published code, with ``n = 4``, starts from "a no du le"); positions beyond the text's length start
from ``N(0, 0.02²)``. (The published code also cut its prompts' fixed words at BPE position
``n + 1``, so its class prompt read "[ctx] image of benign." and its attribute prompt "[ctx] is
subtlety."; here the words are kept whole.)

Token ids are non-persistent buffers (a checkpoint never carries stale prompts): the prompts cut
after the longest one (``max EOT position + 1``, used by the per-sample reference), and the prefix
tree of all prompts' words that :meth:`PromptLearner.pack` turns into one sequence per image — SOT,
context and shared words ("the nodule is") once, each token at its own position, attending to its
ancestors only: under the causal mask every prompt's EOT feature is unchanged, at about a third of
the tokens of the padded prompts (ViT-B-16, n_ctx 4: 54 positions per image instead of 11 × 15).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cliplung.config import ATTRIBUTES, ConfigError
from cliplung.model.attributes import RATING_PROMPTS, attribute_prompt
from cliplung.model.text_encoder import TextEncoder, simple_tokenizer

__all__ = ["PROMPT_METHODS", "PromptLearner", "tokenize_prompts"]

PROMPT_METHODS = ("coop", "cocoop", "cliplung")


def tokenize_prompts(texts: list[str], n_ctx: int, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[SOT] x×n_ctx <text> [EOT]`` ids, zero-padded to ``context_length``, and their EOT positions.

    The ``x`` placeholders are overwritten by the context vectors; their id is irrelevant except that
    it is smaller than EOT's (open_clip pools at ``argmax(ids)``).
    """
    tok = simple_tokenizer()
    placeholder = tok.encode("x")[0]
    ids = torch.zeros(len(texts), context_length, dtype=torch.long)
    eot = torch.zeros(len(texts), dtype=torch.long)
    for i, text in enumerate(texts):
        seq = [tok.sot_token_id, *([placeholder] * n_ctx), *tok.encode(text), tok.eot_token_id]
        if len(seq) > context_length:
            raise ConfigError(
                f"model.n_ctx: prompt {text!r} with {n_ctx} context tokens needs {len(seq)} positions, "
                f"more than the text tower's context length {context_length}"
            )
        ids[i, : len(seq)] = torch.tensor(seq)
        eot[i] = len(seq) - 1
    return ids, eot


class PromptLearner(nn.Module):
    """Context vectors (``ctx``), the meta-net (``meta_net``, not for coop) and the prompt token ids.

    Buffers: ``class_ids (C, L)``, ``class_eot (C,)``, ``attr_ids (K, R, L)``, ``attr_eot (K, R)``
    with ``K = 8`` attributes and ``R`` rating levels (``R = 1`` for name prompts; rating prompts of
    attributes with fewer levels repeat their last sentence, never selected), cut after the longest
    prompt; and the prefix tree of all prompts that :meth:`pack` uses (see :meth:`_build_trie`).
    """

    def __init__(
        self,
        *,
        method: str,
        text_encoder: TextEncoder,
        class_names: tuple[str, ...],
        n_ctx: int,
        ctx_init: str,
        meta_hidden: int,
        attribute_prompts: str,
    ):
        super().__init__()
        if method not in PROMPT_METHODS:
            raise ConfigError(f"model.method: {method!r} has no prompts; choose from {list(PROMPT_METHODS)}")
        if attribute_prompts not in ("name", "rating"):
            raise ConfigError(
                f"model.attribute_prompts: must be 'name' or 'rating', got {attribute_prompts!r}"
            )
        self.method = method
        self.n_ctx = n_ctx
        self.attribute_prompts = attribute_prompts
        width, embed_dim, context_length = (
            text_encoder.width,
            text_encoder.embed_dim,
            text_encoder.context_length,
        )

        class_ids, class_eot = tokenize_prompts([f"{c}." for c in class_names], n_ctx, context_length)
        if attribute_prompts == "name":
            sentences = [[attribute_prompt(a)] for a in ATTRIBUTES]
        else:
            levels = max(len(v) for v in RATING_PROMPTS.values())
            sentences = [
                list(RATING_PROMPTS[a]) + [RATING_PROMPTS[a][-1]] * (levels - len(RATING_PROMPTS[a]))
                for a in ATTRIBUTES
            ]
        n_levels = len(sentences[0])
        attr_ids, attr_eot = tokenize_prompts([s for row in sentences for s in row], n_ctx, context_length)
        length = int(max(class_eot.max(), attr_eot.max())) + 1
        self.register_buffer("class_ids", class_ids[:, :length].contiguous(), persistent=False)
        self.register_buffer("class_eot", class_eot, persistent=False)
        self.register_buffer(
            "attr_ids",
            attr_ids[:, :length].reshape(len(ATTRIBUTES), n_levels, length).contiguous(),
            persistent=False,
        )
        self.register_buffer("attr_eot", attr_eot.reshape(len(ATTRIBUTES), n_levels), persistent=False)
        self.n_levels = n_levels
        self._build_trie(
            torch.cat([class_ids, attr_ids]), torch.cat([class_eot, attr_eot]), attribute_prompts
        )

        ctx = torch.empty(n_ctx, width).normal_(std=0.02)
        words = simple_tokenizer().encode(ctx_init) if ctx_init else []
        if words:
            with torch.no_grad():
                init = text_encoder.embed_tokens(torch.tensor(words[:n_ctx]))
            ctx[: init.shape[0]] = init
        self.ctx = nn.Parameter(ctx)
        self.meta_net = None
        if method != "coop":
            self.meta_net = nn.Sequential(
                nn.Linear(embed_dim, meta_hidden), nn.ReLU(), nn.Linear(meta_hidden, width)
            )

    @property
    def num_classes(self) -> int:
        return self.class_ids.shape[0]

    def contexts(self, tokens: torch.Tensor) -> torch.Tensor:
        """Context vectors per image: ``(B, n, W)``; ``(1, n, W)`` for coop (shared by the batch)."""
        if self.method == "coop":
            return self.ctx.unsqueeze(0)
        if self.method == "cocoop":
            bias = self.meta_net(F.normalize(tokens.mean(dim=1), dim=-1)).unsqueeze(1)
        else:
            bias = self.meta_net(tokens)
        return self.ctx.unsqueeze(0) + bias

    def insert_context(self, embeddings: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Put context vectors ``(..., n, W)`` at positions ``1..n`` of embeddings ``(..., L, W)``."""
        shape = (*embeddings.shape[:-2], self.n_ctx, embeddings.shape[-1])
        return torch.cat(
            [embeddings[..., :1, :], ctx.expand(shape), embeddings[..., 1 + self.n_ctx :, :]], dim=-2
        )

    # ------------------------------------------------------------------ packed prompts

    def _build_trie(self, ids: torch.Tensor, eot: torch.Tensor, attribute_prompts: str) -> None:
        """Prefix tree of the prompts' words (everything after SOT and the context), as buffers.

        Prompt ``p`` (class ``c`` → ``p = c``; attribute ``k`` at level ``r`` → ``p = C + k·R + r``) is
        a path of trie nodes; a node is one token at one position, shared by every prompt that starts
        with the same words ("the nodule is ..."). ``node_ids (N,)``, ``node_pos (N,)`` (position in
        the prompt), ``node_anc (N, N)`` (``[i, j]``: node ``j`` is node ``i`` or one of its
        ancestors), ``prompt_nodes (P, N)`` (the nodes of each prompt), ``prompt_eot (P,)`` (its EOT
        node).
        """
        start = 1 + self.n_ctx
        index: dict[tuple[int, int], int] = {}
        node_ids: list[int] = []
        node_pos: list[int] = []
        paths: list[list[int]] = []
        for row, end in zip(ids.tolist(), eot.tolist(), strict=True):
            node, path = -1, []
            for pos in range(start, end + 1):
                key = (node, row[pos])
                if key not in index:
                    index[key] = len(node_ids)
                    node_ids.append(row[pos])
                    node_pos.append(pos)
                node = index[key]
                path.append(node)
            paths.append(path)
        n_nodes = len(node_ids)
        anc = torch.zeros(n_nodes, n_nodes, dtype=torch.bool)
        members = torch.zeros(len(paths), n_nodes, dtype=torch.bool)
        for p, path in enumerate(paths):
            members[p, path] = True
            for i, node in enumerate(path):
                anc[node, path[: i + 1]] = True
        n_classes = self.class_ids.shape[0]
        if attribute_prompts == "name":
            max_nodes = n_nodes  # every prompt is used by every image
        else:  # classes plus, per attribute, its longest sentence: an upper bound on any selection
            per_attr = [
                max(len(paths[n_classes + k * self.n_levels + r]) for r in range(self.n_levels))
                for k in range(len(ATTRIBUTES))
            ]
            max_nodes = min(n_nodes, int(members[:n_classes].any(0).sum()) + sum(per_attr))
        self.max_nodes = max_nodes
        self.register_buffer("sot_id", ids[:1, :1].clone(), persistent=False)
        self.register_buffer("node_ids", torch.tensor(node_ids), persistent=False)
        self.register_buffer("node_pos", torch.tensor(node_pos), persistent=False)
        self.register_buffer("node_anc", anc, persistent=False)
        self.register_buffer("prompt_nodes", members, persistent=False)
        self.register_buffer("prompt_eot", torch.tensor([path[-1] for path in paths]), persistent=False)

    def pack(
        self, ctx: torch.Tensor, select: torch.Tensor, text_encoder: TextEncoder
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One packed sequence per context row holding the selected prompts as a prefix tree.

        ``ctx (G, n, W)``; ``select (G, P)`` prompt indices. Returns embeddings ``(G, S, W)``,
        positions ``(G, S)``, attention mask ``(G, S, S)`` (bool, True = may attend) and the packed
        index of each selected prompt's EOT ``(G, P)``; ``S = 1 + n + max_nodes`` (all nodes when more
        than one prompt per attribute is selected).

        Sequence: ``[SOT, c_1..c_n]`` then the trie nodes used by the selected prompts. A node
        attends to SOT, the context and its own ancestors (itself included), each at its original
        position: exactly the positions its causal mask shows it inside its own prompt, so every
        prompt's EOT feature equals that of the prompt run alone, while shared words run once.
        """
        g, n_nodes, head = ctx.shape[0], self.node_ids.shape[0], 1 + self.n_ctx
        device = ctx.device
        # max_nodes bounds a selection of every class and one prompt per attribute; else take all.
        size = self.max_nodes if select.shape[1] == self.num_classes + len(ATTRIBUTES) else n_nodes
        used = self.prompt_nodes[select].any(dim=1)  # (G, N)
        ranks = torch.arange(n_nodes, device=device)
        order = torch.argsort((~used).long() * n_nodes + ranks, dim=1)[:, :size]  # used nodes first
        valid = used.gather(1, order)
        sot = text_encoder.embed_tokens(self.sot_id).expand(g, 1, -1)
        x = torch.cat([sot, ctx, text_encoder.embed_tokens(self.node_ids[order])], dim=1)
        positions = torch.cat(
            [torch.arange(head, device=device).expand(g, head), self.node_pos[order]], dim=1
        )
        mask = torch.zeros(g, head + size, head + size, dtype=torch.bool, device=device)
        mask[:, :head, :head] = torch.ones(head, head, dtype=torch.bool, device=device).tril()
        mask[:, head:, :head] = True
        mask[:, head:, head:] = self.node_anc[order[:, :, None], order[:, None, :]] & valid[:, None, :]
        slot = torch.zeros(g, n_nodes, dtype=torch.long, device=device)
        slot.scatter_(1, order, torch.arange(size, device=device).expand(g, -1))
        pool = head + slot.gather(1, self.prompt_eot[select])
        return x, positions, mask, pool
