"""Image downloads (Amazon `imUrl`): parallel threads, retries with backoff, cached on disk as
`<cache_dir>/<item>.<ext>`; a cached file is never fetched again. Failures are returned, not raised."""

from __future__ import annotations

import hashlib
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm


def cache_name(item: str, url: str) -> str:
    ext = os.path.splitext(url.split("?")[0])[1].lower() or ".jpg"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in item)
    if safe != item:  # keep names unique when unsafe characters were replaced
        safe += "-" + hashlib.sha1(item.encode()).hexdigest()[:8]
    return safe + ext


def fetch_one(item: str, url: str, cache_dir: Path, retries: int = 3, timeout: float = 20.0,
              backoff: float = 0.5) -> tuple[str, str | None, str]:
    """(item, local path or None, status: cached | downloaded | failed: reason)."""
    target = cache_dir / cache_name(item, url)
    if target.is_file() and target.stat().st_size > 0:
        return item, str(target), "cached"
    error = ""
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                data = resp.read()
            if not data:
                raise OSError("empty response")
            tmp = target.with_suffix(target.suffix + f".part{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(target)  # atomic: a half-written file is never mistaken for a cached one
            return item, str(target), "downloaded"
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            error = f"{type(exc).__name__}: {exc}"
            if attempt < retries:
                time.sleep(backoff * 2 ** attempt)
    return item, None, f"failed: {error}"


def fetch_images(urls: dict[str, str], cache_dir: str | Path, workers: int = 16, retries: int = 3,
                 progress: bool = True, backoff: float = 0.5) -> tuple[dict[str, str | None], dict]:
    """Download every URL (item -> url); returns item -> local path (None on failure) and stats."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str | None] = {}
    stats = {"cached": 0, "downloaded": 0, "failed": 0, "failed_examples": []}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = [pool.submit(fetch_one, item, url, cache, retries, backoff=backoff)
                for item, url in urls.items()]
        for job in tqdm(jobs, desc="images", unit=" img", disable=not progress):
            item, path, status = job.result()
            paths[item] = path
            kind = status.split(":")[0]
            stats[kind] += 1
            if kind == "failed" and len(stats["failed_examples"]) < 5:
                stats["failed_examples"].append(f"{item} <- {urls[item]}: {status}")
    return paths, stats
