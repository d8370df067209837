"""`align push RUN_DIR --stage NAME --repo-id ID [--private]`: upload a stage's `model/` (weights or adapters,
tokenizer, model card) to the Hugging Face Hub, only when asked.

The token comes from the environment only (`HF_TOKEN`), never from a recipe or a stored login. Offline
(`HF_HUB_OFFLINE=1`, or the hub unreachable) or without a token the command refuses with exit 2 and one `error:`
line, before anything is sent; nothing on disk changes in any case (the upload reads the folder as it is).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from align.errors import AlignError, BadInput, print_error

logger = logging.getLogger(__name__)

TOKEN_ENV = "HF_TOKEN"


def build_parser(prog: str = "align push") -> argparse.ArgumentParser:
    """The parser of `align push` (no heavy import: `--help` is instant)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Upload a stage's model/ (weights or adapters, tokenizer, model card) to the Hugging Face Hub. "
        f"The token is read from ${TOKEN_ENV} only.",
    )
    parser.add_argument("run_dir", type=Path, help="the run directory (or a stage's model/ directory)")
    parser.add_argument(
        "--stage", help="the stage whose model to push (default: the last completed one that makes a policy)"
    )
    parser.add_argument("--repo-id", required=True, help="the hub repository, owner/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    return parser


def check_can_push() -> str:
    """The token, where pushing can happen at all; asks the network nothing unless online with a token.

    Raises:
        BadInput: offline, no token, or the hub unreachable.
    """
    from align.runtime import hub_offline, reachable

    if hub_offline():
        raise BadInput(
            "the hub is offline (HF_HUB_OFFLINE is set): nothing pushed",
            hint="unset HF_HUB_OFFLINE on a machine that reaches the hub",
        )
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise BadInput(
            f"no hub token: set {TOKEN_ENV} in the environment (a write token): nothing pushed",
            hint="align reads the token from the environment only, never from a recipe or a stored login",
        )
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not reachable(endpoint):
        raise BadInput(f"the hub ({endpoint}) is not reachable from here: nothing pushed")
    return token


def push(model_dir: Path, repo_id: str, private: bool, token: str, message: str) -> str:
    """Create the repository where it is missing and upload the folder in one commit; return the commit's URL.

    Raises:
        BadInput: the hub refused the token or the repository name (401, 403, or a bad id).
        StageFailed: any other hub error.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    from align.errors import StageFailed

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(model_dir), repo_id=repo_id, repo_type="model",
                                   commit_message=message)  # fmt: skip
    except HFValidationError as exc:
        raise BadInput(f"--repo-id {repo_id}: {str(exc).splitlines()[0]}") from None
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        first = str(exc).splitlines()[0]
        if status in (401, 403):
            raise BadInput(f"the hub refused {TOKEN_ENV} for {repo_id} ({status}): {first}",
                           hint="a write token of the repository's owner") from None  # fmt: skip
        raise StageFailed(f"pushing to {repo_id} failed: {first}") from None
    return str(getattr(commit, "commit_url", commit))


def main(argv: list[str] | None = None, prog: str = "align push") -> int:
    args = build_parser(prog).parse_args(argv)
    from align.saved import find_model

    try:
        saved = find_model(args.run_dir, args.stage, any_model=True)
        if not (saved.path / "README.md").is_file():
            logger.warning("%s has no model card (README.md): saved before align wrote one", saved.path)
        token = check_can_push()
        what = f"{saved.stage} ({saved.kind})" if saved.stage else str(saved.path)
        url = push(saved.path, args.repo_id, args.private, token, f"align: {what}")
    except AlignError as exc:
        return print_error(exc)
    print(f"pushed {saved.path} to https://huggingface.co/{args.repo_id} ({url})")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m align.push"))
