"""A question/answer pair with the alternative answers that TOFU's truth ratio scores.

TOFU's `*_perturbed` splits give each question a paraphrased answer (the fact reworded)
and five perturbed answers (the paraphrase's template with wrong facts). `PerturbedQA` is
an `Example` of kind "qa" that carries them, so everything that handles examples (batching,
splits, the attacks' held-out portions) passes them along unchanged, and `evaluate` computes
the truth ratio, forget quality and model utility wherever they are present.
"""

from __future__ import annotations

from dataclasses import dataclass

from .data import DataError, Example


@dataclass(frozen=True)
class PerturbedQA(Example):
    """Example(prompt=question, answer=answer) plus `paraphrased` and `perturbed` (at least one)."""

    paraphrased: str = ""
    perturbed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompt.strip() or self.choices:
            raise DataError("a perturbed question/answer pair needs a question and no choices")
        object.__setattr__(self, "perturbed", tuple(self.perturbed))  # a list from JSON is frozen
        if not self.paraphrased.strip() or not self.perturbed \
                or not all(isinstance(p, str) and p.strip() for p in self.perturbed):
            raise DataError(f"the question {self.prompt!r} needs a paraphrased answer and at least one perturbed "
                            f"answer, all non-empty strings")
