"""wandb without an account: offline when no API key is configured; one wandb run per run folder, continued
on resume (the failure of lightning-hydra-template issue #128)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger
from rich.console import Console

from dynpos.atomic import write_text


def run_id(save_dir: str | os.PathLike) -> str:
    """The wandb run id of a run folder: ``<save_dir>/wandb_id``, made (8 hex digits) and written the first time."""
    path = Path(save_dir) / "wandb_id"
    if not path.is_file():
        write_text(path, uuid.uuid4().hex[:8])
    return path.read_text().strip()


def wandb_logger(**kwargs) -> WandbLogger:
    """A Lightning ``WandbLogger`` (``kwargs``: project, name, group, tags, save_dir) that never asks for an account.

    Offline when ``WANDB_MODE`` is ``offline``/``disabled`` or no API key is found (``WANDB_API_KEY`` or a
    ``wandb login`` entry in ~/.netrc); it then prints the ``wandb sync`` command that uploads the run later.
    The run id is :func:`run_id`'s, and an existing run continues (``resume="allow"``).
    """
    save_dir = kwargs.get("save_dir", ".")
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    has_key = os.environ.get("WANDB_API_KEY") or netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    mode = os.environ.get("WANDB_MODE", "")
    offline = mode in ("offline", "disabled") or not has_key
    if offline and mode != "disabled":
        os.environ["WANDB_MODE"] = "offline"
        Console(stderr=True, soft_wrap=True).print(f"wandb: no API key, logging offline under {save_dir}/wandb; "
                                                   "upload later with `wandb sync <that folder>/offline-run-*`")
    logger = WandbLogger(offline=offline, id=run_id(save_dir), resume="allow", **kwargs)
    # Lightning passes anonymous=None to wandb.init, and wandb >= 0.19 warns that the setting "has no
    # effect" whenever the key is present: dynpos never sets it, so the key goes.
    logger._wandb_init.pop("anonymous", None)
    return logger
