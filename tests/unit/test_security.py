"""Safe by default (docs/security.md): nothing deleted or overwritten that dpkit did not create,
the Hub token only where the command line said, no remote code during validate, no predictable
temporary files, host names that cannot become ssh options.

In-process where the real thing runs in-process; the references are independent of dpkit's
code: checksums of every file read straight from disk, the headers a local listener received,
a sentinel file that remote code would create."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe, write_recipe

from dpkit import checkpoint as C
from dpkit import hub as dphub
from dpkit.cli import main
from dpkit.errors import RecipeError
from dpkit.launch import LaunchPlan, command, read_hostfile
from dpkit.recipe import recipe_from_dict
from dpkit.rundir import MARKER, mark, marked_kind, output_dir_problem, prepare_output_dir

TOKEN = "hf_" + os.urandom(17).hex()


def checksums(root: Path) -> dict[str, str]:
    """Every file and link under `root` (and `root` itself if a file), by content."""
    root = Path(root)
    paths = [root] if root.is_file() else sorted(root.rglob("*"))
    out = {}
    for p in paths:
        if p.is_symlink():
            out[str(p)] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p)] = "dir"
    return out


def recipe_for(out, **output):
    return recipe_from_dict(tiny_recipe(Path(out), output={"dir": str(out), **output}))


class Main:  # what prepare_output_dir needs of the rank's environment
    is_main = True


# ----------------------------------------------------------------------------- overwriting
@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """cwd = tmp/home/projects/work, $HOME = tmp/home; each holds a file and is marked as a
    run, to show that a marker can't make them replaceable."""
    home = tmp_path / "home"
    work = home / "projects" / "work"
    work.mkdir(parents=True)
    for d in (home, work.parent, work):
        (d / "precious.txt").write_text("mine")
        mark(d, "run")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    return work


@pytest.mark.parametrize("name,why", [(".", "is the working directory"),
                                      ("..", "is a parent of the working directory"),
                                      ("~", "is your home directory"),
                                      ("/", "is the root directory")])
def test_overwrite_refuses_cwd_parent_home_and_root(workdir, name, why):
    before = checksums(workdir.parents[1])
    problem = output_dir_problem(recipe_for(name, overwrite=True))
    assert problem is not None and len(problem.problems) == 1
    line = str(problem.problems[0])
    assert line.startswith("output.dir:") and why in line and "nothing was changed" in line
    with pytest.raises(RecipeError, match=why):  # the ranks refuse too, before touching anything
        prepare_output_dir(recipe_for(name, overwrite=True), Main())
    assert checksums(workdir.parents[1]) == before


def test_overwrite_refuses_a_directory_dpkit_did_not_create(tmp_path, capsys):
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("years of work")
    before = checksums(other)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(other, output={"overwrite": True}))
    assert main(["train", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"error: output.dir: '{other}' was not created by dpkit as a run directory "
                    f"(no {MARKER} marker), and dpkit deletes only what it created; nothing was "
                    "changed — choose another directory (or remove it yourself if you mean to)")]
    assert checksums(other) == before


def test_overwrite_refuses_a_symlink_even_to_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    mark(run, "run")
    (run / "metrics.jsonl").write_text("{}\n")
    link = tmp_path / "link"
    link.symlink_to(run)
    before = checksums(tmp_path)
    problem = output_dir_problem(recipe_for(link, overwrite=True))
    assert problem is not None and "is a symbolic link" in str(problem)
    assert checksums(tmp_path) == before


def test_overwrite_replaces_only_a_marked_run(tmp_path):
    run = tmp_path / "run"
    recipe = recipe_for(run, overwrite=True)
    assert output_dir_problem(recipe) is None  # new: created and marked
    assert prepare_output_dir(recipe, Main()) == (run, None)
    assert marked_kind(run) == "run"
    (run / "old.txt").write_text("from the last run")
    assert output_dir_problem(recipe) is None
    prepare_output_dir(recipe, Main())
    assert sorted(p.name for p in run.iterdir()) == [MARKER]  # replaced, marked again


def test_resume_refuses_to_write_into_a_foreign_directory(tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "recipe.yaml").write_text("my own notes\n")
    recipe = recipe_from_dict({**tiny_recipe(other), "resume": "auto"})
    assert "is not a dpkit run directory" in str(output_dir_problem(recipe))


