"""dpkit push against a local stand-in of the Hub's HTTP API (tests/hub_standin.py).

The real huggingface_hub client runs, unpatched, in a child process pointed at the stand-in with
its documented settings: HF_ENDPOINT, and HF_HUB_DISABLE_XET=1 for the classic LFS upload path
(both read when huggingface_hub is imported, hence the child process). References are
independent of dpkit: the tiny model's weights and outputs kept in memory here, the fixture's
own numbers, and bytes read straight from disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dpkit import hub as dphub
from dpkit.cli import push as push_cli
from dpkit import model_card
from dpkit.errors import RecipeError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hub_standin import HubStandin  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_" + secrets.token_hex(17)  # a fresh secret per session: any copy of it is a leak
REPO = "dpkit-tests/tiny-chat"

HARNESS = """
import argparse, sys
from dpkit.cli import push as hub
from dpkit.errors import RecipeError, format_errors
parser = argparse.ArgumentParser(prog="dpkit")
hub.register(parser.add_subparsers(dest="command"))
args = parser.parse_args(sys.argv[1:])
try:
    sys.exit(args.func(args))
except RecipeError as e:
    print(format_errors(e), file=sys.stderr)
    sys.exit(2)
"""


# ------------------------------------------------------------------------------------ fixtures
def make_tokenizer():
    """A small word-level tokenizer with a chat template, trained here (no shared asset)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = "give me three names for a cat tom felix luna the user assistant said hello".split()
    tok.train_from_iterator([" ".join(words)] * 3, trainers.WordLevelTrainer(
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + "
                          "' </s> ' }}{% endfor %}{% if add_generation_prompt %}"
                          "{{ '<|assistant|> ' }}{% endif %}")
    return fast


def tiny_model(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


FIXTURE_SUMMARY = {
    "steps": 12, "tokens_seen": 123456, "final_loss": 1.23456789, "final_eval_loss": 1.3456789,
    "world_size": 2, "global_batch_size": 8, "micro_batch_size": 2, "grad_accum": 2,
    "zero_stage": 2, "dtype": "float32", "base_model": "HuggingFaceTB/SmolLM2-135M",
    "datasets": ["data/self_instruct_seed.messages.jsonl", "tatsu-lab/alpaca"],
    "wall_time_s": 42.0, "hardware": "2 CPU ranks on x86_64 (2 cores)",
    "versions": {"torch": "2.13.0", "deepspeed": "0.19.8", "transformers": "5.24.0",
                 "accelerate": "1.15.0", "peft": "0.21.2", "python": "3.11.9"},
}
FIXTURE_DS = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
              "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2}}


def write_run_files(run: Path, hub_section: dict | None = None) -> None:
    """recipe.yaml, ds_config.json, metrics.jsonl (torn last line) and summary.json."""
    recipe = {"model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M"},
              "data": {"sources": [{"path": "data/self_instruct_seed.messages.jsonl",
                                    "format": "messages"}]},
              "train": {"global_batch_size": 8, "micro_batch_size": 2},
              "zero": {"stage": 2}, "output": {"dir": str(run)}}
    if hub_section:
        recipe["hub"] = hub_section
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (run / "ds_config.json").write_text(json.dumps(FIXTURE_DS, indent=2))
    lines = [json.dumps({"step": s, "epoch": 0, "loss": 3.0 / s, "lr": 1e-4, "grad_norm": 1.0,
                         "tokens": 100, "tokens_seen": 100 * s, "samples": 8,
                         "step_time_s": 0.1, "tokens_per_s": 1000.0, "time": 1e9 + s})
             for s in range(1, 13)]
    lines.insert(6, json.dumps({"step": 6, "eval_loss": 0.9, "eval_tokens": 50,
                                "tokens_seen": 600, "time": 1e9 + 6}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 13, "lo')
    (run / "summary.json").write_text(json.dumps(FIXTURE_SUMMARY, indent=2))
    (run / "samples.jsonl").write_text("".join(  # answers at step 0 and 12 (dpkit/eval)
        json.dumps({"step": s, "index": 0, "prompt": "Name a cat.", "completion": answer,
                    "completion_ids": [1, 2]}) + "\n" for s, answer in ((0, "zzz"), (12, "Tom"))))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A finished full fine-tune: returns (run_dir, state_dict kept in memory, tokenizer)."""
    run = tmp_path_factory.mktemp("runs") / "full"
    (run / "model").mkdir(parents=True)
    tok = make_tokenizer()
    model = tiny_model(len(tok))
    model.save_pretrained(run / "model")
    tok.save_pretrained(run / "model")
    (run / "model" / "optimizer.pt").write_bytes(b"a pickle that must stay local")
    write_run_files(run, {"repo_id": REPO, "license": "apache-2.0", "tags": ["tiny", "test"],
                          "retry_wait_s": 0.05})
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    return run, reference, tok


def push(run: Path, hub: HubStandin, *args: str, token: str | None = TOKEN,
         env: dict | None = None, home: Path) -> subprocess.CompletedProcess:
    """`dpkit push RUN ...` in a child process, as a user would run it."""
    child = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    child.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(home),
                 HF_DEBUG="1",  # the client's most verbose logging: must not show the token
                 HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(ROOT))
    child.update(env or {})
    if token is not None:
        child["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-c", HARNESS, "push", str(run), *args], env=child,
                          capture_output=True, text=True, timeout=300, cwd=run.parent)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_no_token(paths, *texts, token: str = TOKEN) -> None:
    for text in texts:
        assert token not in text
    checked = 0
    for path in paths:
        assert token.encode() not in path.read_bytes(), f"token found in {path}"
        checked += 1
    assert checked > 0


def download(hub: HubStandin, repo: str, cache: Path, revision: str = "main") -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=revision, endpoint=hub.url, token=TOKEN,
                                  cache_dir=cache))


# ---------------------------------------------------------------------------------- the schema
def test_hub_section_schema():
    for name, field in dphub.HubSection.model_fields.items():
        assert field.description, f"hub.{name} has no docstring"
    hub = dphub.hub_from_dict({"repo_id": "me/model"})
    assert hub.private and hub.push_at_end and hub.token_env == "HF_TOKEN"
    with pytest.raises(RecipeError, match=r"hub\.reop_id"):
        dphub.hub_from_dict({"repo_id": "me/model", "reop_id": "x"})
    with pytest.raises(RecipeError, match=r"hub\.repo_id: must look like `owner/name`"):
        dphub.hub_from_dict({"repo_id": "no-namespace"})
    pasted = "hf_" + "x" * 30
    with pytest.raises(RecipeError) as err:
        dphub.hub_from_dict({"repo_id": "me/model", "token_env": pasted})
    assert "hub.token_env" in str(err.value) and pasted not in str(err.value)
    assert TOKEN not in str(pickle.dumps(hub))


def test_missing_token_is_a_user_error(full_run, monkeypatch):
    run, *_ = full_run
    monkeypatch.delenv("DPKIT_NO_SUCH_TOKEN", raising=False)
    parser = argparse.ArgumentParser(prog="dpkit")
    push_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["push", str(run), "--token-env", "DPKIT_NO_SUCH_TOKEN"])
    with pytest.raises(RecipeError, match=r"hub\.token_env: no Hub token: \$DPKIT_NO_SUCH_TOKEN"):
        args.func(args)
    args = parser.parse_args(["push", str(run.parent / "missing"), "--repo-id", "a/b"])
    with pytest.raises(RecipeError, match="run directory not found"):
        args.func(args)


# ---------------------------------------------------------------------------------- the card
def test_model_card_metadata_and_training_story(full_run, tmp_path):
    run, *_ = full_run
    readme, plot = model_card.write_card(run, tmp_path, repo_id=REPO, base_model=None,
                                         adapter=False, license="apache-2.0", tags=["tiny"])
    text = readme.read_text()
    front = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    meta = yaml.safe_load(front.group(1))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert meta["datasets"] == ["tatsu-lab/alpaca"]  # a local file is no Hub dataset id
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert {"dpkit", "deepspeed", "zero-stage-2", "tiny"} <= set(meta["tags"])
    s = FIXTURE_SUMMARY
    assert f"| final train loss | {s['final_loss']:.4f} |" in text
    assert f"| final eval loss | {s['final_eval_loss']:.4f} |" in text
    assert f"| optimizer steps | {s['steps']} |" in text
    assert f"| tokens seen (non-padding tokens, all ranks) | {s['tokens_seen']:,} |" in text
    assert "| world size (data-parallel ranks) | 2 |" in text
    assert "8 rows = micro batch 2 × gradient accumulation 2 × world size 2" in text
    assert s["hardware"] in text and "`data/self_instruct_seed.messages.jsonl`" in text
    for name, version in s["versions"].items():
        assert f"- {name}: {version}" in text
    assert (run / "recipe.yaml").read_text().strip() in text
    ds_block = re.search(r"## Resolved DeepSpeed config\n\n```json\n(.*?)\n```", text, re.DOTALL)
    assert json.loads(ds_block.group(1)) == FIXTURE_DS
    assert f"]({model_card.LOSS_PLOT})" in text and plot == tmp_path / model_card.LOSS_PLOT
    assert "| step 0 | step 12 |" in text and "| Name a cat. | zzz | Tom |" in text  # samples
    from matplotlib.image import imread

    image = imread(plot)
    assert image.shape[0] > 100 and not np.all(image == image[0, 0])


# ------------------------------------------------------------------------------------ pushing
def test_push_end_to_end(full_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    run, reference, tok = full_run
    with HubStandin(token=TOKEN) as hub:
        hub.fail("POST", "/api/repos/create", 503)   # not retried by huggingface_hub itself
        hub.fail("POST", "/commit/main", 503)        # neither is the commit call
        hub.fail("PUT", "/_lfs/", 502)               # retried inside huggingface_hub
        proc = push(run, hub, home=tmp_path / "home")
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert proc.stdout.strip() == f"{hub.url}/{REPO}/commit/{hub.repos[REPO].branches['main']}"

        calls = [(e["method"], e["path"], e["status"]) for e in hub.log]
        creates = [c for c in calls if c[1] == "/api/repos/create"]
        commits = [c for c in calls if c[1].endswith("/commit/main")]
        assert [c[2] for c in creates] == [503, 200] and [c[2] for c in commits] == [503, 200]
        assert hub.unknown == []  # no Xet route, nothing the stand-in does not model
        assert all(e["authorized"] for e in hub.log if e["method"] == "POST"
                   and e["path"] != "/api/agent-harnesses")
        assert hub.repos[REPO].private

        # Every file arrived with the right content.
        files = hub.files(REPO)
        model_files = {"config.json", "generation_config.json", "model.safetensors",
                       "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
        local_model = {p.name for p in (run / "model").iterdir()} - {"optimizer.pt"}
        assert model_files <= local_model  # what transformers saved in the fixture
        expected = {".gitattributes", "README.md", model_card.LOSS_PLOT, *local_model,
                    *(f"training/{n}" for n in dphub.TRAINING_FILES)}
        assert set(files) == expected
        for name in local_model:
            assert files[name] == (run / "model" / name).read_bytes(), name
        for name in dphub.TRAINING_FILES:
            assert files[f"training/{name}"] == (run / name).read_bytes(), name
        assert files["README.md"] == (run / "hub" / "README.md").read_bytes()
        assert files[model_card.LOSS_PLOT][:8] == b"\x89PNG\r\n\x1a\n"
        assert "license: apache-2.0" in files["README.md"].decode()
        record = json.loads((run / "hub" / "push.json").read_text())
        assert record["commit"] == hub.repos[REPO].branches["main"]

        # No token anywhere: run directory (pickles included), what the Hub stored, the output.
        assert_no_token([p for p in run.rglob("*") if p.is_file()] + hub.stored_paths(),
                        proc.stdout, proc.stderr)
        # HF_DEBUG did log every request's headers (redacted by the client): the check bites.
        assert "authorization: <TOKEN>" in proc.stderr

        # Downloaded back, the folder loads with from_pretrained and holds the trained weights.
        path = download(hub, REPO, tmp_path / "cache")
    loaded = AutoModelForCausalLM.from_pretrained(path)
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)
    tok2 = AutoTokenizer.from_pretrained(path)
    assert tok2.chat_template == tok.chat_template
    messages = [{"role": "user", "content": "give me three names for a cat"}]
    assert tok2.apply_chat_template(messages, add_generation_prompt=True) == \
        tok.apply_chat_template(messages, add_generation_prompt=True)
    assert GenerationConfig.from_pretrained(path).eos_token_id == loaded.config.eos_token_id


def test_push_to_a_branch_leaves_main_alone(full_run, tmp_path):
    run, *_ = full_run
    with HubStandin(token=TOKEN) as hub:
        assert push(run, hub, home=tmp_path / "h").returncode == 0
        main_before = hub.repos[REPO].branches["main"]
        first_push = len(hub.log)
        # A new tag changes the card only; the branch starts from main.
        proc = push(run, hub, "--revision", "exp-1", "--tag", "exp", "--message", "try 1",
                    home=tmp_path / "h")
        assert proc.returncode == 0, proc.stderr[-3000:]
        repo = hub.repos[REPO]
        assert repo.branches["main"] == main_before
        assert repo.messages[repo.branches["exp-1"]] == "try 1"
        on_branch, on_main = hub.files(REPO, "exp-1"), hub.files(REPO, "main")
        assert on_branch["model.safetensors"] == (run / "model" / "model.safetensors").read_bytes()
        assert "- exp" in on_branch["README.md"].decode()
        assert "- exp" not in on_main["README.md"].decode()
        # The weights were stored already: the second push sent no LFS blob.
        assert not [e for e in hub.log[first_push:] if e["method"] == "PUT"]
    (run / "hub" / "README.md").unlink()  # leave the shared fixture's card as other tests expect


def test_failed_push_keeps_the_local_model(full_run, tmp_path):
    run, *_ = full_run
    before = {p: sha(p) for p in (run / "model").iterdir()}
    with HubStandin(token=TOKEN) as hub:
        hub.fail("POST", "/commit/", 503, times=100)
        proc = push(run, hub, "--retries", "2", home=tmp_path / "h")
        assert proc.returncode == 1
        assert "uploading failed" in proc.stderr and "unchanged" in proc.stderr
        attempts = [e for e in hub.log if e["path"].endswith("/commit/main")]
        assert len(attempts) == 3  # the first try and two retries
        # A wrong token is not transient: one attempt, and the wrong token is not echoed.
        wrong = "hf_" + secrets.token_hex(17)
        proc2 = push(run, hub, token=wrong, home=tmp_path / "h")
        assert proc2.returncode == 1
        assert len([e for e in hub.log if e["path"] == "/api/repos/create"]) == 2
        assert_no_token([p for p in run.rglob("*") if p.is_file()], proc2.stdout, proc2.stderr,
                        token=wrong)
    assert {p: sha(p) for p in (run / "model").iterdir()} == before
    assert (run / "hub" / "README.md").is_file()  # the card is kept for the next try


# ---------------------------------------------------------------------------------------- LoRA
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run: base model on disk, adapter in run/model, reference outputs in memory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    tok = make_tokenizer()
    tiny_model(len(tok), seed=1).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    # Loaded from disk, as a LoRA run does, so the adapter records where its base is.
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    torch.manual_seed(2)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj"])).eval()
    run = root / "run"
    peft_model.save_pretrained(run / "model")
    tok.save_pretrained(run / "model")
    write_run_files(run, {"repo_id": "dpkit-tests/tiny-lora", "retry_wait_s": 0.05})
    ids = torch.tensor([tok("<|user|> give me three names for a cat </s>")["input_ids"]])
    with torch.no_grad():
        expected = peft_model(ids).logits
    return run, root / "base", ids, expected


def test_lora_adapter_only_and_merged(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, base_dir, ids, expected = lora_run
    with HubStandin(token=TOKEN) as hub:
        proc = push(run, hub, home=tmp_path / "h")
        assert proc.returncode == 0, proc.stderr[-3000:]
        files = hub.files("dpkit-tests/tiny-lora")
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(files)
        assert "model.safetensors" not in files and "config.json" not in files
        meta = yaml.safe_load(files["README.md"].decode().split("---")[1])
        assert meta["library_name"] == "peft" and "lora" in meta["tags"]
        adapter = download(hub, "dpkit-tests/tiny-lora", tmp_path / "c1")

        proc = push(run, hub, "--repo-id", "dpkit-tests/tiny-merged", "--no-adapter-only",
                    home=tmp_path / "h")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "adapter_config.json" not in hub.files("dpkit-tests/tiny-merged")
        merged = download(hub, "dpkit-tests/tiny-merged", tmp_path / "c2")
        assert_no_token([p for p in run.rglob("*") if p.is_file()] + hub.stored_paths(),
                        proc.stdout, proc.stderr)

    with torch.no_grad():
        via_adapter = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()(ids).logits
        via_merged = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    torch.testing.assert_close(via_adapter, expected, rtol=0, atol=0)
    torch.testing.assert_close(via_merged, expected, rtol=1e-4, atol=1e-5)


def test_push_on_main_survives_a_failed_push(full_run, tmp_path, monkeypatch):
    """Other ranks only wait; a Hub error on rank 0 is reported, not raised."""
    run, *_ = full_run
    waited, said = [], []
    monkeypatch.setenv("DPKIT_TEST_TOKEN", TOKEN)
    hub = dphub.HubSection(repo_id=REPO, token_env="DPKIT_TEST_TOKEN",
                           endpoint="http://127.0.0.1:9", retries=0)  # nothing listens there
    assert dphub.push_on_main(run, hub, is_main=False, barrier=lambda: waited.append(1),
                              say=said.append) is None
    assert waited == [1] and said == []
    assert dphub.push_on_main(run, hub, is_main=True, barrier=lambda: waited.append(2),
                              say=said.append, user=dphub.UserChoice(
                                  endpoint=hub.endpoint, token_env=hub.token_env)) is None
    assert waited == [1, 2]
    assert any("push failed, the model is safe" in s for s in said)
    assert all(TOKEN not in s for s in said)


def test_card_for_a_checkpoint_of_a_run_in_progress(full_run, tmp_path):
    import shutil

    run, *_ = full_run
    live = tmp_path / "live"
    shutil.copytree(run, live, ignore=shutil.ignore_patterns("summary.json", "hub"))
    readme, _ = model_card.write_card(live, tmp_path / "card", repo_id=REPO, base_model=None,
                                      adapter=False, license=None, tags=[], step=12)
    text = readme.read_text()
    assert "Checkpoint at step 12; training was still running" in text
    # From metrics.jsonl, whose last whole train line is step 12 with loss 3.0 / 12.
    assert f"| final train loss | {3.0 / 12:.4f} |" in text
    assert "| final eval loss | 0.9000 |" in text
    assert "license" not in yaml.safe_load(text.split("---")[1])


def test_a_file_holding_the_token_is_never_pushed(full_run, tmp_path, monkeypatch):
    import shutil

    run, *_ = full_run
    leaky = tmp_path / "leaky"
    shutil.copytree(run, leaky, ignore=shutil.ignore_patterns("hub"))
    with open(leaky / "recipe.yaml", "a") as f:
        f.write(f"# token: {TOKEN}\n")
    monkeypatch.setenv("DPKIT_TEST_TOKEN", TOKEN)
    hub = dphub.HubSection(repo_id=REPO, token_env="DPKIT_TEST_TOKEN",
                           endpoint="http://127.0.0.1:9")  # never reached: refused before
    user = dphub.UserChoice(endpoint=hub.endpoint, token_env=hub.token_env)  # as if typed
    assert dphub.check_hub(hub, user) == []
    with pytest.raises(dphub.PushError, match="recipe.yaml contains the Hub token") as err:
        dphub.push_run_dir(leaky, hub, say=lambda _: None, user=user)
    assert TOKEN not in str(err.value)
    assert not (leaky / "hub" / "push.json").exists()


@pytest.mark.parametrize("planted", ["model file", "hub folder", "training file", "key twice"])
def test_a_run_someone_sent_cannot_push_or_write_outside_itself(full_run, tmp_path, planted,
                                                                monkeypatch, capsys):
    """A link in a run directory would upload a file from elsewhere (a key) or write the card
    into another folder; a key set twice in recipe.yaml leaves which repository unclear. Each is
    refused in one line before anything reaches the network (the stand-in sees no request).
    In-process `dpkit push` (a child process per case costs ~6 s here)."""
    import shutil

    from dpkit.cli import main

    run, *_ = full_run
    sent = tmp_path / "sent"
    shutil.copytree(run, sent, ignore=shutil.ignore_patterns("hub"))
    yours = tmp_path / "yours"
    yours.mkdir()
    (yours / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    where = {"model file": sent / "model" / "added_tokens.json",  # an allowlisted name
             "hub folder": sent / "hub", "training file": sent / "summary.json",
             "key twice": sent / "recipe.yaml"}[planted]
    if planted == "key twice":
        text = where.read_text()
        assert text.count("  repo_id: ") == 1
        lines = text.splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith("  repo_id: ")) + 1
        lines.insert(first, "  repo_id: someone-else/collector")
        where.write_text("\n".join(lines) + "\n")
    else:
        where.unlink(missing_ok=True)
        where.symlink_to(yours if planted == "hub folder" else yours / "id_ed25519")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with HubStandin(token=TOKEN) as hub:
        code = main(["push", str(sent), "--endpoint", hub.url])
        assert hub.log == [] and hub.repos == {}  # not one request: nothing was sent
    stderr = capsys.readouterr().err
    assert code == 2, stderr[-3000:]
    errors = stderr.strip().splitlines()
    if planted == "key twice":
        assert errors == [f"error: {where}: `hub.repo_id` is set twice, at lines {first} and "
                          f"{first + 1} (YAML would silently keep the second) — keep one of them"]
    else:
        assert len(errors) == 1 and errors[0].startswith(f"error: {where}: is a symbolic link to")
        assert f"outside '{sent}'" in errors[0]
    assert sorted(p.name for p in yours.iterdir()) == ["id_ed25519"]  # no card written there
    assert not (sent / "hub").is_dir() or planted == "hub folder"
