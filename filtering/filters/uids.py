"""uid-list filter: keep (or drop) the uids listed in a DataComp-format ``.npy``.

The file is what DataComp's baselines write and its resharder reads (and what
poolsift writes as ``subset.npy``): a numpy array of dtype ``u8,u8``, each uid's 128
bits split into (high, low) unsigned 64-bit halves. Use it to intersect with
selections made elsewhere (``mode: keep``) or to remove a blocklist (``mode: drop``).

Reason codes: ``uid_not_listed`` (mode keep), ``uid_listed`` (mode drop).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from filtering.filters.base import Decision, Filter, Params, register
from filtering.pool import Pool
from filtering.uid import load_uid_list, u8u8_isin, uids_to_u8u8


class UidsParams(Params):
    path_fields: ClassVar[tuple[str, ...]] = ("path",)  # local paths: resolved against the config's folder
    path: str = Field(min_length=1)
    mode: Literal["keep", "drop"] = "keep"


@register
class Uids(Filter):
    name = "uids"
    Params = UidsParams

    def requires(self) -> set[str]:
        return {"uid"}

    def apply(self, pool: Pool, alive: np.ndarray) -> Decision:
        listed = load_uid_list(self.params.path)
        hit = u8u8_isin(uids_to_u8u8(pool.table.column("uid")), listed)
        if self.params.mode == "keep":
            return Decision(hit, "uid_not_listed")
        return Decision(~hit, "uid_listed")
