"""CoMeT memories (docs/design.md): the gated global memory (S3) and the FIFO temporary memory (S4).

Every decoder layer owns one `LayerMemory` module (its parameters) and carries one `MemoryState`
(its tensors) from chunk to chunk. The state is a frozen dataclass: updates return a new state,
nothing is mutated in place, so BPTT truncation, device moves and sending it between processes
are one visible line each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class MemoryState:
    """One layer's memories between two chunks. All tensors are (B, slots, C)."""
    gate_state: Tensor     # s (S3): n_global slots, or 0 slots before the first chunk has closed
    global_memory: Tensor  # G = RLA(s) (S3): injected at the front of the next chunk
    temp_memory: Tensor    # T (S4): FIFO of compressed slots, oldest first, at most temp_budget

    @staticmethod
    def empty(batch: int, n_embd: int, device=None, dtype=None) -> MemoryState:
        """The state before the first chunk: no global slots yet, an empty FIFO."""
        z = torch.zeros(batch, 0, n_embd, device=device, dtype=dtype)
        return MemoryState(z, z, z)

    def prefix(self) -> Tensor:
        """[G; T] (B, n_g + n_t, C): what the next chunk sees in front of its tokens (S2)."""
        return torch.cat([self.global_memory, self.temp_memory], 1)

    @property
    def prefix_len(self) -> int:
        return self.global_memory.size(1) + self.temp_memory.size(1)

    def detach(self) -> MemoryState:
        """Cut the gradient path to earlier chunks (truncated BPTT)."""
        return MemoryState(*(t.detach() for t in self.tensors()))

    def to(self, *args, **kwargs) -> MemoryState:
        """Move/cast like `Tensor.to`, e.g. `state.to("cuda")`."""
        return MemoryState(*(t.to(*args, **kwargs) for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.gate_state, self.global_memory, self.temp_memory

    def pack(self) -> Tensor:
        """One contiguous tensor (B, 2*n_g + n_t, C) to send to another process."""
        return torch.cat(self.tensors(), 1).contiguous()

    @staticmethod
    def unpack(packed: Tensor, n_global: int) -> MemoryState:
        """Inverse of `pack`; n_global is 0 before the first chunk has closed."""
        s, g, t = packed.split([n_global, n_global, packed.size(1) - 2 * n_global], 1)
        return MemoryState(s, g, t)


class LowRankAdapter(nn.Module):
    """RLA(x) = x + W_up(W_down x), rank r, no bias (S3). W_up starts at zero: RLA starts as identity."""

    def __init__(self, n_embd: int, rank: int):
        super().__init__()
        self.down = nn.Linear(n_embd, rank, bias=False)
        self.up = nn.Linear(rank, n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(self.down(x))


class GlobalMemory(nn.Module):
    """S3: a gated recurrence over the layer's readout outputs, one scalar gate per slot.
    gated=False is the ablation without the gate: each chunk overwrites the memory (RMT-like)."""

    def __init__(self, n_embd: int, rank: int, eps: float, gated: bool = True, gate_bias: float = 0.0):
        super().__init__()
        self.norm = nn.RMSNorm(n_embd, eps=eps)
        # W_g: [s_{t-1}; s~] -> a logit per slot; gate_bias != 0: a bias starting there (3: g ~ 0.95 keeps the state)
        self.gate = nn.Linear(2 * n_embd, 1, bias=bool(gate_bias)) if gated else None  # init: Transformer.init_weights
        self.adapter = LowRankAdapter(n_embd, rank)

    def forward(self, readout: Tensor, state: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """readout r_t (B, n_global, C), state s_{t-1} (B, 0 or n_global, C) -> (s_t, G_{t+1}, gate).

        gate is (B, n_global, 1), or None on the first chunk, which has no previous state to keep (and
        without a gate).
        """
        candidate = self.norm(readout)  # S3: s~ = RMSNorm(r_t)
        if state.size(1) == 0 or self.gate is None:
            return candidate, self.adapter(candidate), None  # S3: first chunk, s_1 = s~ (ungated: every chunk)
        gate = torch.sigmoid(self.gate(torch.cat([state, candidate], -1)))  # S3: g = sigmoid(W_g [s; s~])
        state = gate * state + (1 - gate) * candidate  # S3: gated update, g keeps the old state
        return state, self.adapter(state), gate  # S3: G = RLA(s)


class TemporaryMemory(nn.Module):
    """S4: compression-token outputs, normalised and adapted, queued FIFO up to `budget` slots."""

    def __init__(self, n_embd: int, budget: int, rank: int, eps: float):
        super().__init__()
        self.budget = budget
        self.norm = nn.RMSNorm(n_embd, eps=eps)
        self.adapter = LowRankAdapter(n_embd, rank)

    def forward(self, compressed: Tensor, fifo: Tensor) -> Tensor:
        """compressed c_t (B, n_c, C), fifo T_t (B, n_t, C) -> T_{t+1} (B, min(n_t + n_c, budget), C)."""
        slots = self.adapter(self.norm(compressed))  # S4: m = RLA'(RMSNorm(c_t))
        return torch.cat([fifo, slots], 1)[:, -self.budget:]  # S4: keep the newest, evict the oldest


class LayerMemory(nn.Module):
    """Both memories of one layer; a memory whose size is 0 is absent (and has no parameters)."""

    def __init__(self, n_embd: int, n_global: int, temp_budget: int, rank: int, eps: float, gated: bool = True,
                 gate_bias: float = 0.0):
        super().__init__()
        self.global_mem = GlobalMemory(n_embd, rank, eps, gated, gate_bias) if n_global else None
        self.temp_mem = TemporaryMemory(n_embd, temp_budget, rank, eps) if temp_budget else None

    def forward(self, mem: MemoryState, readout: Tensor, compressed: Tensor) -> MemoryState:
        """The layer's outputs at the readout and compression rows of a closed chunk -> next state."""
        s, g, t = mem.tensors()
        if self.global_mem is not None:
            s, g, _ = self.global_mem(readout, s)
        if self.temp_mem is not None:
            t = self.temp_mem(compressed, t)
        return MemoryState(s, g, t)


def fifo_chunks(chunk_size: int, stride: int, temp_budget: int) -> int:
    """S4: how many chunks back the FIFO reaches (each closed chunk adds ceil(chunk_size / stride) slots); a chunk
    it keeps only part of counts. 0 without a FIFO."""
    return math.ceil(temp_budget / math.ceil(chunk_size / stride)) if temp_budget else 0


def memory_param_count(n_layer: int, n_embd: int, n_global: int, temp_budget: int, rank: int,
                       gated: bool = True, gate_bias: float = 0.0) -> int:
    """S5: parameters CoMeT adds to a decoder.

    Per layer: global memory = RMSNorm (d) + W_g (2d) + adapter (2*d*r); temporary memory = RMSNorm (d)
    + adapter (2*d*r). Plus embeddings: one compression token (if the FIFO is on) and n_global readout
    tokens. Both memories on: n_layer * (4d + 4*d*r) + (1 + n_global) * d. Without the gate: 2d less per layer;
    with a gate bias: 1 more.
    """
    d = n_embd
    gate = (2 * d + bool(gate_bias)) * gated
    per_layer = (d + gate + 2 * d * rank) * bool(n_global) + (d + 2 * d * rank) * bool(temp_budget)
    return n_layer * per_layer + (int(bool(temp_budget)) + n_global) * d
