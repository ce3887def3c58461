"""uids: keep or drop the uids listed in a DataComp-format u8,u8 .npy."""

import numpy as np
import pyarrow as pa
import pytest

from filtering.errors import InputError
from filtering.filters.base import InputInfo
from filtering.filters.uids import Uids, UidsParams
from filtering.pool import Pool
from filtering.uid import uids_to_u8u8
from filtering.writers.uids import write_uids

UIDS = [f"{i:032x}" for i in (1, 2, 3, 2**64 + 5, 2**127 + 7)]


def decide(path, mode="keep"):
    pool = Pool(pa.table({"uid": pa.array(UIDS)}), parts=[])
    d = Uids(UidsParams(path=str(path), mode=mode), InputInfo("webdataset")).apply(pool, np.ones(pool.n, bool))
    return d.keep.tolist(), d.reasons_for(~d.keep).tolist()


def test_keep_and_drop_listed(tmp_path):
    listed = tmp_path / "subset.npy"
    write_uids(str(listed), [UIDS[1], UIDS[3], "f" * 32])  # poolsift's own subset.npy writer
    assert decide(listed) == ([False, True, False, True, False], ["uid_not_listed"] * 3)
    assert decide(listed, mode="drop") == ([True, False, True, False, True], ["uid_listed"] * 2)


def test_reads_datacomp_arrays_unsorted(tmp_path):
    # DataComp's baselines save the structured array with np.save, sorted or not.
    arr = uids_to_u8u8([UIDS[4], UIDS[0]])
    np.save(tmp_path / "dc.npy", arr)
    assert decide(tmp_path / "dc.npy")[0] == [True, False, False, False, True]


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="no file"):
        decide(tmp_path / "missing.npy")
    np.save(tmp_path / "ints.npy", np.arange(3))
    with pytest.raises(InputError, match="u8,u8"):
        decide(tmp_path / "ints.npy")
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(InputError, match="not a numpy"):
        decide(tmp_path / "text.npy")


@pytest.mark.parametrize("params", [{}, {"path": ""}, {"path": "x.npy", "mode": "only"}])
def test_params_rejected(params):
    with pytest.raises(ValueError):
        UidsParams(**params)
