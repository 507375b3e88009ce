"""benchmarks/repro_h1.py: parts run in parallel as soon as what they wait for is done, stop at a
deadline, and resume; the summary gathers the frontier and every ablation seed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import tiny_teacher, tiny_tokenizer

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).resolve().parent.parent / "benchmarks" / "repro_h1.py"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("repro")
    tiny_teacher().save_pretrained(folder / "teacher")
    tiny_tokenizer().save_pretrained(folder / "teacher")
    train = {"steps": 3, "micro_batch_size": 2, "seq_len": 48, "lr": 1e-3, "save_every": 1}
    task = {"tasks": ["multi_digit"], "knobs": {"multi_digit": {"digits": 2}}}
    recipe = {"teacher": str(folder / "teacher"), "teacher_sft": {"train": dict(train)},
              "data": {"train": {"synthetic": {**task, "n": 16}}, "eval": {"synthetic": {**task, "n": 4}}},
              "eval": {"max_new_tokens": 8, "batch_size": 4},
              "stages": [{"name": "h15", "count": 1, "select": "loo", "train": dict(train)},
                         {"name": "h18", "count": 2, "select": "mmr", "probe_steps": 2, "train": dict(train)}]}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "recipe.yaml"


def drive(recipe, out, *args):
    env = dict(os.environ, PYTHONPATH=str(DRIVER.parent.parent / "src"))
    return subprocess.run([sys.executable, str(DRIVER), "--out", str(out), "--recipe", str(recipe), "--seeds", "0", "1",
                           "--ablations", "staged", "one-shot", "forward-kl", *args],
                          env=env, capture_output=True, text=True, timeout=900)


def test_parts_run_two_at_a_time_after_what_they_need_and_resume_after_a_deadline(recipe, tmp_path):
    out = tmp_path / "out"
    stopped = drive(recipe, out, "--jobs", "2", "--deadline", "4")
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "stopped at the deadline" in stopped.stdout
    assert not (out / "ablations" / "forward-kl-s1" / "h18" / "eval.json").exists()

    finished = drive(recipe, out, "--jobs", "2")
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["frontier"]) == {"h15", "h18"} and summary["teacher"] is not None
    for arm in ("staged", "one-shot", "forward-kl"):
        assert sorted(summary["ablations"][arm]["seeds"]) == ["0", "1"]  # JSON keys
        assert summary["ablations"][arm]["mean"]["n"] == 2
    # the staged arm's second seed starts from the frontier's 15-mixer checkpoint, so only after it exists
    staged = out / "ablations" / "staged-s1"
    assert staged.with_suffix(".yaml").stat().st_mtime >= (out / "frontier" / "h15" / "eval.json").stat().st_mtime
    assert yaml.safe_load(staged.with_suffix(".yaml").read_text())["student"] == str(out / "frontier" / "h15")
    one_shot = yaml.safe_load((out / "ablations" / "one-shot-s1.yaml").read_text())
    assert one_shot["teacher"] == str(out / "frontier" / "teacher") and one_shot["seed"] == 1
    assert one_shot["stages"][0]["train"]["steps"] == 6  # the h15 + h18 budget in one stage
    assert not (out / "ablations" / "one-shot-s1" / "teacher_eval.json").exists()  # the frontier's is the reference
    assert (out / "logs" / "ablation-one-shot-s1.log").is_file()


def test_a_failing_part_is_reported_and_the_others_still_run(recipe, tmp_path):
    out = tmp_path / "out"
    broken = yaml.safe_load(recipe.read_text())
    broken["stages"][1]["select"] = "loo"
    broken["stages"][1]["count"] = 99  # the frontier fails at validation; ablations never get a teacher
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(broken))
    result = drive(bad, out, "--jobs", "2")
    assert result.returncode == 1
    assert "frontier FAILED" in result.stdout and "waiting on parts that failed or did not run" in result.stdout


def test_a_negative_jobs_count_is_refused_before_anything_is_written(recipe, tmp_path):
    result = drive(recipe, tmp_path / "out", "--jobs", "-1")
    assert result.returncode == 2 and "--jobs takes a number of parts >= 1" in result.stderr
    assert not (tmp_path / "out").exists()


def load_driver():
    import importlib.util

    spec = importlib.util.spec_from_file_location("repro_h1", DRIVER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_shared_gpus_fill_from_the_last_and_exclusive_parts_run_alone():
    driver = load_driver()
    arm = driver.Part("ablation/one-shot-s0", lambda: True, lambda: False)
    bench = driver.Part("bench/h15", lambda: True, lambda: False, exclusive=True)
    # the frontier runs alone on GPU 0; arms go two to a GPU, from the last GPU down
    placed, loads, exclusive = [], [1, 0, 0, 0], {0}
    while (gpu := driver.choose_gpu(arm, loads, exclusive, per_gpu=2)) is not None:
        placed.append(gpu)
        loads[gpu] += 1
    assert placed == [3, 2, 1, 3, 2, 1]
    # a bench waits for an idle GPU, then nothing joins it
    assert driver.choose_gpu(bench, loads, exclusive, per_gpu=2) is None
    assert driver.choose_gpu(bench, [0, 2, 1, 2], set(), per_gpu=2) == 0
    assert driver.choose_gpu(arm, [1, 2, 2, 2], {0}, per_gpu=2) is None
    # one part per GPU (the default) is plain one-to-one placement
    assert driver.choose_gpu(arm, [1, 1, 0, 1], set(), per_gpu=1) == 2


FAKE_WORKER = """
import json, os, sys, time
part, folder = sys.argv[-1], sys.argv[1]
started = time.time()
if part == "big" and not os.path.exists(os.path.join(folder, "oom-once")):
    open(os.path.join(folder, "oom-once"), "w").close()
    print("torch.OutOfMemoryError: CUDA out of memory.", flush=True)
    sys.exit(1)
