"""How a row picks its tokens: `SamplingParams`, a value that checks itself once, on construction. (How the gate
mixes the experts for a row is `loramix.config.GateOptions`.)"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checks import is_finite_number, is_int

# Temperatures under this pick the argmax (vLLM's rule): the distribution is one-hot up to rounding there, and a
# tiny temperature would overflow float32 in logits / T (1e-39: inf, then NaN probabilities).
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """How one row picks its tokens (Hugging Face semantics); checked on construction."""

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        def bad(name, expected):
            raise ValueError(f"{name}: got {getattr(self, name)!r}, expected {expected}")

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            bad("max_new_tokens", "an integer >= 0")
        if not is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            bad("min_new_tokens", "an integer >= 0")
        if not is_finite_number(self.temperature) or self.temperature < 0:
            bad("temperature", "a finite number >= 0")
        if not is_finite_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0: off)")
        if not is_finite_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "a number > 0")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "an integer or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        """Argmax decoding: no sampling, or a temperature below GREEDY_BELOW (0 included)."""
        return not self.do_sample or self.temperature < GREEDY_BELOW

    @property
    def distribution_temperature(self) -> float:
        """The temperature of the distribution the row's tokens come from (and its log-probabilities report):
        its own, or 1 for greedy rows."""
        return 1.0 if self.greedy else self.temperature

