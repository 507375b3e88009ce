"""`hybridize run`: the staged recipe end to end, its resumability after SIGKILL, and its refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from tiny import tiny_teacher, tiny_tokenizer

from hybridize.config import load_recipe, validate_against_model
from hybridize.report.collect import collect_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "tiny-llama"
    tiny_teacher().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_recipe(path: Path, teacher_dir, **changes):
    train = {"steps": 4, "micro_batch_size": 2, "seq_len": 48, "lr": 1e-3, "save_every": 1}
    recipe = {
        "teacher": str(teacher_dir),
        "data": {"train": {"synthetic": {"tasks": ["multi_digit"], "n": 16, "knobs": {"multi_digit": {"digits": 2}}}},
                 "eval": {"synthetic": {"tasks": ["multi_digit"], "n": 4, "knobs": {"multi_digit": {"digits": 2}}}}},
        "eval": {"max_new_tokens": 8, "batch_size": 4},
        "stages": [
            {"name": "h1", "count": 1, "select": "loo", "train": dict(train)},
            {"name": "h2", "count": 2, "select": "mmr", "probe_steps": 2, "train": dict(train)},
            {"name": "sft", "kind": "sft", "train": {**train, "steps": 2}},
        ],
    }
    recipe.update(changes)
    path.write_text(yaml.safe_dump(recipe))
    return path


def hybridize(*args, kill_at=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HYBRIDIZE_KILL_AT", None)
    if kill_at:
        env["HYBRIDIZE_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "hybridize.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(teacher_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("run")
    recipe = write_recipe(base / "recipe.yaml", teacher_dir)
    result = hybridize("run", recipe, "--out", base / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return recipe, base / "run"


def test_recipe_run_writes_every_stage_its_choices_evaluation_and_the_report(uninterrupted):
    _, run = uninterrupted
    state = json.loads((run / "state.json").read_text())
    assert state["completed"] == ["h1", "h2", "sft"]
    assert (run / "report.md").is_file() and (run / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    loo = json.loads((run / "importance" / "loo.json").read_text())
    h1 = json.loads((run / "h1" / "layers.json").read_text())
    assert h1["selection"] == "loo" and h1["new_layers"] == loo["ranking"][:1]
    h2 = json.loads((run / "h2" / "layers.json").read_text())
    mmr = json.loads((run / "importance" / "h2-mmr.json").read_text())
    assert h2["new_layers"] == mmr["ranking"][:1] and h2["mixer_types"].count("mamba") == 2
    assert json.loads((run / "sft" / "layers.json").read_text())["mixer_types"] == h2["mixer_types"]
    evaluation = json.loads((run / "h1" / "eval.json").read_text())
    for section in ("teacher_forced", "teacher_forced_at_init"):
        assert evaluation[section]["kl_teacher_model"] > 0 and evaluation[section]["tokens"] > 0
    assert evaluation["tokens"] > 0 and evaluation["count"] == 4
    assert (run / "h1" / "metrics.jsonl").is_file() and not (run / ".work" / "h1").exists()


@pytest.mark.parametrize("kill_at", ["batch:h2:2", "stage-done:h1", "checkpoint-staged"])
def test_resume_after_kill_matches_uninterrupted_run(uninterrupted, tmp_path, kill_at):
    recipe, reference = uninterrupted
    out = tmp_path / "run"
    killed = hybridize("run", recipe, "--out", out, kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = hybridize("run", recipe, "--out", out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for stage in ("h1", "h2", "sft"):
        expected = load_file(reference / stage / "model.safetensors")
        got = load_file(out / stage / "model.safetensors")
        assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6, stage
    assert not list(out.glob(".*staging*"))


def test_restarting_with_a_different_recipe_is_refused(uninterrupted, teacher_dir, tmp_path):
    _, run = uninterrupted
    other = write_recipe(tmp_path / "other.yaml", teacher_dir, seed=5)
    result = hybridize("run", other, "--out", run)
    assert result.returncode == 2 and "different recipe" in result.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stages": [{"name": "a", "count": 1, "train": {"steps": 1, "lerning_rate": 1}}]}, "did you mean 'lr'"),
        ({"stages": [{"name": "a", "count": 9, "train": {"steps": 1}}]}, "9"),
        ({"data": {"train": "missing.jsonl"}}, "does not exist"),
    ],
)
def test_bad_recipes_stop_with_one_sentence(teacher_dir, tmp_path, change, message):
    recipe = write_recipe(tmp_path / "bad.yaml", teacher_dir, **change)
    result = hybridize("run", recipe, "--out", tmp_path / "run")
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_non_finite_loss_stops_the_run_and_keeps_earlier_stages(teacher_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", teacher_dir)
    data = yaml.safe_load(recipe.read_text())
    data["stages"][1]["select"] = "explicit"
    data["stages"][1].pop("count")
    data["stages"][1].pop("probe_steps")
    data["stages"][1]["layers"] = [0]
    data["stages"][1]["train"]["lr"] = 1e30
    recipe.write_text(yaml.safe_dump(data))
    result = hybridize("run", recipe, "--out", tmp_path / "run")
    assert result.returncode == 2 and "non-finite" in result.stderr
    assert json.loads((tmp_path / "run" / "state.json").read_text())["completed"] == ["h1"]
    assert (tmp_path / "run" / "h1" / "model.safetensors").is_file()


def test_teacher_sft_branches_and_a_starting_student(teacher_dir, tmp_path):
    """teacher_sft fine-tunes the teacher first and every stage distils from it; a stage with
    `start` branches off an earlier one; a second recipe starts from a checkpoint of the first
    with fresh (random) mixers, and its token count continues the checkpoint's."""
    train = {"steps": 2, "micro_batch_size": 2, "seq_len": 48, "lr": 1e-3}
    recipe = write_recipe(tmp_path / "r.yaml", teacher_dir, teacher_sft={"train": {**train, "steps": 3}}, stages=[
        {"name": "h1", "count": 1, "select": "loo", "train": train},
        {"name": "h2", "count": 2, "select": "random", "train": train},
        {"name": "h1-sft", "kind": "sft", "start": "h1", "train": train},
    ])
    run = tmp_path / "run"
    result = hybridize("run", recipe, "--out", run)
    assert result.returncode == 0, result.stderr[-3000:]

    assert json.loads((run / "state.json").read_text())["completed"] == ["teacher", "h1", "h2", "h1-sft"]
    teacher = json.loads((run / "teacher" / "layers.json").read_text())
    assert teacher["kind"] == "teacher_sft" and teacher["sft_steps"] == 3 and teacher["sft_tokens"] > 0
    assert (run / "base_teacher_eval.json").is_file() and (run / "teacher_eval.json").is_file()
    base = load_file(teacher_dir / "model.safetensors")["model.embed_tokens.weight"]
    tuned = load_file(run / "teacher" / "model.safetensors")["model.embed_tokens.weight"]
    assert (base - tuned).abs().max() > 0  # the teacher itself was trained
    h1, h2, branch = (json.loads((run / name / "layers.json").read_text()) for name in ("h1", "h2", "h1-sft"))
    assert h1["teacher"] == str(run / "teacher")
    assert branch["mixer_types"] == h1["mixer_types"] != h2["mixer_types"]
    tokens = {name: json.loads((run / name / "eval.json").read_text())["tokens"] for name in ("h1", "h2", "h1-sft")}
    assert tokens["h2"] == tokens["h1-sft"] == 2 * tokens["h1"]  # each continues h1's count
    rows = collect_run(run)["checkpoints"]  # the fine-tuned teacher is the reference row, not a checkpoint
    assert sorted(row["name"] for row in rows) == ["h1", "h1-sft", "h2"]

    follow = write_recipe(tmp_path / "f.yaml", teacher_dir, teacher=str(run / "teacher"), student=str(run / "h1"),
                          mixer_init="random", stages=[{"name": "h2", "count": 2, "select": "loo", "train": train}])
    result = hybridize("run", follow, "--out", tmp_path / "follow")
    assert result.returncode == 0, result.stderr[-3000:]
    h2b = json.loads((tmp_path / "follow" / "h2" / "layers.json").read_text())
    assert h2b["mixer_init"] == "random" and h2b["mixer_types"].count("mamba") == 2
    assert set(h2b["mixer_types"][i] for i, kind in enumerate(h1["mixer_types"]) if kind == "mamba") == {"mamba"}
    assert json.loads((tmp_path / "follow" / "h2" / "eval.json").read_text())["tokens"] == 2 * tokens["h1"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stages": [{"name": "a", "count": 1, "start": "b", "train": {"steps": 1}}]}, "not an earlier stage"),
        ({"teacher_sft": {"loss": "reverse_kl", "train": {"steps": 1}}}, "can only be ce"),
        ({"stages": [{"name": "teacher", "count": 1, "train": {"steps": 1}}]}, "name the stage otherwise"),
        ({"data": {"train": "x.jsonl", "eval": {"generic": {"n": 2}}}}, "data.eval needs reference answers"),
        ({"teacher_sft": {"train": {"steps": 1}},
          "data": {"train": {"generated": {"prompts": {"generic": {"n": 2}}, "verify": False}}}},
         "teacher_sft needs its own data"),
        ({"data": {"train": {"generic": {"n": 2}, "path": "x.jsonl"}}}, "exactly one of path, synthetic, generic"),
    ],
)
def test_bad_branches_and_teacher_sft_are_refused(teacher_dir, tmp_path, change, message):
    recipe = write_recipe(tmp_path / "bad.yaml", teacher_dir, **change)
    with pytest.raises(Exception, match=message):
        load_recipe(recipe)


