"""A new run never overwrites another run's files, and a killed write leaves nothing behind."""

import glob
import logging
import os
import time

from reidzoo.checkpoint import TEMP_PREFIX

logger = logging.getLogger(__name__)


class RunFolderError(RuntimeError):
    """OUTPUT_DIR already holds another run."""


def run_files(output_dir):
    """Files in ``output_dir`` that belong to a training run: checkpoints, ``last_checkpoint``,
    a non-empty ``metrics.json``, ``results.json``.

    Args:
        output_dir (str)
    Returns:
        list[str]: their names, sorted.
    """
    if not output_dir or not os.path.isdir(output_dir):
        return []
    names = {os.path.basename(p) for p in glob.glob(os.path.join(output_dir, "*.pth"))}
    for name in ("last_checkpoint", "results.json"):
        if os.path.exists(os.path.join(output_dir, name)):
            names.add(name)
    metrics = os.path.join(output_dir, "metrics.json")
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        names.add("metrics.json")
    return sorted(names)


def protect_run_folder(output_dir, resume=False, overwrite=False):
    """Refuse to start a new run in a folder that holds another one.

    Args:
        output_dir (str): ``OUTPUT_DIR``.
        resume (bool): ``--resume``: the folder's run is continued, nothing to protect.
        overwrite (bool): ``--overwrite``: move the old run aside first (to
            ``<OUTPUT_DIR>.replaced-<time>``); nothing is deleted.
    Returns:
        str | None: where the old run was moved, if it was.
    Raises:
        RunFolderError: the folder holds a run and neither flag was given.
    """
    if resume:
        return None
    found = run_files(output_dir)
    if not found:
        return None
    folder = os.path.abspath(output_dir)
    shown = ", ".join(found[:8]) + (f", ... ({len(found)} files)" if len(found) > 8 else "")
    if not overwrite:
        raise RunFolderError(
            f"OUTPUT_DIR '{folder}' already holds a run ({shown}); nothing was changed. "
            "Pass --resume to continue it, set another OUTPUT_DIR, or pass --overwrite to move "
            f"the old run to '{folder}.replaced-<time>' first."
        )
    target = f"{folder}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while os.path.exists(target):
        target = f"{folder}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        n += 1
    os.replace(folder, target)
    os.makedirs(folder)
    logger.warning("--overwrite: the run that was in %s moved to %s", folder, target)
    return target


def remove_stale_temporaries(output_dir):
    """Remove temporary files left in ``output_dir`` by a checkpoint write that was killed.

    Args:
        output_dir (str)
    Returns:
        list[str]: the removed paths.
    """
    removed = []
    if not output_dir or not os.path.isdir(output_dir):
        return removed
    for path in glob.glob(os.path.join(output_dir, TEMP_PREFIX + "*")):
        if os.path.isfile(path):
            os.remove(path)
            removed.append(path)
            logger.info("Removed %s, left by an interrupted write", path)
    return removed


def truncate_metrics(output_dir, start_iter):
    """Drop the ``metrics.json`` lines of iterations ``>= start_iter`` (written after the
    checkpoint a run resumes from, and about to be written again), and any line a kill cut off.

    The file is replaced atomically; a writer that holds it open must reopen it.

    Args:
        output_dir (str)
        start_iter (int): the first iteration the resumed run trains.
    Returns:
        int: the number of lines dropped.
    """
    import json

    from reidzoo.checkpoint import atomic_write

    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut off by the kill
        if isinstance(record, dict) and record.get("iteration", -1) < start_iter:
            kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        atomic_write(path, lambda f: f.write("".join(x + "\n" for x in kept)), mode="w")
        logger.info("metrics.json: dropped %d line(s) from iteration %d on", dropped, start_iter)
    return dropped
