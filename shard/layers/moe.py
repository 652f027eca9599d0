"""A sparse mixture of experts (Mixtral, Qwen3-MoE): a router scores the experts for each
token, the top_k run, and their outputs are summed with the router's weights.

Tokens are grouped by expert: each expert that has tokens in the step runs one product over
all of its rows (quantized or dense, as every other layer), so a step costs at most one call
per expert, never one per token. Each expert's intermediate features are split across the
tensor-parallel ranks as a dense MLP's are; the ranks' partial sums are all-reduced once for
the whole block.

A token's output is a function of its own row alone (batch invariance): its experts' products
are rows of products that are themselves row-invariant, and its weighted sum runs over its
top_k in a fixed order."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shard.checkpoint.weights import Weights
from shard.layers.mlp import MLP, MlpSpec


@dataclass(frozen=True)
class MoeSpec:
    num_experts: int
    top_k: int
    expert: MlpSpec  # each expert's MLP
    normalize: bool = True  # the top_k weights renormalized to sum to 1 (Mixtral always)
    block: str = "mlp"  # the block's name in a layer (Mixtral: block_sparse_moe)
    router: str = "gate"  # the router's name under the block


class SparseMoE(nn.Module):
    def __init__(self, spec: MoeSpec, weights: Weights, prefix: str):
        super().__init__()
        if spec.expert.bias:
            raise ValueError("experts with biases are not supported")
        self.spec, self.dist = spec, weights.dist
        self.router = nn.Parameter(weights.get(f"{prefix}.{spec.router}.weight"), False)  # [E, H]
        self.experts = nn.ModuleList(
            MLP(spec.expert, weights, f"{prefix}.experts.{e}") for e in range(spec.num_experts)
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> the top_k experts of each token [T, k] and their weights [T, k]
        (float32), as transformers: softmax over every expert, then the top_k."""
        probs = torch.softmax(nn.functional.linear(x, self.router).float(), dim=-1)
        weights, experts = torch.topk(probs, self.spec.top_k, dim=-1)
        if self.spec.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        experts, weights = self.route(x)
        k = self.spec.top_k
        outputs = x.new_zeros(x.shape[0], k, x.shape[1])  # [T, k, hidden]: each choice's output
        flat = experts.flatten()  # [T * k]: token t's j-th choice at t * k + j
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.spec.num_experts).tolist()
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            picks = order[start : start + count]  # [n] positions in flat
            start += count
            tokens = picks // k
            y = self.experts[expert].partial(x[tokens])  # [n, hidden] (this rank's part)
            outputs.view(-1, x.shape[1])[picks] = y
        out = (outputs[:, 0].float() * weights[:, :1]).to(x.dtype)
        for j in range(1, k):  # in choice order, the same for every token
            out = out + (outputs[:, j].float() * weights[:, j : j + 1]).to(x.dtype)
        return self.dist.all_reduce(out)