def test_a_branch_may_not_remove_mixers_from_its_start(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "unused", stages=[
        {"name": "a", "count": 3, "train": {"steps": 1}},
        {"name": "b", "count": 1, "start": "a", "train": {"steps": 1}},
    ])
    with pytest.raises(Exception, match="below the 3 of stage a"):
        validate_against_model(load_recipe(recipe), num_layers=4)
    recipe = write_recipe(tmp_path / "r.yaml", "unused", stages=[
        {"name": "a", "count": 3, "train": {"steps": 1}},
        {"name": "s", "kind": "sft", "train": {"steps": 1}},
        {"name": "b", "count": 2, "start": "a", "train": {"steps": 1}},
    ])
    with pytest.raises(Exception, match="below the 3 of stage a"):  # a branch counts from its start
        validate_against_model(load_recipe(recipe), num_layers=4)
    single = write_recipe(tmp_path / "s.yaml", "unused", stages=[{"name": "a", "count": 1, "train": {"steps": 1}}])
    with pytest.raises(Exception, match="below the 2 of the starting model"):  # a `student` checkpoint's mixers
        validate_against_model(load_recipe(single), num_layers=4, initial=2)


def test_paper_recipe_validates_for_a_50_layer_teacher(tmp_path):
    for name in ("traces.jsonl", "heldout.jsonl"):
        (tmp_path / name).write_text("")
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "apriel-h1-15b.yaml",
                         [f"data.train={tmp_path / 'traces.jsonl'}", f"data.eval={tmp_path / 'heldout.jsonl'}"])
    targets = validate_against_model(recipe, 50)
    assert [t for t in targets if t is not None] == [25, 27, 30, 34, 37, 40]
    assert all(s.loss.weights == {"reverse_kl": 1.0} for s in recipe.stages if s.kind == "distill")


