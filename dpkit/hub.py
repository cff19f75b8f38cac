"""Push a run to the Hugging Face Hub: the model (or LoRA adapter), tokenizer with its chat
template, generation config, a README.md model card and the training record.

huggingface_hub does the transfer (create_repo, create_branch, one create_commit, so the repo
never shows half a model). Its own retries cover preupload, LFS and downloads but not
create_repo or the commit call, so dpkit retries the whole sequence on transient errors; that is
safe because the commit skips files the Hub already has. The card and loss plot are written to
`<run>/hub/` first, and nothing in the run directory is modified or removed, so a failed push
loses nothing and `dpkit push RUN_DIR` can be run again.

The token is read from the environment variable named by `hub.token_env` at push time (or the
one `hf auth login` stored), handed to huggingface_hub, and held nowhere else: not in the recipe,
the card, logs or any file we write. Where it may go is dpkit.hub_schema's rule: the default Hub,
$HF_ENDPOINT or an endpoint given on the command line, over https (docs/security.md).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from dpkit import __version__, model_card
from dpkit.errors import Problem, RecipeError
from dpkit.hub_schema import (STANDARD_TOKEN_ENVS, HubSection, UserChoice,  # noqa: F401
                              hub_from_dict, token_problems)
from dpkit.run_files import DS_CONFIG, HUB, METRICS, MODEL, RECIPE, SAMPLES, SUMMARY, read_json
from dpkit.rundir import MARKER, refuse_links_out


# --------------------------------------------------------------------------------- the token
def resolve_token(hub: HubSection, user: UserChoice | None = None) -> str:
    """The token, once `token_problems` allows sending it where `hub` says (`user`: what the
    command line said; None: nothing, so only the standard variables and endpoints)."""
    problems = token_problems(hub, user)
    if problems:
        raise RecipeError(problems)
    value = os.environ.get(hub.token_env, "").strip()
    if value:
        return value
    if hub.token_env in STANDARD_TOKEN_ENVS:
        from huggingface_hub import get_token

        if stored := get_token():  # saved by `hf auth login`
            return stored
    fix = f"export {hub.token_env}=<a write token from https://huggingface.co/settings/tokens>"
    if hub.token_env in STANDARD_TOKEN_ENVS:
        fix += " or run `hf auth login`"
    raise RecipeError.one("hub.token_env", f"no Hub token: ${hub.token_env} is not set", fix)


def check_hub(hub: HubSection, user: UserChoice | None = None) -> list[Problem]:
    """Pre-launch checks (for preflight): the token may go where the recipe says, and is there."""
    try:
        resolve_token(hub, user)
    except RecipeError as e:
        return e.problems
    return []


def known_tokens(hub: HubSection | None = None) -> list[str]:
    """Every token this process could hold: the variables and the one `hf auth login` stored."""
    names = [*STANDARD_TOKEN_ENVS, *([hub.token_env] if hub is not None else [])]
    found = [os.environ.get(n, "").strip() for n in names]
    try:  # the file `hf auth login` writes (read directly: get_token may go to the network)
        from huggingface_hub import constants

        found.append(Path(constants.HF_TOKEN_PATH).read_text().strip())
    except (OSError, ValueError, ImportError):  # no stored token: nothing more to redact
        pass
    return [t for t in found if len(t) >= 8]


def _redact(text: str, *tokens: str | None) -> str:
    for token in sorted({t for t in tokens if t} | set(known_tokens()), key=len, reverse=True):
        text = text.replace(token, "<token>")
    return text


# ------------------------------------------------------------------------------ what is pushed
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "vocab.txt", "merges.txt"]
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors",
               "model.safetensors.index.json", *TOKENIZER_FILES]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "generation_config.json",
                 *TOKENIZER_FILES]
TRAINING_FILES = [RECIPE, DS_CONFIG, SUMMARY, METRICS, SAMPLES]
# An allowlist, not "everything in model/": pickles (*.bin, *.pt) and stray files stay local.


class PushError(Exception):
    """The push failed after retries; the run directory is intact."""


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit: str
    url: str
    files: list[str]


def is_adapter(model_dir: Path) -> bool:
    return (model_dir / "adapter_config.json").is_file()


def _select(model_dir: Path, patterns: list[str], say: Callable[[str], None]) -> dict[str, Path]:
    chosen, left = {}, []
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        if any(fnmatch.fnmatch(path.name, pat) for pat in patterns):
            chosen[path.name] = path
        elif path.name not in ("README.md", MARKER):  # ours replaces any card a library wrote
            left.append(path.name)
    if left:
        say(f"[dpkit] not pushed (not weights, config or tokenizer): {', '.join(left)}")
    return chosen


def adapter_base(model_dir: Path, run_dir: Path) -> str | None:
    """The base model of a LoRA adapter: its adapter_config.json, else the run's summary."""
    config = json.loads((model_dir / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        base = (read_json(run_dir / SUMMARY) or {}).get("base_model")
    return base if base and base != "inline config" else None


def _merge_adapter(adapter_dir: Path, base: str | None, out: Path) -> Path:
    """Merge a LoRA adapter into its base model's weights."""
    if base is None:
        raise RecipeError.one("hub.adapter_only", "the adapter names no base model to merge into",
                              "push the adapter alone (hub.adapter_only: true)")
    from peft import PeftModel
    from dpkit import heads

    model = PeftModel.from_pretrained(heads.base_for_adapter(base, adapter_dir, dtype="auto"),
                                      adapter_dir)
    model.merge_and_unload().save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES + ["generation_config.json"]:
        if (adapter_dir / name).is_file() and not (out / name).exists():
            shutil.copy2(adapter_dir / name, out / name)
    return out


def _files_to_push(run_dir: Path, model_dir: Path, hub: HubSection, card_dir: Path,
                   scratch: Path, say: Callable[[str], None]) -> dict[str, Path]:
    adapter = is_adapter(model_dir)
    if adapter and not hub.adapter_only:
        say("[dpkit] merging the LoRA adapter into its base model (hub.adapter_only: false)")
        base = adapter_base(model_dir, run_dir)
        model_dir, adapter = _merge_adapter(model_dir, base, scratch / "merged"), False
    files = _select(model_dir, ADAPTER_FILES if adapter else MODEL_FILES, say)
    weights = [n for n in files if n.endswith(".safetensors")]
    if not weights or ("adapter_config.json" if adapter else "config.json") not in files:
        raise RecipeError.one(str(model_dir), "no safetensors weights and config to push",
                              "point at a run whose model was saved (output.save_model: true)")
    if not any(n in files for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        say("[dpkit] warning: no tokenizer files in the model directory")
    files.update({f"training/{n}": run_dir / n for n in TRAINING_FILES if (run_dir / n).is_file()})
    files["README.md"] = card_dir / "README.md"
    if (card_dir / model_card.LOSS_PLOT).is_file():
        files[model_card.LOSS_PLOT] = card_dir / model_card.LOSS_PLOT
    return files


def _refuse_token_in(files: dict[str, Path], token: str) -> None:
    """Last line of defence: never upload a file that contains the token."""
    needle = token.encode()
    for name, path in files.items():
        if not name.endswith(".safetensors") and needle in path.read_bytes():
            raise PushError(f"refusing to push: {path} contains the Hub token; remove it")


def _refuse_links_out_of_run(run_dir: Path, model_dir: Path, card_dir: Path) -> None:
    """A run directory someone sent may hold a link (model/config.json -> ~/.ssh/id_ed25519)
    that the push would upload, or a hub/ folder linked elsewhere that the card would be written
    into: refuse every file a push reads, uploads or writes that leads out of its folder."""
    # model/ of the run, or a checkpoint's export (outside the run): links stay in its folder
    model_root = run_dir if run_dir in model_dir.parents else model_dir
    refuse_links_out(model_root, [model_dir, *sorted(model_dir.iterdir())],
                     "dpkit push would upload it")
    refuse_links_out(run_dir, [run_dir / n for n in TRAINING_FILES],
                     "dpkit push would read it into the card and upload it")
    writes = [card_dir / n for n in ("README.md", model_card.LOSS_PLOT, "push.json")]
    refuse_links_out(run_dir, writes, "dpkit push would write through it")


# ------------------------------------------------------------------------------------ retrying
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def _is_transient(exc: BaseException | None) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    while exc is not None:  # the client wraps errors (e.g. LFS upload in RuntimeError)
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            return exc.response.status_code in TRANSIENT_STATUS
        if isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return True  # ConnectionError: what hf_xet raises when the network drops
        exc = exc.__cause__ or exc.__context__
    return False


def _with_retries(what: str, fn: Callable, hub: HubSection, token: str,
                  say: Callable[[str], None], sleep: Callable[[float], None] = time.sleep):
    wait = hub.retry_wait_s
    for attempt in range(hub.retries + 1):
        try:
            return fn()
        except Exception as e:
            message = _redact(f"{type(e).__name__}: {e}".splitlines()[0], token)
            if not _is_transient(e) or attempt == hub.retries:
                raise PushError(f"{what} failed: {message}") from None
            say(f"[dpkit] {what}: transient error ({message}); retry {attempt + 1}/"
                f"{hub.retries} in {wait:.1f}s")
            sleep(wait)
            wait = min(wait * 2, 60.0)


# -------------------------------------------------------------------------------------- push
def push_run_dir(run_dir: str | Path, hub: HubSection, *, model_dir: str | Path | None = None,
                 step: int | None = None, commit_message: str | None = None,
                 say: Callable[[str], None] = print,
                 user: UserChoice | None = None) -> PushResult:
    """Push a run directory's model, card and training record (main process only).

    `model_dir` defaults to `<run>/model`; a checkpoint push passes its export and `step`.
    Raises RecipeError for user errors (no token, no model), PushError when the Hub keeps
    failing. The card and plot are left in `<run>/hub/`, the record of the push in
    `<run>/hub/push.json`. `user`: the endpoint and token variable the command line named.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    run_dir = Path(run_dir)
    model_dir = Path(model_dir) if model_dir is not None else run_dir / MODEL
    if not model_dir.is_dir():
        raise RecipeError.one(str(model_dir), "no model directory to push",
                              "push a run that saved its model (output.save_model: true)")
    card_dir = run_dir / HUB
    _refuse_links_out_of_run(run_dir, model_dir, card_dir)  # before the token or the network
    token = resolve_token(hub, user)
    revision = hub.revision or "main"
    base = adapter_base(model_dir, run_dir) if is_adapter(model_dir) else None
    model_card.write_card(run_dir, card_dir, repo_id=hub.repo_id, base_model=base,
                          adapter=is_adapter(model_dir) and hub.adapter_only,
                          license=hub.license, tags=hub.tags, step=step)
    with tempfile.TemporaryDirectory(prefix="dpkit-push-") as scratch:
        files = _files_to_push(run_dir, model_dir, hub, card_dir, Path(scratch), say)
        _refuse_token_in(files, token)
        summary = read_json(run_dir / SUMMARY) or {}
        message = commit_message or (f"dpkit: checkpoint at step {step}" if step is not None else
                                     f"dpkit: {run_dir.resolve().name}, "
                                     f"{summary.get('steps', '?')} steps")

        api = HfApi(endpoint=hub.endpoint, token=token, library_name="dpkit",
                    library_version=__version__)
        say(f"[dpkit] pushing {len(files)} files to {hub.repo_id}@{revision}")
        _with_retries("creating the repository", lambda: api.create_repo(
            hub.repo_id, private=hub.private, exist_ok=True), hub, token, say)
        if revision != "main":
            _with_retries(f"creating branch {revision}", lambda: api.create_branch(
                hub.repo_id, branch=revision, exist_ok=True), hub, token, say)
        # Fresh operations each attempt: the client marks them as used.
        info = _with_retries("uploading", lambda: api.create_commit(
            hub.repo_id, [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                          for name, path in files.items()],
            commit_message=message, revision=revision), hub, token, say)
    result = PushResult(hub.repo_id, revision, info.oid, str(info.commit_url), sorted(files))
    (card_dir / "push.json").write_text(json.dumps({**asdict(result), "time": time.time()},
                                                   indent=2) + "\n")
    say(f"[dpkit] pushed {hub.repo_id}@{revision}: {result.url}")
    return result


def push_on_main(run_dir: str | Path, hub: HubSection, *, is_main: bool,
                 barrier: Callable[[], None] | None = None, say: Callable[[str], None] = print,
                 **kwargs) -> PushResult | None:
    """For the training loop: rank 0 pushes while the other ranks wait in `barrier`.

    A failed push, whatever the cause, is reported and training's result stands (the model is
    on disk): a Hub outage or a card bug never fails a finished run, nor leaves the other ranks
    waiting for a rank 0 that died. The wait must allow for upload time: the training loop
    passes dpkit.distributed.wait_for_main (up to train.single_rank_work_timeout_s), not a
    barrier, which the collective timeout would end during a long upload.
    """
    result = None
    if is_main:
        try:
            result = push_run_dir(run_dir, hub, say=say, **kwargs)
        except Exception as e:
            reason = _redact(f"{type(e).__name__}: {e}", os.environ.get(hub.token_env))
            say(f"[dpkit] push failed, the model is safe in {run_dir}: {reason}\n"
                f"[dpkit] push it later with: dpkit push {run_dir} --repo-id {hub.repo_id}")
    if barrier is not None:
        barrier()
    return result
