"""Hub datasets (and local dataset directories) through `datasets.load_dataset`; loading-script datasets, which
`datasets` >= 4 refuses, from their Parquet export (`refs/convert/parquet`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefix_jax import hub
from prefix_jax.data.records import DataError, Table, as_table


PARQUET_REVISION = "refs/convert/parquet"


def _script_refused(e: BaseException) -> bool:
    """`datasets` >= 4 refuses loading scripts (GEM/e2e_nlg, GEM/web_nlg, GEM/dart, EdinburghNLP/xsum)."""
    return "scripts are no longer supported" in str(e).lower()


def hub_origin(name: str, config_name: str | None, split: str) -> str:
    return f"data.name={name!r}" + (f" (data.config_name={config_name!r})" if config_name else "") + \
        f" split {split!r}"


def _hub_dataset(name: str, config_name: str | None, split: str) -> Any:
    """A `datasets.Dataset` of a Hub id or a local dataset directory; loading-script datasets from their
    Parquet export."""
    import datasets

    origin = hub_origin(name, config_name, split)
    local = Path(name).expanduser()
    if not local.is_dir():
        if local.exists():
            raise DataError(f"data.name={name!r} is a file; set data.data_files.train (and .validation) to local files "
                            "and data.name to ''.")
        if hub.looks_local(name):
            raise DataError(f"data.name={name!r}: no such directory (a path is never looked up on the Hub); for "
                            "local files set data.data_files.train / .validation instead.")
        hub.bound_hub_timeouts()
    is_local = local.is_dir()
    source = str(local) if is_local else name
    try:
        if not is_local and not datasets.config.HF_HUB_OFFLINE:
            _reach_hub(name)  # one request that fails fast; `load_dataset` retries each request for minutes
        return datasets.load_dataset(source, config_name or None, split=split)
    except Exception as e:
        if _script_refused(e):
            return parquet_export(name, config_name, split)
        if is_local:
            raise DataError(f"{origin}: the local dataset directory could not be loaded ({hub.describe(e)}); it must "
                            "hold data files `datasets` can read (or a Parquet export: SUBSET/SPLIT/*.parquet), or "
                            "set data.data_files.train / .validation to the files.") from e
        if not hub.unreachable(e):  # the Hub answered: a wrong id, subset or split
            raise DataError(f"{origin} could not be loaded ({hub.describe(e)}); check data.name, data.config_name and "
                            "data.train_split / data.eval_split.") from e
        raise DataError(
            f"{origin} could not be loaded ({hub.hub_error_hint(e)}). Offline? On a machine with internet export each "
            f"split (`datasets.load_dataset({name!r}, split='train').to_json('train.jsonl')`), copy the files here "
            "and set data.data_files.train / data.data_files.validation (and data.source_field / data.target_field)."
        ) from e


def _reach_hub(name: str) -> None:
    import datasets
    from huggingface_hub import HfApi

    HfApi(endpoint=datasets.config.HF_ENDPOINT).dataset_info(name, timeout=hub.hub_timeout_s())


def parquet_export_location(name: str) -> tuple[Any, str, str]:
    """(fsspec filesystem, root to list, prefix of file urls) of a dataset's Parquet export: the Hub's
    `refs/convert/parquet` revision, or a local directory laid out the same way."""
    from urllib.parse import quote

    local = Path(name).expanduser()
    if local.is_dir():
        import fsspec

        return fsspec.filesystem("file"), str(local), str(local)
    from huggingface_hub import HfFileSystem

    root = f"datasets/{name}@{quote(PARQUET_REVISION, safe='')}"
    return HfFileSystem(), root, f"hf://{root}"


def _subdirs(fs: Any, path: str) -> list[str]:
    return sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=True)
                  if entry["type"] == "directory")


def parquet_export(name: str, config_name: str | None, split: str) -> Any:
    """A split of a loading-script dataset from its Parquet export (`{config}/{split}/NNNN.parquet`, or
    `{config}/partial-{split}/` when the Hub converted only part of a large split); columns as the script
    defined them."""
    import datasets

    origin = hub_origin(name, config_name, split)
    try:
        fs, root, url = parquet_export_location(name)
        configs = _subdirs(fs, root)
        config = config_name or (configs[0] if len(configs) == 1 else "default" if "default" in configs else "")
        if config not in configs:
            raise DataError(f"{origin}: a loading-script dataset whose Parquet export ({PARQUET_REVISION}) has the "
                            f"subsets {configs}; set data.config_name to one of them.")
        splits = _subdirs(fs, f"{root}/{config}")
        folder = split if split in splits else f"partial-{split}" if f"partial-{split}" in splits else ""
        if not folder:
            raise DataError(f"{origin}: the Parquet export ({PARQUET_REVISION}) of subset {config!r} has the splits "
                            f"{splits}; set data.train_split / data.eval_split to one of them.")
        if folder != split:
            logging.getLogger(__name__).warning("%s: the Hub converted only part of this split (%s/%s).", origin,
                                                config, folder)
        files = sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(f"{root}/{config}/{folder}",
                                                                              detail=False)
                       if entry.endswith(".parquet"))
        if not files:
            raise DataError(f"{origin}: {config}/{folder} of the Parquet export ({PARQUET_REVISION}) holds no "
                            ".parquet files.")
        urls = [f"{url}/{config}/{folder}/{f}" for f in files]
        return datasets.load_dataset("parquet", data_files={split: urls}, split=split)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"{origin} is a loading-script dataset (which datasets>=4 cannot run) and its Parquet export "
            f"({PARQUET_REVISION}) could not be read ({hub.hub_error_hint(e)}). Export the splits to jsonl on a "
            "machine with internet and set data.data_files={'train': ..., 'validation': ...}."
        ) from e


def hub_table(name: str, config_name: str | None, split: str) -> Table:
    """Rows of a split of a Hub dataset (or local dataset directory), numbered from 1."""
    if not name:
        raise DataError("set data.name (a Hugging Face dataset id) or data.data_files (local files).")
    dataset = _hub_dataset(name, config_name, split)
    return as_table(dataset, hub_origin(name, config_name, split))