def test_plan_write_never_replaces_a_runs_files(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    mark(run, "run")
    (run / "recipe.yaml").write_text("what was trained\n")
    (run / "ds_config.json").write_text("{}\n")
    before = checksums(run)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "out"))
    assert main(["plan", str(recipe), "--write", str(run)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: --write: '{run}' already holds recipe.yaml, ds_config.json")
    assert out == ""  # refused before planning, not after printing a plan
    assert checksums(run) == before
    # A directory of its own: written, marked, and written again on the next plan.
    planned = tmp_path / "planned"
    for _ in range(2):
        assert main(["plan", str(recipe), "--write", str(planned)]) == 0
    assert marked_kind(planned) == "plan" and (planned / "launch.sh").is_file()


def one_step_run(run: Path) -> Path:
    """A run directory with one step's metrics: enough for `dpkit report`."""
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "tokens": 10,
                                                   "step_time_s": 0.1}) + "\n")
    return run


def test_report_out_never_replaces_another_report(tmp_path, capsys):
    run = one_step_run(tmp_path / "run")
    theirs = tmp_path / "docs"
    theirs.mkdir()
    (theirs / "report.md").write_text("# a report someone wrote\n")
    before = checksums(theirs)
    assert main(["report", str(run), "--out", str(theirs)]) == 2
    assert "already holds report.md" in capsys.readouterr().err
    assert checksums(theirs) == before
    assert main(["report", str(run)]) == 0 and main(["report", str(run)]) == 0  # its own: again
    assert marked_kind(run / "report") == "report"


def sent_run(tmp_path) -> tuple[Path, Path]:
    """A run directory someone sent, and a folder of yours beside it (with a file to protect)."""
    run = one_step_run(tmp_path / "sent-run")
    yours = tmp_path / "yours"
    yours.mkdir()
    (yours / "notes.txt").write_text("mine")
    (yours / "secret.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "key": TOKEN}) + "\n")
    return run, yours


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("planted", ["report folder", "report.md", "plot", "metrics.jsonl"])
def test_report_follows_no_link_out_of_a_run(tmp_path, capsys, planted):
    run, yours = sent_run(tmp_path)
    if planted == "report folder":  # run/report -> your folder: the report would land there
        link = run / "report"
        link.symlink_to(yours)
    elif planted in ("report.md", "plot"):  # dressed up as a report dpkit made, one file a link
        (run / "report").mkdir()
        mark(run / "report", "report")
        link = run / "report" / ("report.md" if planted == "report.md" else "loss.png")
        link.symlink_to(yours / "notes.txt")
    else:  # read from outside the run: your secrets would be drawn into report.md
        link = run / "metrics.jsonl"
        link.unlink()
        link.symlink_to(yours / "secret.jsonl")
    before, run_before = checksums(yours), checksums(run)
    assert main(["report", str(run)]) == 2
    error = one_error(capsys)
    assert error.startswith(f"error: {link}: is a symbolic link to '") and \
        f"outside '{run}'" in error and "nothing was changed" in error
    assert checksums(yours) == before and checksums(run) == run_before


def test_report_out_writes_through_no_link(tmp_path, capsys):
    run, yours = sent_run(tmp_path)
    out = tmp_path / "reports"  # a report folder of the right kind, holding a planted link
    out.mkdir()
    mark(out, "report")
    (out / "report.md").symlink_to(yours / "notes.txt")
    before = checksums(yours)
    assert main(["report", str(run), "--out", str(out)]) == 2
    assert one_error(capsys).startswith(f"error: {out / 'report.md'}: is a symbolic link")
    assert checksums(yours) == before


def test_report_follows_links_that_stay_inside(tmp_path, capsys):
    run, _ = sent_run(tmp_path)
    (run / "logs").mkdir()
    (run / "metrics.jsonl").rename(run / "logs" / "metrics.jsonl")
    (run / "metrics.jsonl").symlink_to(Path("logs") / "metrics.jsonl")
    typed = tmp_path / "latest"  # a link the user typed is theirs to follow
    typed.symlink_to(run)
    assert main(["report", str(typed)]) == 0
    assert "| 1 | — | 2.0000 |" in (run / "report" / "report.md").read_text()  # step, loss


def test_export_out_replaces_only_an_earlier_export(tmp_path):
    from dpkit.export import check_out, staging

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "weights.safetensors").write_bytes(b"not dpkit's")
    with pytest.raises(RecipeError, match="already exists and is not empty.*--overwrite"):
        check_out(mine, overwrite=False)
    with pytest.raises(RecipeError, match="was not created by dpkit as a export"):
        check_out(mine, overwrite=True)
    assert (mine / "weights.safetensors").read_bytes() == b"not dpkit's"
    out = tmp_path / "export"
    for text in ("first", "second"):  # an export dpkit made is replaced by the next one
        check_out(out, overwrite=True)
        with staging(out) as tmp:
            (tmp / "config.json").write_text(text)
    assert (out / "config.json").read_text() == "second" and marked_kind(out) == "export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "mine"]  # no leftovers
    with pytest.raises(RuntimeError), staging(tmp_path / "failed"):
        raise RuntimeError("save failed half way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "mine"]


# ------------------------------------------------------------------------------- checkpoints
def fake_checkpoint(run: Path, step: int) -> Path:
    """The files dpkit's checks read, written with torch.save like DeepSpeed's."""
    ckpt = C.checkpoints_dir(run) / C.step_name(step)
    (ckpt / "ds").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(64, 64)}}, ckpt / "ds" / "mp_rank_00_model_states.pt")
    torch.save({"state": torch.zeros(64, 64)}, ckpt / "ds" / "optim_states.pt")
    torch.save({"torch": torch.get_rng_state(), "cuda": None}, ckpt / "rng-rank0.pt")
    state = C.TrainState(step=step, tokens_seen=1, world_size=1, zero_stage=2, seed=0,
                         steps_per_epoch=4)
    (ckpt / "dpkit.json").write_text(json.dumps(state.__dict__))
    (ckpt / C.MARKER).write_text(f"{step}\n")
    return ckpt


