import pytest
import torch

from model import ModelConfig, Transformer, chunk_closed
from stream import new_stream

torch.set_num_threads(1)  # tests are tiny; one thread avoids oversubscribing a 2-core CI machine


def tiny_config(**overrides) -> ModelConfig:
    """A CoMeT small enough for exact fp32 checks in milliseconds: chunk 8, 2 compression tokens
    per chunk, 3 global slots, a FIFO of 3 slots (so it evicts mid-chunk)."""
    args = dict(vocab_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, chunk_size=8, n_global=3,
                stride=4, temp_budget=3, adapter_rank=4)
    return ModelConfig(**{**args, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**overrides))
    # Give the zero-initialised adapters weight too, so the tests exercise them.
    for name, p in model.named_parameters():
        if name.endswith("adapter.up.weight"):
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()


@pytest.fixture
def model() -> Transformer:
    return tiny_model()


def plan_logits(model: Transformer, idx: torch.Tensor, spans: list[range]) -> torch.Tensor:
    """The reference for a chunk plan: idx (B, N) read chunk by chunk as `spans` say, from empty memories, with
    forward_chunk alone (no stream state); the logits at every position (B, N, V)."""
    memory, out = new_stream(model, idx.size(0)).memory, []
    for i, span in enumerate(spans):
        h, memory = model.forward_chunk(idx[:, span.start:span.stop], memory,
                                        chunk_closed(spans, i, model.config.chunk_size))
        out.append(model.output(model.norm(h)))
    return torch.cat(out, 1)
