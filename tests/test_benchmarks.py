"""The benchmark scripts' own logic on hand-written inputs: the mixture-against-single-task table and
its equal-compute configs, the object-named count, corpus cutting, the GPU check's dry run."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(script: str):
    """``benchmarks/<script>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(script, ROOT / "benchmarks" / f"{script}.py")
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
    assert _load("mixture_vs_single").main(argv) == 0
    out = capsys.readouterr().out
    assert "0.55 (0.5-0.6)" in out and "0.8 (0.6-1)" in out  # the table shows each side's mean and range
    rows = {r["task"]: r for r in json.loads(out.strip().splitlines()[-1])["rows"]}
    video = rows["video_caption"]
    assert video["mixture_runs"] == [0.5, 0.6] and video["single_runs"] == [0.6, 1.0]
    assert abs(video["relative"] - (0.55 / 0.8 - 1)) < 1e-9 and not video["within_25pct"]  # -31%
    # a task with no single-task run on this machine falls back to the value docs/benchmarks.md records
    asr = rows["asr"]
    recorded = _load("mixture_vs_single").SINGLE["asr"][3]
    assert asr["single_from"] == ["docs/benchmarks.md"] and asr["single_runs"] == [recorded]
    assert abs(asr["mixture"] - 0.03) < 1e-9 and 0.03 <= 1.25 * recorded and asr["within_25pct"]


