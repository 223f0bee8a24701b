"""moejax.plot: loss curves and expert-load heatmaps as PNG files, and its command line, on
hand-written workdirs (no training)."""
import json
import struct

import numpy as np
import pytest

from moejax import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = open(path, "rb").read(24)
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def fake_run(workdir, losses, validation, batch_size=4, seq_len=8, load=None):
    """A workdir as train.py / eval.py leave it: metrics.jsonl, config.json [, eval.json]."""
    workdir.mkdir(parents=True)
    lines = [{"step": s, "loss": v + 0.1, "cross_entropy": v, "moe/dead_experts": [0.0, 1.0]}
             for s, v in losses]
    lines += [{"step": s, "validation/cross_entropy": v} for s, v in validation]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    config = {"train": {"batch_size": batch_size, "seq_len": seq_len},
              "model": {"num_dense_layers": 1}}
    (workdir / "config.json").write_text(json.dumps(config))
    if load is not None:
        (workdir / "eval.json").write_text(json.dumps({"step": 4, "expert_load": load}))
    return workdir


def test_series_keeps_the_newest_record_of_a_step():
    records = [{"step": 2, "cross_entropy": 3.0}, {"step": 1, "cross_entropy": 4.0},
               {"step": 2, "cross_entropy": 2.5}, {"step": 3, "other": 1.0}]
    steps, values = plot.series(records, "cross_entropy")
    np.testing.assert_array_equal(steps, [1, 2])
    np.testing.assert_array_equal(values, [4.0, 2.5])


def test_plot_functions_write_pngs(tmp_path):
    moe = fake_run(tmp_path / "moe", [(1, 5.0), (2, 4.0), (3, 3.5)], [(3, 3.6)])
    width, height = png_size(plot.plot_losses([moe], tmp_path / "loss.png", x="tokens"))
    assert width > 200 and height > 150
    load = np.full((3, 16), 1 / 16)
    load[1, :2], load[1, 2] = 0.0, 3 / 16  # two dead experts in layer 1
    out = plot.plot_expert_load(load, tmp_path / "load.png", "load", first_layer=1)
    assert min(png_size(out)) > 100
    with pytest.raises(ValueError, match="expected"):
        plot.plot_expert_load(np.ones(4), tmp_path / "bad.png")


def test_cli_overlays_two_runs_and_draws_one_runs_expert_load(tmp_path, capsys):
    load = [[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]]
    moe = fake_run(tmp_path / "moe", [(1, 5.0), (20, 3.0)], [(20, 3.1)], load=load)
    dense = fake_run(tmp_path / "dense", [(1, 5.2), (20, 3.3)], [])
    out = tmp_path / "both.png"
    assert plot.main([str(moe), str(dense), "--out", str(out), "--x", "tokens"]) == 0
    png_size(out)
    assert not (moe / "expert_load.png").exists()  # several runs: loss curves only
    assert plot.main([str(moe)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[-2:] == [str(moe / "loss.png"), str(moe / "expert_load.png")]
    png_size(moe / "loss.png")
    png_size(moe / "expert_load.png")
    with pytest.raises(SystemExit) as stop:
        plot.main([str(tmp_path / "missing")])
    assert stop.value.code == 2 and "metrics.jsonl does not exist" in capsys.readouterr().err