time.sleep(1.5)
with open(os.path.join(folder, part + ".json"), "w") as f:
    json.dump({"gpu": os.environ["CUDA_VISIBLE_DEVICES"], "start": started, "end": time.time()}, f)
"""


def test_a_part_out_of_memory_beside_another_resumes_alone(tmp_path):
    driver = load_driver()
    (tmp_path / "worker.py").write_text(FAKE_WORKER)
    done = lambda name: (tmp_path / f"{name}.json").is_file  # noqa: E731
    todo = [driver.Part(name, lambda: True, done(name)) for name in ("big", "small")]
    failed = driver.schedule(todo, [sys.executable, str(tmp_path / "worker.py"), str(tmp_path)], jobs=2, gpus=1,
                             deadline=driver.Deadline(0), logs=tmp_path / "logs")
    assert failed == []
    big, small = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("big", "small"))
    assert big["gpu"] == small["gpu"] == "0"
    assert big["start"] >= small["end"]  # the second try waited for the GPU to be free


def test_the_arm_that_samples_its_own_data_starts_first_in_each_seed(tmp_path):
    driver = load_driver()
    base = {"teacher_sft": {}, "stages": [{"name": "h15"}, {"name": "h18"}]}
    names = [part.name for part in driver.parts(base, tmp_path, [0, 1], ["staged", *driver.ABLATIONS], gpu=False)]
    assert names[:3] == ["frontier", "ablation/generic-data-s0", "ablation/one-shot-s0"]
    assert names.index("ablation/generic-data-s1") == names.index("ablation/random-init-s0") + 1


def test_follow_up_arms_change_the_one_shot_arm_and_end_at_their_own_stage(tmp_path):
    driver = load_driver()
    base = yaml.safe_load(driver.RECIPE.read_text())
    recipes = driver.ablation_recipes(base, tmp_path / "frontier", seed=1)
    one_shot = recipes["one-shot"]["stages"]
    with_sft = recipes["forward-kl-sft"]["stages"]
    assert [s["name"] for s in with_sft] == ["h18", "h18-sft"] and with_sft[0]["loss"] == "forward_kl"
    assert with_sft[0]["train"] == one_shot[0]["train"] and with_sft[1]["kind"] == "sft"
    assert [s["name"] for s in recipes["one-shot-sft"]["stages"]] == ["h18", "h18-sft"]
    long = recipes["forward-kl-12m"]["stages"]
    assert len(long) == 1 and long[0]["train"]["tokens"] == 12_000_000 and long[0]["loss"] == "forward_kl"
    assert {k: v for k, v in long[0]["train"].items() if k != "tokens"} == \
        {k: v for k, v in one_shot[0]["train"].items() if k != "tokens"}
    assert driver.arm_result("forward-kl-sft") == "h18-sft" and driver.arm_result("forward-kl-12m") == "h18"
    # only named arms run: the default is the paper's ablations
    names = [part.name for part in driver.parts(base, tmp_path, [0], ["one-shot-sft"], gpu=False)]
    assert names == ["frontier", "ablation/one-shot-sft-s0"]


def test_an_sft_follow_up_on_a_recipe_without_the_sft_stage_is_refused_before_anything_is_written(recipe, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(DRIVER.parent.parent / "src"))
    result = subprocess.run([sys.executable, str(DRIVER), "--out", str(tmp_path / "out"), "--recipe", str(recipe),
                             "--ablations", "forward-kl-sft"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "end with the recipe's h18-sft stage" in result.stderr
    assert not (tmp_path / "out").exists()
