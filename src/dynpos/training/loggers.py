"""wandb without an account: offline when no API key is configured, online with one; one wandb
run per run folder, continued on resume."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger
from rich.console import Console

from dynpos.atomic import write_text


def has_api_key() -> bool:
    """Whether a wandb API key is configured (``WANDB_API_KEY`` or a ``wandb login`` entry in ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def run_id(save_dir: str | os.PathLike) -> str:
    """The wandb run id of a run folder: read from ``<save_dir>/wandb_id``, or made and written
    there the first time, so a resumed run (``resume=auto``) logs into the same wandb run instead
    of a second one (the failure of lightning-hydra-template issue #128)."""
    path = Path(save_dir) / "wandb_id"
    if path.is_file():
        return path.read_text().strip()
    new = uuid.uuid4().hex[:8]  # wandb run ids are short strings of letters and digits
    write_text(path, new)
    return new


def wandb_logger(**kwargs) -> WandbLogger:
    """A Lightning ``WandbLogger`` that never asks for an account.

    Offline when ``WANDB_MODE`` is ``offline``/``disabled`` or no API key is found (``WANDB_API_KEY``
    or ``wandb login``); it then prints where the run is kept and the ``wandb sync`` command that
    uploads it later. Keyword arguments go to ``WandbLogger`` (project, name, group, tags, save_dir);
    the run id comes from :func:`run_id` and the run resumes when it exists (``resume="allow"``).
    """
    mode = os.environ.get("WANDB_MODE", "")
    offline = mode in ("offline", "disabled") or not has_api_key()
    if offline and mode != "disabled":
        os.environ["WANDB_MODE"] = "offline"
        Console(stderr=True, soft_wrap=True).print(
            f"wandb: no API key, logging offline under {kwargs.get('save_dir', '.')}/wandb; "
            "upload later with `wandb sync <that folder>/offline-run-*`"
        )
    logger = WandbLogger(offline=offline, id=run_id(kwargs.get("save_dir", ".")), resume="allow", **kwargs)
    # Lightning passes anonymous=None to wandb.init, and wandb >= 0.19 warns that the setting "has no
    # effect" whenever the key is present: dynpos never sets it, so the key goes.
    logger._wandb_init.pop("anonymous", None)
    return logger
