"""The mixture-against-single-task table (benchmarks/mixture_vs_single.py) on hand-written eval files."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("mixture_vs_single",
                                                  ROOT / "benchmarks" / "mixture_vs_single.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _eval(run: Path, body: dict) -> str:
    run.mkdir(parents=True)
    (run / "eval_test.json").write_text(json.dumps(body))
    return str(run)


def test_seeds_are_averaged_on_each_side(tmp_path, capsys):
    mix = [_eval(tmp_path / f"mix{i}", {"tasks": {"video_caption": {"cider_d": v}, "asr": {"wer": w}}})
           for i, (v, w) in enumerate([(0.5, 0.04), (0.6, 0.02)])]
    single = [_eval(tmp_path / f"video{i}", {"cider_d": v}) for i, v in enumerate([0.6, 1.0])]
    argv = ([a for run in mix for a in ("--mixture", run)]
            + [a for run in single for a in ("--single", f"video_caption={run}")])
    assert _script().main(argv) == 0
    out = capsys.readouterr().out
    assert "0.55 (0.5-0.6)" in out and "0.8 (0.6-1)" in out  # the table shows each side's mean and range
    rows = {r["task"]: r for r in json.loads(out.strip().splitlines()[-1])["rows"]}
    video = rows["video_caption"]
    assert video["mixture_runs"] == [0.5, 0.6] and video["single_runs"] == [0.6, 1.0]
    assert abs(video["relative"] - (0.55 / 0.8 - 1)) < 1e-9 and not video["within_25pct"]  # -31%
    # a task with no single-task run on this machine falls back to the value docs/benchmarks.md records
    asr = rows["asr"]
    recorded = _script().SINGLE["asr"][3]
    assert asr["single_from"] == ["docs/benchmarks.md"] and asr["single_runs"] == [recorded]
    assert abs(asr["mixture"] - 0.03) < 1e-9 and 0.03 <= 1.25 * recorded and asr["within_25pct"]