def test_distill_refuses_a_student_with_another_vocabulary(teacher_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridize.convert.checkpoint import save_hybrid
    from hybridize.convert.surgery import build_hybrid

    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    save_hybrid(build_hybrid(other, ["attention", "mamba"]), tiny_tokenizer(), tmp_path / "student")
    result = hybridize("distill", "--teacher", teacher_dir, "--student", tmp_path / "student", "--data", "synthetic",
                       "--steps", 1, "--out", tmp_path / "out")
    assert result.returncode == 2 and "vocabulary" in result.stderr
    assert not (tmp_path / "out").exists()


def test_distill_command_trains_and_saves_a_checkpoint(teacher_dir, tmp_path):
    assert hybridize("convert", "--teacher", teacher_dir, "--layers", "1", "--out", tmp_path / "h").returncode == 0
    result = hybridize("distill", "--teacher", teacher_dir, "--student", tmp_path / "h", "--data",
                       "synthetic:multi_digit", "--steps", 3, "--seq-len", 48, "--micro-batch-size", 2,
                       "--out", tmp_path / "d")
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads((tmp_path / "d" / "layers.json").read_text())
    assert info["steps"] == 3 and info["mixer_types"][1] == "mamba"
    assert len((tmp_path / "d" / "metrics.jsonl").read_text().splitlines()) >= 1


def test_generated_data_is_sampled_once_per_run_and_cached(teacher_dir, tmp_path, monkeypatch):
    from hybridize.data import traces
    from hybridize.distill.runner import RecipeRun

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", teacher_dir, stages=[
        {"name": "h1", "count": 1, "train": {"steps": 1},
         "data": {"generated": {"prompts": {"generic": {"n": 3}}, "verify": False, "max_new_tokens": 16}}}]))
    calls = []

    def fake_free_text(model, tokenizer, prompts, **sampling):
        calls.append((len(prompts), sampling))
        rows = [{"messages": p["messages"] + [{"role": "assistant", "content": f"text {i}"}], "task": "generic",
                 "id": p["id"], "sample": 0} for i, p in enumerate(prompts)]
        return rows, {"prompts": 3, "samples": 3, "kept": 3, "unfinished": 0}

    monkeypatch.setattr(traces, "generate_free_text", fake_free_text)
    run = RecipeRun(recipe, tmp_path / "run")
    run.teacher = run.tokenizer = None  # only the sampler would use them
    source = recipe.stages[0].data
    first = run.rows(source, "train")
    assert [row["messages"][-1]["content"] for row in first] == ["text 0", "text 1", "text 2"]
    assert calls == [(3, {"n_per_prompt": 1, "temperature": 0.7, "top_p": 0.95, "max_new_tokens": 16,
                          "batch_size": 64, "seed": 0})]
    assert run.rows(source, "train") == first and len(calls) == 1  # read back from run_dir/data
    (stats,) = (tmp_path / "run" / "data").glob("*.stats.json")
    assert json.loads(stats.read_text())["kept"] == 3


