"""Run a function over many cases, in worker processes when asked, with a progress bar."""
from __future__ import annotations

from typing import Any, Callable, Sequence


def parallel_map(fn: Callable[..., Any], items: Sequence[tuple], workers: int, desc: str,
                 progress: bool = True) -> list[Any]:
    """``[fn(*item) for item in items]``, in ``workers`` spawned processes when ``workers > 1``.

    Spawned (not forked) workers, as nnunetv2 uses: safe with torch and threads. ``fn`` must be
    importable (a module-level function). Results keep the order of ``items``; the first worker
    exception is re-raised.
    """
    from tqdm import tqdm

    if workers <= 1 or len(items) <= 1:
        return [fn(*it) for it in tqdm(items, desc=desc, unit="case", disable=not progress)]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(workers, len(items)), mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(fn, *it) for it in items]
        return [f.result() for f in tqdm(futures, desc=desc, unit="case", disable=not progress)]