def test_truncated_shard_is_named_once_before_anything_loads(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    mark(run, "run")
    fake_checkpoint(run, 4)
    newest = fake_checkpoint(run, 8)
    shard = newest / "ds" / "optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert C.damaged_files(newest) == [shard] and C.damaged_files(run / "checkpoints" /
                                                                  "step-00000004") == []
    before = checksums(run)
    recipe = write_recipe(tmp_path / "r.yaml", {**tiny_recipe(run), "resume": "auto"})
    assert main(["train", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count(str(shard)) == 1 and len(err.strip().splitlines()) == 1, err
    assert "resume=" + str(run / "checkpoints" / "step-00000004") in err  # the way out
    assert checksums(run) == before


class Payload:
    """What a hostile checkpoint could carry: unpickling it runs code (here: makes a file)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


class DeepSpeedStandIn:
    """The engine's side of dpkit.checkpoint.load: DeepSpeed's own files (unpickled in full by
    DeepSpeed, as docs/security.md says) are not what this test is about; dpkit's reads are."""

    def load_checkpoint(self, path, **_):
        return path, {}


class Rank0:
    rank = 0


def test_rng_state_loads_without_unpickling_code(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 4)  # saves the generator's state as it is now
    saved = torch.get_rng_state()
    torch.rand(8)  # move the generator on: dpkit's resume must put it back
    state = C.load(DeepSpeedStandIn(), ckpt, Rank0(), universal=False)
    assert torch.equal(torch.get_rng_state(), saved) and state.step == 4
    sentinel = tmp_path / "code-ran"
    torch.save({"torch": saved, "cuda": None, "extra": Payload(str(sentinel))},
               ckpt / "rng-rank0.pt")
    with pytest.raises(pickle.UnpicklingError):
        C.load(DeepSpeedStandIn(), ckpt, Rank0(), universal=False)
    assert not sentinel.exists()


def test_export_of_zero0_never_unpickles_code(tmp_path):
    from dpkit.export import consolidated_state_dict

    ckpt = fake_checkpoint(tmp_path / "run", 2)
    state = json.loads((ckpt / "dpkit.json").read_text())
    (ckpt / "dpkit.json").write_text(json.dumps({**state, "zero_stage": 0}))
    weights = consolidated_state_dict(ckpt)  # DeepSpeed's layout: plain data loads
    assert torch.equal(weights["w"], torch.ones(64, 64))
    sentinel = tmp_path / "code-ran"
    torch.save({"module": {"w": torch.ones(2)}, "extra": Payload(str(sentinel))},
               ckpt / "ds" / "mp_rank_00_model_states.pt")
    with pytest.raises(RecipeError, match="holds more than tensors"):
        consolidated_state_dict(ckpt)
    assert not sentinel.exists()


def test_resume_outside_output_dir_is_warned(tmp_path, capsys):
    theirs = fake_checkpoint(tmp_path / "downloaded", 4)
    recipe = write_recipe(tmp_path / "r.yaml", {**tiny_recipe(tmp_path / "run"),
                                                "resume": str(theirs)})
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert f"warning: resume loads {theirs}, outside output.dir" in out and "pickles" in out


# ------------------------------------------------------------------------------- the token
class Recorder:
    """A local HTTP listener that records the headers of every request and answers 404."""

    def __init__(self):
        self.headers: list[dict[str, str]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                recorder.headers.append(dict(self.headers))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(404)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = do_PUT = do_HEAD = _any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def saw_token(self) -> bool:
        return any(TOKEN in v for h in self.headers for v in h.values())

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("DPKIT_SECRET", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    rec = Recorder()
    yield rec
    rec.close()


def received_run(tmp_path: Path, hub: dict) -> Path:
    """A run directory someone sent: a model and a recipe.yaml whose hub section they wrote."""
    from transformers import LlamaConfig, LlamaForCausalLM

    run = tmp_path / "received"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1)).save_pretrained(run / "model")
    (run / "recipe.yaml").write_text(yaml.safe_dump({"hub": {"repo_id": "me/model", **hub}}))
    return run


@pytest.mark.parametrize("hub,key", [
    ({}, "hub.endpoint"),                               # their server, the standard token
    ({"token_env": "DPKIT_SECRET"}, "hub.endpoint"),    # their server, any secret they name
])
def test_token_never_goes_to_an_endpoint_only_a_run_names(tmp_path, listener, capsys, hub, key):
    run = received_run(tmp_path, {"endpoint": listener.url, "retries": 0, **hub})
    before = checksums(run)
    assert main(["push", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"error: {key}: '{listener.url}' is named only by the recipe" in err or \
        f"{key}: '{listener.url}' is named only by the recipe" in err, err
    assert TOKEN not in err and listener.headers == [] and checksums(run) == before
    # The listener does record a token sent to it: the user naming it on the command line.
    extra = ["--token-env", hub["token_env"]] if "token_env" in hub else []
    assert main(["push", str(run), "--endpoint", listener.url, *extra]) == 1
    assert listener.saw_token() and TOKEN not in capsys.readouterr().err


def test_a_recipe_cannot_pick_the_secret_or_plain_http(tmp_path, listener):
    def where(**hub):
        return [p.where for p in dphub.token_problems(dphub.HubSection(repo_id="me/m", **hub),
                                                      None)]

    assert where(token_env="AWS_SECRET_ACCESS_KEY") == ["hub.token_env"]
    assert where(token_env="HUGGING_FACE_HUB_TOKEN") == where() == []
    assert where(endpoint="https://huggingface.co/") == []
    ok = dphub.UserChoice(endpoint="http://hub.example.com", token_env="DPKIT_SECRET")
    assert [p.message for p in dphub.token_problems(dphub.HubSection(
        repo_id="me/m", endpoint="http://hub.example.com", token_env="DPKIT_SECRET"), ok)] == [
        "'http://hub.example.com' is not an https URL: the token would travel in clear text"]
    # `dpkit train`: the recipe alone is refused before launch; typed overrides are the user's.
    recipe = write_recipe(tmp_path / "r.yaml", {**tiny_recipe(tmp_path / "run"), "hub": {
        "repo_id": "me/m", "endpoint": listener.url, "token_env": "DPKIT_SECRET"}})
    report_wheres = []
    for overrides in ([], [f"hub.endpoint={listener.url}", "hub.token_env=DPKIT_SECRET"]):
        from dpkit.hub_schema import user_choice_from_overrides
        from dpkit.preflight import check_recipe
        from dpkit.recipe import load_recipe

        r = load_recipe(str(recipe), overrides)
        report = check_recipe(r, 2, on_cpu=True, check_data=False,
                              hub_user=user_choice_from_overrides(overrides))
        report_wheres.append(sorted(p.where for p in report.problems))
    assert report_wheres == [["hub.endpoint", "hub.token_env"], []]
    assert listener.headers == []


def test_redaction_covers_the_token_hf_auth_login_stored(tmp_path, monkeypatch):
    from huggingface_hub import constants

    stored = "hf_" + os.urandom(16).hex()
    path = tmp_path / "token"
    path.write_text(stored + "\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(path))
    for name in dphub.STANDARD_TOKEN_ENVS:
        monkeypatch.delenv(name, raising=False)
    assert stored not in dphub._redact(f"401 for Bearer {stored}")
    said = []
    hub = dphub.HubSection(repo_id="me/m")  # nothing to push from here: the error is reported

    def boom(*args, **kwargs):
        raise RuntimeError(f"server echoed Authorization: Bearer {stored}")

    monkeypatch.setattr(dphub, "push_run_dir", boom)
    dphub.push_on_main(tmp_path, hub, is_main=True, say=said.append)
    assert said and all(stored not in s for s in said)


# ------------------------------------------------------------------------------- remote code
def test_validate_never_runs_remote_code_and_names_the_repository(tmp_path, capsys):
    repo = tmp_path / "someones-model"
    repo.mkdir()
    sentinel = tmp_path / "code-ran"
    code = f"open({str(sentinel)!r}, 'w').write('ran')\n"
    (repo / "configuration_evil.py").write_text(
        code + "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (repo / "modeling_evil.py").write_text(code)
    (repo / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                                           "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    r = tiny_recipe(tmp_path / "run")
    r["model"] = {"name_or_path": str(repo), "tokenizer": r["model"]["tokenizer"],
                  "trust_remote_code": True}
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", r))]) == 0
    out = capsys.readouterr().out
    assert not sentinel.exists()
    assert "warning: model.trust_remote_code is true" in out and str(repo) in out


# ----------------------------------------------------------------------------------- hosts
def test_generated_hostfile_has_no_predictable_name(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    victim = tmp_path / "victim"
    victim.write_text("someone else's file\n")
    for name in ("dpkit-hostfile-2-2", "dpkit-hostfile-2-2.txt"):  # the old name, planted
        (tmp_path / name).symlink_to(victim)
    paths = []
    for _ in range(2):
        plan = LaunchPlan("deepspeed", nproc_per_node=2, nodes=2, node_rank=0,
                          master_addr="10.0.0.1", master_port=29600)
        cmd = command(plan, "r.yaml", [])
        paths.append(Path(cmd[cmd.index("--hostfile") + 1]))
        assert command(plan, "r.yaml", []) == cmd  # one file per launch, not one per call
    assert victim.read_text() == "someone else's file\n"
    assert paths[0] != paths[1] and not any(p.is_symlink() for p in paths)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in paths)
    assert read_hostfile(paths[0]) == [("node0", 2), ("node1", 2)]


@pytest.mark.parametrize("host", ["-oProxyCommand=touch_x", "a;b", "$(id)", "node`x`"])
def test_host_names_that_could_be_options_or_shell_are_refused(tmp_path, host):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"node-a slots=2\n{host} slots=2\n")
    problems = LaunchPlan("deepspeed", hostfile=str(hostfile)).problems()
    assert [p.where for p in problems] == ["--hostfile"]
    assert "line 2" in problems[0].message and "not a host name" in problems[0].message


def test_doctor_passes_the_host_after_double_dash(tmp_path, monkeypatch):
    from dpkit.doctor import remote_report

    log = tmp_path / "argv"
    ssh = tmp_path / "ssh"
    ssh.write_text(f"#!/bin/bash\nprintf '%s\\n' \"$@\" > {log}\necho '{{}}'\n")
    ssh.chmod(0o755)
    monkeypatch.setenv("DPKIT_SSH", f"{ssh} -o BatchMode=yes")
    assert remote_report("node-b", 30) == {}
    argv = log.read_text().splitlines()
    assert argv[:4] == ["-o", "BatchMode=yes", "--", "node-b"]
