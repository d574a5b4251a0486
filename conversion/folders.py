"""Where conversions read from (local folders, or hub ids already in the Hugging Face cache) and how they write
(a folder that appears under its final name only once complete, with a model card saying how it was made and under
which license: `otter.model_card`)."""

import difflib
import logging
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub
from huggingface_hub import errors as hub_errors
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from otter.language_models import max_positions
from otter.model_card import source_card

logger = logging.getLogger(__name__)

# what a hub look-up or download that fails raises: file and connection errors (not cached, offline, HTTP errors are
# OSErrors), a malformed id (HFValidationError, a ValueError), and the HTTP client's and Xet's own errors
HUB_ERRORS = (OSError, ValueError) + tuple(getattr(hub_errors, name) for name in ("HTTPError", "XetDownloadError")
                                           if hasattr(hub_errors, name))


def _hub_id(name: str) -> str | None:
    """`name` if it has the form of a hub id (owner/name), else None."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    try:
        huggingface_hub.utils.validate_repo_id(name)
    except hub_errors.HFValidationError:
        return None
    return name


def _no_such_folder(name: str, what: str) -> str:
    """'no such folder', with the deepest folder of `name` that exists and the nearest name in it, if any is close."""
    message = f"{what} {name}: no such folder"
    parts = Path(name).parts
    for depth in range(len(parts) - 1, -1, -1):
        parent = Path(*parts[:depth]) if depth else Path(".")
        if not parent.expanduser().is_dir():
            continue
        try:
            siblings = [child.name for child in parent.expanduser().iterdir() if child.is_dir()]
        except OSError:
            break
        close = difflib.get_close_matches(parts[depth], siblings, n=1)
        if close:
            message += f" (did you mean {parent / close[0] if depth else close[0]}?)"
        elif depth:
            message += f" ({parent} has no {parts[depth]})"
        break
    return message


def _failure(error: BaseException) -> str:
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE=1) and the Hugging Face cache does not hold it"
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def local_folder(name: str | os.PathLike, what: str) -> Path:
    """
    A local folder, or a hub id resolved through huggingface_hub's cache (fetched only when the cache lacks it). A name
    that looks like a path (not of the form owner/name, or whose first folder exists here) and names no folder is
    'no such folder', before any download is attempted; a hub id that fails to download says so, and why.
    """
    text = str(name)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{what} {name} is a file; expected a folder or a hub id")
    hub_id = _hub_id(text)
    if hub_id is not None:
        try:
            return Path(snapshot_download(hub_id, local_files_only=True))
        except LocalEntryNotFoundError:
            pass
    if hub_id is None:
        plainly_a_path = text.startswith((".", "/", "~")) or text.count("/") > 1
        raise FileNotFoundError(_no_such_folder(text, what) + ("" if plainly_a_path else
                                                               " (and not a hub id of the form owner/name)"))
    if Path(hub_id.split("/")[0]).is_dir():  # a local folder with a mistyped name in it, most likely
        raise FileNotFoundError(f"{_no_such_folder(text, what)}; if you meant the hub model {hub_id}, download it "
                                f"first (hf download {hub_id})")
    logger.info("%s %s is not in the Hugging Face cache: downloading it", what, hub_id)
    try:
        return Path(snapshot_download(hub_id))
    except HUB_ERRORS as error:
        raise FileNotFoundError(f"{what} {text}: no local folder {text}, and the hub download failed: "
                                f"{_failure(error)}") from error


def local_file(repo_id: str, filename: str) -> Path:
    """A file of a hub repository, from the cache when it is there."""
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    logger.info("%s/%s is not in the Hugging Face cache: downloading it", repo_id, filename)
    try:
        return Path(hf_hub_download(repo_id, filename))
    except HUB_ERRORS as error:
        raise FileNotFoundError(f"{repo_id}/{filename} is not in the Hugging Face cache, and the hub download failed: "
                                f"{_failure(error)}") from error


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_partials(out: Path) -> None:
    """Removes the partial folders for `out` that processes of this host left when killed (their pid is gone)."""
    prefix = f".{out.name}.partial-{_host()}-"
    for candidate in out.parent.iterdir():
        pid = candidate.name[len(prefix):] if candidate.name.startswith(prefix) else ""
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)) or not candidate.is_dir():
            continue
        try:
            shutil.rmtree(candidate)
        except FileNotFoundError:  # another run removed it first
            continue
        logger.info("removed %s: the partial output of an interrupted run (process %s is gone)", candidate, pid)


def _umask() -> int:
    try:  # Linux: read it without changing it
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^Umask:\s*([0-7]+)", status, re.MULTILINE).group(1), 8)
    except (OSError, AttributeError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def honour_umask(folder: Path) -> None:
    """Gives `folder` and everything in it the permissions mkdir and open give under the umask (some writers, e.g.
    safetensors, create their files private to the user)."""
    umask = _umask()
    os.chmod(folder, 0o777 & ~umask)
    for root, subfolders, files in os.walk(folder):
        for name in subfolders:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


@contextmanager
def atomic_folder(out: str | os.PathLike):
    """
    Yields a temporary folder next to `out`, `.{out.name}.partial-{host}-{pid}`, renamed to `out` when the block
    completes and removed if it fails. An existing `out` is an error: nothing is overwritten, and an interrupted run
    leaves no half-written `out`. A run killed outright (kill -9) leaves its partial folder; the next run for the same
    `out` on the same host removes it (a live process's is never touched, nor, on a shared disk, another host's).
    The folder and its files get the permissions the umask gives, as mkdir and open do (not mkdtemp's 0700).
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; give a new output folder (nothing is overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    partial = out.parent / f".{out.name}.partial-{_host()}-{os.getpid()}"
    try:
        partial.mkdir()
    except FileExistsError:
        raise FileExistsError(f"{partial} exists: this process is already writing {out}") from None
    try:
        yield partial
        honour_umask(partial)
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("wrote %s", out)


def limit_tokenizer_length(tokenizer, text_config) -> None:
    """Sets `tokenizer.model_max_length` to the language model's limit, so that truncation and length warnings use it
    (source tokenizers often leave it unset, i.e. about 1e30)."""
    limit = max_positions(text_config)
    if limit is None:
        logger.warning("the language model's config states no length limit: the tokenizer's model_max_length (%s) is "
                       "kept", tokenizer.model_max_length)
        return
    tokenizer.model_max_length = limit


# licenses of the language models OpenFlamingo's releases were trained with (their hub cards): a converted folder holds
# their weights, under their terms
LANGUAGE_MODEL_LICENSES = {
    "anas-awadalla/mpt-1b-redpajama-200b": "apache-2.0",
    "mosaicml/mpt-1b-redpajama-200b": "apache-2.0",
    "anas-awadalla/mpt-1b-redpajama-200b-dolly": "cc-by-sa-3.0",  # instruction-tuned on Dolly, CC BY-SA 3.0
    "mosaicml/mpt-1b-redpajama-200b-dolly": "cc-by-sa-3.0",
    "togethercomputer/RedPajama-INCITE-Base-3B-v1": "apache-2.0",
    "togethercomputer/RedPajama-INCITE-Instruct-3B-v1": "apache-2.0",
    "anas-awadalla/mpt-7b": "apache-2.0",
    "mosaicml/mpt-7b": "apache-2.0",
}


def known_license(name: str, folder: Path | None = None) -> str | None:
    """The license of a model: from the table above for a known hub id, else its folder's card; None when unknown."""
    if str(name) in LANGUAGE_MODEL_LICENSES:
        return LANGUAGE_MODEL_LICENSES[str(name)]
    card = source_card(folder) if folder is not None else None
    license = card.data.license if card is not None else None
    return license if isinstance(license, str) and license != "other" else None