def test_a_teacher_that_keeps_no_sample_stops_the_run_with_one_sentence(teacher_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", teacher_dir, stages=[
        {"name": "h1", "count": 1, "train": {"steps": 1},
         "data": {"generated": {"prompts": {"synthetic": {"tasks": ["multi_digit"], "n": 2}}, "max_new_tokens": 2}}}])
    result = hybridize("run", recipe, "--out", tmp_path / "run")
    assert result.returncode == 2 and "kept none of its 2 samples" in result.stderr
    assert not list((tmp_path / "run" / "data").glob("*.jsonl"))


def test_training_rows_are_tokenised_once_per_run_whatever_the_number_of_stages(teacher_dir, tmp_path, monkeypatch):
    """The teacher SFT, every stage and every MMR probe share one tokenisation of the same rows at one
    sequence length; a stage at another length tokenises them again."""
    import hybridize.distill.runner as runner

    lengths = []
    original = runner.tokenize_rows
    monkeypatch.setattr(runner, "tokenize_rows",
                        lambda rows, tokenizer, max_length=None, **k: lengths.append(max_length)
                        or original(rows, tokenizer, max_length=max_length, **k))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    train = {"steps": 2, "micro_batch_size": 2, "seq_len": 48, "lr": 1e-3}
    recipe = write_recipe(tmp_path / "r.yaml", teacher_dir, teacher_sft={"train": train}, stages=[
        {"name": "h1", "count": 1, "select": "loo", "train": train},
        {"name": "h2", "count": 2, "select": "mmr", "probe_steps": 1, "train": train},
        {"name": "h2-sft", "kind": "sft", "train": {**train, "seq_len": 32}},
    ])
    runner.run(recipe, tmp_path / "run")
    assert sorted(lengths) == [32, 48, 512]  # 512: LOO's held-out windows
