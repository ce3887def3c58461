"""Finding 3: resharding never writes a member name that extracts outside its folder."""

from __future__ import annotations

import tarfile

from tests.reliability.hostile import accounted, bundled_members, failures, present, run_pool, tar_bytes


def test_absolute_and_dotdot_keys_are_failed_not_resharded(tmp_path):
    members = bundled_members(4)
    rename = {"000000001": "../../../x", "000000002": "/abs/x", "000000003": "ok/../../y"}
    members = [(rename.get(n.split(".", 1)[0], n.split(".", 1)[0]) + "." + n.split(".", 1)[1], d) for n, d in members]
    shard = tmp_path / "names.tar"
    shard.write_bytes(tar_bytes(members, fmt=tarfile.PAX_FORMAT))
    code, err, manifest, out = run_pool(tmp_path, [shard], webdataset=True)
    assert code == 0, err
    assert accounted(manifest)
    fails = failures(out)
    assert fails["../../../x"] == "unsafe_name: '..' in the member name"
    assert fails["ok/../../y"] == "unsafe_name: '..' in the member name"
    assert fails["/abs/x"] == "unsafe_name: absolute member name"
    assert {k for _, k in present(out)} == {"000000000"}
    for tar in (out / "shards").glob("*.tar"):
        with tarfile.open(tar) as tf:
            for name in tf.getnames():
                assert not name.startswith("/") and ".." not in name.split("/"), name
    assert not (tmp_path.parent / "x.jpg").exists()
