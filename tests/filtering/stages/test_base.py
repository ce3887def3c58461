from filtering.stages.base import RunContext


def test_bar_without_progress_is_a_silent_tqdm(capsys):
    ctx = RunContext(out_dir="out", cache_dir="cache", progress=None)
    with ctx.bar(total=3, desc="scoring") as bar:
        bar.update(2)
        bar.update()
    bar.close()
    assert bar.disable and bar.n == 0  # a disabled tqdm counts nothing and prints nothing
    assert capsys.readouterr() == ("", "")


def test_bar_uses_the_progress_factory_when_given():
    made = []
    ctx = RunContext(out_dir="out", cache_dir="cache", progress=lambda **kw: made.append(kw) or "bar")
    assert ctx.bar(total=5, desc="clusters", unit="shards") == "bar"
    assert made == [{"total": 5, "desc": "clusters", "unit": "shards"}]
