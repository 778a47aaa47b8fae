"""A slot (one sequence of the shared context) and the engine's running counters."""

from __future__ import annotations

from dataclasses import dataclass, field

from child.engine.constraints import Constraint
from child.engine.requests import GenerationRequest, TokenLogprob
from child.engine.sampling import Sampler
from child.engine.text_output import TextAssembler


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV cells this seq holds, in order
    request: GenerationRequest | None = None
    prompt: list[int] = field(default_factory=list)
    prompt_pos: int = 0  # next prompt token to feed
    n_reused: int = 0
    next_token: int = -1  # sampled, not yet decoded
    generated: int = 0
    sampler: Sampler | None = None
    text: TextAssembler | None = None
    t_start: float = 0.0
    t_first_token: float = 0.0
    constraint: Constraint | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # sampled, not yet sent with a delta
    text_bytes: int = 0  # of the text sent so far
    logprob_bytes: int = 0  # of the tokens whose logprobs were sent so far
    choice: int = 0  # which of its request's n choices this slot generates
    # A request with n choices prefills its prompt in one slot, the leader; when the prompt is in,
    # its KV cells are copied to the other slots (followers), which wait until then.
    followers: list[Slot] = field(default_factory=list)
    awaiting_leader: bool = False

    @property
    def prefilling(self) -> bool:
        return self.prompt_pos < len(self.prompt)


@dataclass
class EngineStats:
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    requests_total: int = 0
    decode_calls_total: int = 0
    sequences_decoded_total: int = 0  # sum over decode calls of the sequences sampled in each
    decode_seconds_total: float = 0.0
    embedding_inputs_total: int = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
