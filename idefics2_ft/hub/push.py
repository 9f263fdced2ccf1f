"""Pushing to the Hugging Face Hub: check write access before any work, push a folder in one commit.

The token comes from ``HF_TOKEN`` or the user's ``huggingface-cli login``; it is passed to
``huggingface_hub`` and never written anywhere by this toolkit.
"""

from __future__ import annotations

import logging
from pathlib import Path

from idefics2_ft.run_folder import MARKER

log = logging.getLogger(__name__)


class HubError(RuntimeError):
    """The Hub cannot be used as configured; the message says why and what to do, in one line."""


def _token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise HubError(
            "export.push_to_hub=true but no Hugging Face token was found: run `huggingface-cli login` "
            "or set HF_TOKEN (a token with write access), or set export.push_to_hub=false."
        )
    return token


def _network_error(err: Exception) -> bool:
    import requests

    names = {type(e).__name__ for e in (err, err.__cause__, err.__context__) if e is not None}
    return isinstance(err, (requests.ConnectionError, requests.Timeout, OSError)) or bool(
        names & {"ConnectError", "ConnectTimeout", "ConnectionError", "OfflineModeIsEnabled"}
    )


def check_write_access(repo_id: str) -> str:
    """Fail fast if ``repo_id`` cannot be written with the available token. Returns the user name.

    Raises:
        HubError: no token, an invalid token, no write access, or no network.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    check_repo_id(repo_id)
    token = _token()
    api = HfApi(token=token)
    try:
        me = api.whoami()
        user = me["name"]
    except HfHubHTTPError as err:
        raise HubError(f"The Hugging Face token was refused ({err.response.status_code}): log in again.") from err
    except Exception as err:
        if _network_error(err):
            raise HubError(f"Cannot reach the Hugging Face Hub ({type(err).__name__}): no network?") from err
        raise
    try:
        api.auth_check(repo_id, write=True)
    except RepositoryNotFoundError:
        namespace = repo_id.split("/")[0] if "/" in repo_id else user
        orgs = {org.get("name") for org in me.get("orgs", []) if isinstance(org, dict)}
        if namespace not in {user, *orgs}:
            raise HubError(
                f"{repo_id} does not exist, and {user} cannot create repos under {namespace!r} (not the user or one "
                f"of its organizations: {sorted(orgs) or 'none'}): choose export.hub.repo_id={user}/NAME."
            ) from None
        log.info("%s does not exist yet; it will be created under %s.", repo_id, namespace)
    except HfHubHTTPError as err:
        raise HubError(f"The token of {user} cannot write to {repo_id} ({err.response.status_code}).") from err
    return user


def check_repo_id(repo_id: str) -> None:
    """Refuse a repo id the Hub would refuse, without asking it (``huggingface_hub``'s own rules).

    Raises:
        HubError: naming the key, the id and what is wrong with it.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        reason = str(err).splitlines()[0]
        raise HubError(
            f"export.hub.repo_id={repo_id!r} is not a valid Hub repo id ({reason}): use USER/NAME."
        ) from None


def push_targets(export_cfg) -> list[str]:
    """The repos an export pushes to: ``hub.repo_id`` for what ``export.adapter_only`` picks, and with
    ``export.with_adapter`` the adapter to ``hub.adapter_repo_id`` (default ``REPO-adapter``) too."""
    repos = [export_cfg.hub.repo_id]
    if export_cfg.with_adapter and not export_cfg.adapter_only:
        repos.append(export_cfg.hub.adapter_repo_id or f"{export_cfg.hub.repo_id}-adapter")
    return repos


def push_folder(folder: Path, repo_id: str, private: bool, commit_message: str, revision: str | None = None) -> str:
    """Create the repo if needed and upload ``folder`` in one commit. Returns the commit URL.

    Raises:
        HubError: no token or no network; the folder stays on disk either way.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=_token())
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            commit_message=commit_message,
            revision=revision,
            ignore_patterns=[MARKER],  # our own note of what wrote the folder, not part of the model
        )
    except Exception as err:
        if _network_error(err):
            raise HubError(
                f"Cannot reach the Hugging Face Hub ({type(err).__name__}); the export stays in {folder}."
            ) from err
        raise
    return str(getattr(info, "commit_url", info))
