"""Cost of one MoE pass (forward or backward) split into ``r`` chunks.

This is the shared formula that the FSMoE planner, the baselines and the simulator builders all
use, so it lives once, here. A pass has four kinds of per-chunk task (FSMoE, ASPLOS'25, the
overlap of chunks on three resources): a2a (inter-node link), ag and rs (intra-node link, only
with an ESP group) and the expert GEMMs (GPU). Each kind ``x`` is ``alpha_x + work_x / r`` per
chunk, where ``work_x = beta_x * n_x`` is the whole pass's size-proportional time: FSMoE's
chunked cost ``t_r = alpha + (n/r) beta`` of a task split into r chunks.

Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChunkTimes:
    """Per-chunk durations in ms for a given ``r``."""

    r: int
    a2a: float
    ag: float
    rs: float
    exp: float


@dataclass(frozen=True)
class PassCost:
    """alpha (ms) and work (ms) per task kind for one pass; ``ag``/``rs`` are zero without ESP.

    ``a2a_*`` is one a2a (dispatch or combine; the pass has two of them per chunk).
    """

    alpha_a2a: float
    work_a2a: float
    alpha_ag: float
    work_ag: float
    alpha_rs: float
    work_rs: float
    alpha_exp: float
    work_exp: float

    @property
    def has_esp(self) -> bool:
        return (self.alpha_ag + self.work_ag + self.alpha_rs + self.work_rs) > 0

    def chunk(self, r: int) -> ChunkTimes:
        return ChunkTimes(
            r=r,
            a2a=self.alpha_a2a + self.work_a2a / r,
            ag=self.alpha_ag + self.work_ag / r,
            rs=self.alpha_rs + self.work_rs / r,
            exp=self.alpha_exp + self.work_exp / r,
        )

    def serial_time(self, r: int = 1) -> float:
        """No overlap at all (DeepSpeed-MoE): every task back to back."""
        c = self.chunk(r)
        return r * (2 * c.a2a + c.ag + c.rs + c.exp)

    def to_dict(self) -> dict:
        return dict(self.__dict__)
