"""Bad input: one clear message naming the key or file and the fix, exit code 2, before any
rank starts, and nothing created or overwritten."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, rank_env, tiny_recipe, write_recipe

from dpkit.cli import main
from dpkit.zero import DS_CONFIGS


def train(tmp_path, capsys, recipe: dict, *overrides):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    code = main(["train", str(path), *overrides])
    out, err = capsys.readouterr()
    assert "launching" not in out  # no rank was started
    return code, err


def expect_error(tmp_path, capsys, recipe, *needles, overrides=()):
    code, err = train(tmp_path, capsys, recipe, *overrides)
    assert code == 2, err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "run").exists()


def test_unknown_key_with_suggestion(tmp_path, capsys):
    r = tiny_recipe(tmp_path / "run")
    r["train"]["micro_batch"] = 2
    expect_error(tmp_path, capsys, r,
                 "error: train.micro_batch: unknown key — did you mean `train.micro_batch_size`?")


def test_wrong_type(tmp_path, capsys):
    r = tiny_recipe(tmp_path / "run", train={"lr": "fast"})
    expect_error(tmp_path, capsys, r, "train.lr:", "'fast'")


def test_batch_not_divisible(tmp_path, capsys):
    # No GPU here: `dpkit train` starts 2 ranks by default.
    r = tiny_recipe(tmp_path / "run", train={"global_batch_size": 10, "micro_batch_size": 2})
    expect_error(tmp_path, capsys, r, "train.global_batch_size: 10 is not divisible by "
                 "micro_batch_size × world size = 2 × 2 = 4", "set it to 8 or 12")


def test_batch_not_divisible_for_world_size(tmp_path, capsys):
    r = tiny_recipe(tmp_path / "run", train={"global_batch_size": 12, "micro_batch_size": 2})
    path = write_recipe(tmp_path / "recipe.yaml", r)
    assert main(["train", str(path), "--nproc-per-node", "4"]) == 2
    assert "12 is not divisible by micro_batch_size × world size = 2 × 4 = 8" in \
        capsys.readouterr().err


def test_missing_dataset_column(tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "Hi?", "answer": "Hello."}) + "\n")
    r = tiny_recipe(tmp_path / "run", data={"sources": [{"path": str(data), "format": "alpaca"}]})
    expect_error(tmp_path, capsys, r, "data.sources[0]: dataset", "has no column 'instruction'",
                 "columns are ['question', 'answer']", "data.sources[0].columns")


def test_empty_dataset(tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    r = tiny_recipe(tmp_path / "run", data={"sources": [{"path": str(data), "format": "text"}]})
    expect_error(tmp_path, capsys, r, "data.sources[0].path:", "is empty")


def test_compile_with_zero3(tmp_path, capsys):
    r = tiny_recipe(tmp_path / "run", train={"compile": True}, zero={"stage": 3})
    expect_error(tmp_path, capsys, r, "train.compile: is not supported with ZeRO-3",
                 "use zero.stage 0-2")


def test_nonexistent_model_path(tmp_path, capsys):
    r = tiny_recipe(tmp_path / "run")
    r["model"] = {"name_or_path": str(tmp_path / "no-such-model"), "dtype": "float32"}
    expect_error(tmp_path, capsys, r, "model.name_or_path: no config.json in local directory")


def test_tokenizer_without_pad_token_is_handled(tmp_path, capsys):
    # The bundled tokenizer has no pad token, like Llama's: validate says how it is handled.
    path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tmp_path / "run"))
    assert main(["validate", str(path)]) == 0
    assert "tokenizer pads with its eos token '</s>'" in capsys.readouterr().out


def test_existing_output_dir_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    code, err = train(tmp_path, capsys, tiny_recipe(run))
    assert code == 2
    assert f"output.dir: '{run}' already exists and is not empty" in err
    assert "output.overwrite=true" in err
    assert (run / "keep.txt").read_text() == "precious"


def template(tmp_path, mutate) -> str:
    cfg = json.loads((DS_CONFIGS / "zero2.json").read_text())
    mutate(cfg)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_unknown_key_in_deepspeed_template(tmp_path, capsys):
    t = template(tmp_path, lambda c: c["zero_optimization"].update(overlap_com=True))
    r = tiny_recipe(tmp_path / "run", zero={"stage": 2, "template": t})
    expect_error(tmp_path, capsys, r, "ds.json: zero_optimization.overlap_com: unknown DeepSpeed "
                 "key — did you mean `overlap_comm`?")


def test_unresolvable_auto_in_template(tmp_path, capsys):
    t = template(tmp_path, lambda c: c["zero_optimization"].update(sub_group_size="auto"))
    r = tiny_recipe(tmp_path / "run", zero={"stage": 2, "template": t})
    expect_error(tmp_path, capsys, r, "zero_optimization.sub_group_size: is \"auto\" but dpkit "
                 "cannot resolve it")


def test_real_process_exit_code_and_single_line(tmp_path):
    r = tiny_recipe(tmp_path / "run")
    r["zero"]["stagee"] = 3
    path = write_recipe(tmp_path / "recipe.yaml", r)
    proc = subprocess.run([sys.executable, "-m", "dpkit.cli", "train", str(path)], cwd=ROOT,
                          env=rank_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: zero.stagee: unknown key — did you mean `zero.stage`?"]
    assert "Traceback" not in proc.stderr


# --------------------------------------------- what broke after validate said OK (issue 27)
@pytest.mark.parametrize("where", ["proc", "below-a-file"])
def test_validate_refuses_an_output_dir_that_cannot_be_created(tmp_path, capsys, where):
    # As root, the permission bits of /proc say "writable"; only creating a directory tells.
    if where == "proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    (tmp_path / "notes.txt").write_text("a file, not a directory")
    out = Path("/proc/dpkit-run/deeper") if where == "proc" else tmp_path / "notes.txt" / "run"
    path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(out))
    before = sorted(tmp_path.iterdir())
    assert main(["validate", str(path)]) == 2
    out_text, err = capsys.readouterr()
    assert "OK" not in out_text
    errors = err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: output.dir: '{out}' can't be "
                                                     "created"), err
    assert sorted(tmp_path.iterdir()) == before and not Path("/proc/dpkit-run").exists()


def test_validate_creates_nothing_while_checking_the_output_dir(tmp_path, capsys):
    out = tmp_path / "runs" / "today" / "run"  # three directories validate must try to make
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (out, empty):
        path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(target))
        assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "recipe.yaml"]
    assert list(empty.iterdir()) == []


def test_a_key_set_twice_names_the_key_and_both_lines(tmp_path, capsys):
    path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tmp_path / "run"))
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("  lr:")) + 1
    lines.insert(first + 1, "  lr: 1.0")  # the last would silently win: a 300x higher lr
    path.write_text("\n".join(lines) + "\n")
    for command in ("validate", "train"):
        assert main([command, str(path)]) == 2
        out, err = capsys.readouterr()
        assert "launching" not in out and "OK" not in out
        assert err.strip().splitlines() == [
            f"error: {path}: `train.lr` is set twice, at lines {first} and {first + 2} (YAML "
            "would silently keep the second) — keep one of them"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
@pytest.mark.parametrize("combination, keys", [
    ({"train": {"sequence_parallel": 2}}, "`train.sequence_parallel: 2` does not work with"),
    ({"data": {"streaming": True}, "train": {"max_steps": 4}},
     "`data.streaming` does not work with"),
])
def test_validate_refuses_preference_with_sequence_parallel_or_streaming(tmp_path, capsys,
                                                                        objective, combination,
                                                                        keys):
    """Both passed validate, then every rank crashed (the split drops the pair mask; the stream
    reader gets pairs it can't tokenize): refused in one line naming the keys, exit code 2."""
    r = tiny_recipe(tmp_path / "run", data={"sources": [
        {"path": "dpkit:data/self_instruct_seed.preference.jsonl", "format": "preference"}]})
    r["objective"] = objective
    for section, values in combination.items():
        r[section].update(values)
    path = write_recipe(tmp_path / "recipe.yaml", r)
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "OK" not in out
    errors = err.strip().splitlines()
    assert len(errors) == 1 and keys in errors[0] and f"`objective: {objective}`" in errors[0], err
    assert not (tmp_path / "run").exists()