def test_equal_compute_gives_the_mixture_the_steps_of_its_tasks_alone(tmp_path, capsys):
    """benchmarks/equal_compute.py on any2any/small: the mixture runs 7 x S steps, each task alone S,
    with the recipe's model and hyperparameters and no sampling or loss weight; the table reads a
    task alone from its run's ``tasks`` entry."""
    from omni.config import load_recipe

    assert _load("equal_compute").main(["any2any/small", "train.lr=5e-4", "--steps-per-task", "20",
                                        "--out", str(tmp_path)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 8  # a train + eval command per run
    mix = load_recipe(str(tmp_path / "mixture.yaml"))
    labels = [m.label for m in mix.data.mixture]
    assert len(labels) == 7 and (mix.train.steps, mix.train.warmup_steps, mix.train.lr) == (140, 14, 5e-4)
    for label, entry in zip(labels, mix.data.mixture):
        alone = load_recipe(str(tmp_path / f"{label}.yaml"))
        (task,) = alone.data.mixture
        assert (task.path, task.prompt, task.weight, task.loss_weight) == (entry.path, entry.prompt, 1, 1)
        assert (alone.train.steps, alone.train.warmup_steps) == (20, 2)
        assert alone.train.out_dir == str(tmp_path / label)
        assert alone.model == mix.model and alone.train.lora == mix.train.lora
    mixture = _eval(tmp_path / "mix_run", {"tasks": {"asr": {"wer": 0.1}}})
    alone = _eval(tmp_path / "asr_run", {"tasks": {"asr": {"wer": 0.08}}})
    assert _load("mixture_vs_single").main(["--mixture", mixture, "--single", f"asr={alone}"]) == 0
    rows = {r["task"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]}
    assert rows["asr"]["single_runs"] == [0.08] and abs(rows["asr"]["relative"] - 0.25) < 1e-9


def test_object_named_reads_the_head_noun_of_each_reference(tmp_path, capsys):
    m = _load("object_named")
    assert m.head_noun("A crowned crane.") == "crane"
    assert m.head_noun("A pair of open scissors.") == "scissors"  # "a pair of X" reads on to X
    assert m.head_noun("A peacock (a male peafowl).") == "peacock"
    assert m.head_noun("The letter g.") == "letter g"  # a one-character head keeps its noun
    assert m.head_noun("a frog moves up slowly") == "frog"  # a video clip's caption, not "slowly"
    assert m.head_noun("Boom!!!") is None and m.head_noun("Divided by.") is None  # no object named
    assert m.named("grapes", "A bunch of grape.") and m.named("letter g", "The letter G.")
    assert not m.named("letter a", "A letter b.")  # the article "a" is not the letter a
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"id": "1", "reference": "A crowned crane.", "prediction": "A crane."},
            {"id": "2", "reference": "A hammer.", "prediction": "A pair of pliers."},
            {"id": "3", "reference": "Boom!!!", "prediction": "An explosion."}]
    (run / "eval_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert m.main([str(run), "--examples", "2"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = line["results"][str(run)]
    assert (res["rows"], res["rows_naming_an_object"], res["named_correctly"]) == (3, 2, 1)
    assert [e["named"] for e in res["examples"]] == [True, False]


def test_cut_corpora_cuts_each_corpus_of_a_mixture_once(tmp_path):
    """``--rows`` in data_parity.py on a mixture: every task's corpus is cut (one copy per folder,
    shared by the tasks that read it), and the mixture override keeps the entries as written."""
    from omni.config import load_recipe

    def corpus(name: str, n: int) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for split in ("train", "val"):
            rows = [{"audio": f"a/{split}{i}.wav", "text": f"t{i}"} for i in range(n)]
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder

    speech, sounds = corpus("speech", 9), corpus("sounds", 3)
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(json.dumps({"data": {"mixture": [
        {"task": "text", "path": str(speech), "name": "a"},
        {"task": "text", "path": str(speech), "name": "b", "prompt": "Continue:", "loss_weight": 2},
        {"task": "text", "path": str(sounds), "name": "c", "weight": 0.5}]}}))
    overrides = _load("common").cut_corpora(str(recipe), tmp_path / "cut", 4)
    assert len(overrides) == 1 and overrides[0].startswith("data.mixture=")
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["0_speech", "1_sounds"]
    mixture, cut = load_recipe(str(recipe), overrides).data.mixture, tmp_path / "cut"
    assert [p.path for p in mixture] == [str(cut / n) for n in ("0_speech", "0_speech", "1_sounds")]
    assert (mixture[1].prompt, mixture[1].loss_weight, mixture[2].weight) == ("Continue:", 2, 0.5)
    train = [json.loads(x) for x in (cut / "0_speech" / "train.jsonl").read_text().splitlines()]
    assert [r["audio"] for r in train] == [str(speech / f"a/train{i}.wav") for i in range(4)]  # absolute
    assert len((cut / "1_sounds" / "val.jsonl").read_text().splitlines()) == 1  # rows // 4
    one = tmp_path / "one.yaml"
    one.write_text(json.dumps({"data": {"task": "text", "path": str(sounds)}}))
    cut_one = _load("common").cut_corpora(str(one), tmp_path / "one", 4)
    assert cut_one == [f"data.path={tmp_path / 'one/0_sounds'}"]


@pytest.fixture(scope="module")
def gpu_dir(tmp_path_factory):
    """The folder ``gpu_check.sh prepare`` carries, in miniature: a small Wikipedia corpus and a
    512-piece tokenizer where the 32k one would be."""
    from omni.data.text import build_text_corpus, wiki_documents
    from omni.io import write_jsonl
    from omni.tokenizers.text import TextTokenizer, corpus_texts

    root = tmp_path_factory.mktemp("gpu")
    write_jsonl(root / "docs.jsonl", wiki_documents()[:200])
    build_text_corpus(root / "data" / "text", source=str(root / "docs.jsonl"), val_fraction=0.1,
                      test_fraction=0.0)
    tok = TextTokenizer.train(corpus_texts(root / "data" / "text" / "train.jsonl"), vocab_size=512)
    for name in ("text_spm_32k", "text_spm"):
        tok.save(root / "tok" / name)
    return root


def _gpu_check(gpu_dir: Path, out: Path, *args) -> tuple[int, list[dict]]:
    """``gpu_check.sh switches --dry-run ARGS`` as the GPU machine would run it."""
    env = {**os.environ, "OUT": str(out), "PY": sys.executable, "GPU_DIR": str(gpu_dir),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "switches", "--dry-run", *args],
                       env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    return r.returncode, [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]


def test_gpu_check_dry_run_writes_one_json_line_per_configuration(gpu_dir, tmp_path, capsys):
    """The GPU check's driver on a CPU (``--dry-run``): a configuration trains in a process of its
    own and its JSON line carries what the run measured; configurations past the budget are
    written as skipped, in the order they would run."""
    gpu_check, out = _load("gpu_check"), tmp_path / "rows.jsonl"
    argv = ["--dry-run", "--data", str(gpu_dir), "--out", str(out)]
    assert gpu_check.main([*argv, "--recipes", "text/base", "--configs", "chunked_ce"]) == 0
    row = json.loads(out.read_text())
    assert (row["recipe"], row["config"]) == ("text/base", "chunked_ce")
    assert row["switches"] == {"attn_backend": "sdpa", "compile": "false", "activation_checkpointing": "none",
                               "loss_chunk": "32"}  # 4096 on a GPU; a few chunks of the tiny batch here
    assert row["tokens_per_s"] > 0 and row["steps"] == 3 and row["dry_run"] and row["seq_len"] == 64
    assert row["loss_last"] > 0 and row["mfu"] is None and row["max_mem_gib"] is None  # a CPU has neither
    out.unlink()
    assert gpu_check.main([*argv, "--budget", "0"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["recipe"], r["config"]) for r in rows] == gpu_check.PLAN
    assert all(r["skipped"].startswith("out of time") for r in rows)


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_configuration(gpu_dir, tmp_path):
    """``gpu_check.sh switches --dry-run``: every configuration of both recipes, compile included
    (minutes on a CPU), through the shell script the GPU machine runs."""
    from conftest import make_stamps

    from omni.data.images import build_images_corpus

    build_images_corpus(gpu_dir / "data" / "images", stamps_dir=make_stamps(tmp_path / "stamps"),
                        max_size=32, val_fraction=0.4, test_fraction=0.0)
    code, rows = _gpu_check(gpu_dir, tmp_path / "out", "--budget", "3000", "--timeout", "600")
    assert code == 0, rows
    assert [(r["recipe"], r["config"]) for r in rows] == _load("gpu_check").PLAN
    losses = {r["recipe"]: set() for r in rows}
    for r in rows:
        assert r["tokens_per_s"] > 0, r
        losses[r["recipe"]].add(round(r["loss_first"], 3))
    assert all(len(v) == 1 for v in losses.values()), losses  # every switch trains alike


def test_serve_schedule_spreads_lengths_and_arrivals():
    """benchmarks/serve.py: lockstep by default; --length-spread and --request-rate draw a seeded
    schedule (every level and round sends the same one)."""
    spec = importlib.util.spec_from_file_location("serve_bench", ROOT / "benchmarks" / "serve.py")
    m = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(m)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert m.schedule(4, 32, 0.0, float("inf")) == [(0.0, 32)] * 4
    plan = m.schedule(200, 32, 0.5, 4.0)
    assert plan == m.schedule(200, 32, 0.5, 4.0)
    starts, lengths = [t for t, _ in plan], [n for _, n in plan]
    assert starts == sorted(starts) and starts[0] == 0.0 and 35 < starts[-1] < 65  # ~200 / 4 s
    assert min(lengths) >= 16 and max(lengths) <= 48 and 28 < sum(lengths) / 200 < 36
