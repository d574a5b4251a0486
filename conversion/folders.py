"""Where conversions read from (local folders, or hub ids already in the Hugging Face cache) and how they write
(a folder that appears under its final name only once complete, with a model card saying how it was made)."""

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

logger = logging.getLogger(__name__)


def local_folder(name: str | os.PathLike, what: str) -> Path:
    """A local folder, or a hub id resolved through huggingface_hub's cache (fetched only when the cache lacks it)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{what} {name} is a file; expected a folder or a hub id")
    if str(name).count("/") != 1 or str(name).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{what} {name}: no such folder (and not a hub id of the form owner/name)")
    try:
        return Path(snapshot_download(str(name), local_files_only=True))
    except LocalEntryNotFoundError:
        logger.info("%s %s is not in the Hugging Face cache: downloading it", what, name)
        return Path(snapshot_download(str(name)))


def local_file(repo_id: str, filename: str) -> Path:
    """A file of a hub repository, from the cache when it is there."""
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except LocalEntryNotFoundError:
        logger.info("%s/%s is not in the Hugging Face cache: downloading it", repo_id, filename)
        return Path(hf_hub_download(repo_id, filename))


@contextmanager
def atomic_folder(out: str | os.PathLike):
    """
    Yields a temporary folder next to `out`, renamed to `out` when the block completes and removed if it fails. An
    existing `out` is an error: nothing is overwritten, and an interrupted run leaves no half-written `out`.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; give a new output folder (nothing is overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield partial
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("wrote %s", out)


def write_model_card(folder: Path, title: str, sources: dict[str, str], command: str | None, notes: list[str]) -> None:
    """A short README.md: what the folder is, what it was made from, the exact command, and how to load it."""
    lines = [f"# {title}", "", "Converted by Otter (`otter convert`).", "", "## Sources", ""]
    lines += [f"- {what}: `{where}`" for what, where in sources.items()]
    if command:
        lines += ["", "## Command", "", "```", command, "```"]
    lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
