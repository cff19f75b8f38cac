"""`dpkit push RUN_DIR --repo-id ORG/NAME`: the run's model and card to the Hugging Face Hub
(the push itself is dpkit/hub.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from dpkit.errors import RecipeError
from dpkit.hub import PushError, push_run_dir
from dpkit.hub_schema import UserChoice, hub_from_dict
from dpkit.overrides import DuplicateKeyError, read_yaml
from dpkit.run_files import RECIPE
from dpkit.rundir import refuse_links_out


def register(subparsers) -> None:
    """Add `dpkit push RUN_DIR --repo-id ID`."""
    p = subparsers.add_parser(
        "push", help="push a run's model and model card to the Hugging Face Hub",
        description="Push RUN_DIR/model (weights or LoRA adapter, config, tokenizer with chat "
                    "template, generation config), a model card and the training record. "
                    "Defaults come from the run's recipe.yaml `hub` section; flags override.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--repo-id", help="Hub repository owner/name")
    p.add_argument("--private", action=argparse.BooleanOptionalAction, default=None,
                   help="create the repository private (default) or public")
    p.add_argument("--revision", help="branch to push to (default main)")
    p.add_argument("--license", help="license id for the card metadata")
    p.add_argument("--tag", action="append", dest="tags", help="extra card tag (repeatable)")
    p.add_argument("--adapter-only", action=argparse.BooleanOptionalAction, default=None,
                   help="LoRA runs: push the adapter (default) or merge it into the base model")
    p.add_argument("--token-env", help="environment variable holding the token (default "
                                       "HF_TOKEN; a run's recipe can't choose another)")
    p.add_argument("--endpoint", help="Hub URL (default $HF_ENDPOINT or huggingface.co); the "
                   "token goes only here, never to an endpoint that only the run's recipe names")
    p.add_argument("--retries", type=int, help="retries after transient errors (default 5)")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=_cmd_push)


def _hub_from_run(run_dir: Path) -> dict:
    """The `hub` section of the run's resolved recipe, if it has one."""
    path = run_dir / RECIPE
    refuse_links_out(run_dir, [path], "dpkit push would read it")
    if not path.is_file():
        return {}
    try:
        section = (read_yaml(path.read_text()) or {}).get("hub")
    except DuplicateKeyError as e:  # which of the two would the push have used?
        raise RecipeError.one(str(path), e.problem, "keep one of them") from None
    except yaml.YAMLError:
        return {}
    return dict(section) if isinstance(section, dict) else {}


def _cmd_push(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise RecipeError.one(args.run_dir, "run directory not found", "check the path")
    raw = _hub_from_run(run_dir)
    flags = {"repo_id": args.repo_id, "private": args.private, "revision": args.revision,
             "license": args.license, "tags": args.tags, "adapter_only": args.adapter_only,
             "token_env": args.token_env, "endpoint": args.endpoint, "retries": args.retries}
    raw.update({k: v for k, v in flags.items() if v is not None})
    if "repo_id" not in raw:
        raise RecipeError.one("--repo-id", "no repository to push to",
                              "pass --repo-id owner/name (or set hub.repo_id in the recipe)")
    hub = hub_from_dict(raw)
    def say(text: str) -> None:  # progress to stderr: stdout carries only the commit URL
        print(text, file=sys.stderr)

    try:
        result = push_run_dir(run_dir, hub, commit_message=args.message, say=say,
                              user=UserChoice(endpoint=args.endpoint, token_env=args.token_env))
    except PushError as e:
        print(f"error: {e}\nThe run directory is unchanged; run the same command again to "
              "retry.", file=sys.stderr)
        return 1
    print(result.url)
    return 0
