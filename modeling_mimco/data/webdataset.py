"""WebDataset shards: tar files of `KEY.jpg` (or `.png`, ...) with an optional `KEY.cls`, read by `datasets`' own
`"webdataset"` builder.

- `expand_braces`: `train-{000000..000099}.tar` -> the 100 names (`datasets` does not expand braces itself).
- `data_files_format`: `"webdataset"` for `.tar` data files, `"parquet"` otherwise; a mix is refused.
- `check_shard_files`: the shard list after expansion, each name or glob checked on the local disk.
- `check_shards_for_workers`: whether the shards can be split between processes and DataLoader workers.
- `webdataset_columns`: the builder's `jpg` / `cls` columns named `image` / `label`, as every other source gives.
- `write_shards`: a folder of class sub-folders (ImageNet's layout) written as shards with the stdlib `tarfile`;
  an image whose header cannot be read or gives more than `--max_image_pixels` pixels is left out, named.

How a stream of shards is split: `datasets.distributed.split_dataset_by_node` hands process `r` of `n` the shards
`r, r + n, r + 2n, ...` when the number of shards is divisible by `n`; inside a process the DataLoader's `m` workers
get that process's shards `w, w + m, ...` (`IterableDataset` assigns whole shards to workers). Every image is thus
read by exactly one worker of one process per epoch. With fewer shards than `n * m` some workers would get no
shard, so `check_shards_for_workers` refuses that; a number of shards not divisible by `n` still works but makes
every process read every shard and keep every `n`-th image, which it warns about.

Imports only `decoding` (the image size limit) and `errors`.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Sequence

import numpy as np

from modeling_mimco.data.decoding import DEFAULT_MAX_IMAGE_PIXELS, UnreadableImageError, open_checked
from modeling_mimco.errors import MimCoError


logger = logging.getLogger(__name__)


SHARD_EXTENSION = ".tar"
PARQUET_EXTENSION = ".parquet"

# `{000000..000099}`: a numeric range; the width of the first bound is kept (zero padding), as `bash` does
_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")
_GLOB_CHARACTERS = ("*", "?", "[")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
"""The image fields a shard's sample may carry, in the order the column is looked for."""
LABEL_FIELDS = ("cls", "cls2", "class", "label")


class ShardError(MimCoError, ValueError):
    """A shard list that cannot be read as asked: a missing shard, a mix of formats, too few shards."""


def expand_braces(pattern: str) -> list[str]:
    """The names a shell would make of `pattern`'s braces: numeric ranges `{000..099}` and lists `{a,b}`.

    Several brace groups multiply out; a pattern without braces is returned alone. Needed because `datasets`
    resolves data files with glob patterns only, where `{` is an ordinary character.
    """
    # the leftmost group first, so names come in the order a shell lists them
    matches = [match for match in (_BRACE_RANGE.search(pattern), _BRACE_LIST.search(pattern)) if match is not None]
    if not matches:
        return [pattern]
    match = min(matches, key=lambda found: found.start())
    if match.re is _BRACE_RANGE:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        values = [str(number).zfill(width) for number in range(int(first), int(last) + step, step)]
    else:
        values = match.group(1).split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for value in values for name in expand_braces(head + value + tail)]


def _patterns(data_files: str | Sequence[str] | dict) -> list[str]:
    if isinstance(data_files, dict):
        return [pattern for files in data_files.values() for pattern in _patterns(files)]
    if isinstance(data_files, str):
        return [data_files]
    return [str(pattern) for pattern in data_files]


def data_files_format(data_files: str | Sequence[str] | dict) -> str:
    """`"webdataset"` when every data file is a `.tar` shard, `"parquet"` when none is.

    Raises:
        ShardError: in one line, when `.tar` shards and other files are mixed.
    """
    patterns = _patterns(data_files)
    shards = [pattern for pattern in patterns if pattern.lower().endswith(SHARD_EXTENSION)]
    if not shards:
        return "parquet"
    others = [pattern for pattern in patterns if not pattern.lower().endswith(SHARD_EXTENSION)]
    if others:
        raise ShardError(
            f"--data_files mixes WebDataset shards ({shards[0]!r}) with other files ({others[0]!r}): give only .tar "
            "shards or only .parquet files."
        )
    return "webdataset"


def _is_remote(pattern: str) -> bool:
    return "://" in pattern


def check_shard_files(data_files: str | Sequence[str] | dict) -> list[str] | dict[str, list[str]]:
    """`data_files` with every brace pattern expanded and every local name checked.

    Returns a list (or a dict of split -> list, as given) of names and globs for `datasets.load_dataset`. Remote
    names (`hf://`, `https://`) are passed on unchecked.

    Raises:
        ShardError: in one line naming the shard, for a local shard that does not exist or a glob that matches no
            file.
    """
    if isinstance(data_files, dict):
        return {split: check_shard_files(files) for split, files in data_files.items()}
    expanded = [name for pattern in _patterns(data_files) for name in expand_braces(pattern)]
    for name in expanded:
        if _is_remote(name):
            continue
        if any(character in name for character in _GLOB_CHARACTERS):
            if not glob.glob(name, recursive=True):
                raise ShardError(f"--data_files: no shard matches {name!r}.")
        elif not os.path.isfile(name):
            raise ShardError(f"--data_files: shard {name!r} does not exist.")
    return expanded


def check_shards_for_workers(num_shards: int, num_processes: int, num_workers: int) -> None:
    """Refuses shards that some DataLoader worker would get none of; warns when processes would read every shard.

    Args:
        num_shards: The stream's shards (`IterableDataset.num_shards`).
        num_processes: Training processes.
        num_workers: DataLoader workers per process (0: the process reads itself, as one worker).

    Raises:
        ShardError: in one line, when `num_shards < num_processes * max(num_workers, 1)`.
    """
    readers = num_processes * max(num_workers, 1)
    if num_shards < readers:
        raise ShardError(
            f"--data_files has {num_shards} shard(s) for {num_processes} process(es) x {max(num_workers, 1)} "
            f"DataLoader worker(s): every worker reads whole shards, so {readers - num_shards} of them would idle. "
            f"Write at least {readers} shards or lower --dataloader_num_workers."
        )
    if num_shards % num_processes:
        logger.warning(
            "--data_files: %d shards do not split evenly between %d processes; every process reads every shard "
            "and keeps every %d-th image. Write a multiple of %d shards to read each shard once.",
            num_shards,
            num_processes,
            num_processes,
            num_processes,
        )


def webdataset_columns(column_names: Iterable[str]) -> dict[str, str]:
    """The renames that give a WebDataset stream the package's columns: the first image field (`jpg`, `png`, ...)
    becomes `image` and the first label field (`cls`, ...) `label`; `__key__` (the sample's name) stays."""
    columns = list(column_names)
    renames = {}
    for wanted, candidates in (("image", IMAGE_EXTENSIONS), ("label", LABEL_FIELDS)):
        if wanted in columns:
            continue
        found = next((column for column in columns if column.lower() in candidates), None)
        if found is not None:
            renames[found] = wanted
    return renames


# --- writing shards -------------------------------------------------------------------------------------------------

_FOLDER_IMAGE_EXTENSIONS = {"." + extension for extension in IMAGE_EXTENSIONS}


def _class_folder_images(train_dir: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folders) and `(image path, class index)` in class, then file-name order."""
    classes = sorted(
        name
        for name in os.listdir(train_dir)
        if not name.startswith(".") and os.path.isdir(os.path.join(train_dir, name))
    )
    if not classes:
        raise ShardError(f"--train_dir {train_dir!r} has no class sub-folders.")
    images = []
    for index, name in enumerate(classes):
        folder = os.path.join(train_dir, name)
        for root, folders, files in os.walk(folder):
            folders.sort()
            for file in sorted(files):
                if os.path.splitext(file)[1].lower() in _FOLDER_IMAGE_EXTENSIONS:
                    images.append((os.path.join(root, file), index))
    return classes, images


def _field_name(image_path: str) -> str:
    """A sample's image field: the file's extension in lower case, `jpeg` written `jpg` (ImageNet's `.JPEG`)."""
    extension = os.path.splitext(image_path)[1].lower().lstrip(".")
    return {"jpeg": "jpg", "tif": "tiff"}.get(extension, extension)


def _header_problem(image_path: str, max_image_pixels: int | None) -> str | None:
    """Why no reader would decode `image_path`, from its header alone (nothing is decoded): not an image, or more
    than `max_image_pixels` pixels (`decoding.check_image_pixels`); `None` when its header is fine."""
    try:
        with open(image_path, "rb") as file:
            open_checked(file, repr(image_path), max_image_pixels, image_path)
    except UnreadableImageError as error:
        return str(error)
    except Exception as error:  # PIL raises many kinds of errors for a file that is no image
        return f"Unreadable image {image_path!r}: {type(error).__name__}: {error}"
    return None


def _readable_images(
    images: list[tuple[str, int]], max_image_pixels: int | None, train_dir: str
) -> list[tuple[str, int]]:
    """`images` without those whose header no reader would decode, each named in a warning, then counted."""
    kept = []
    for image_path, label in images:
        problem = _header_problem(image_path, max_image_pixels)
        if problem is None:
            kept.append((image_path, label))
        else:
            logger.warning("Leaving out an unreadable image: %s", problem)
    if len(kept) < len(images):
        logger.warning(
            "Left %d of the %d images of --train_dir %r out of the shards (named above).",
            len(images) - len(kept),
            len(images),
            train_dir,
        )
    return kept


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    train_dir: str,
    output_dir: str,
    shard_size: int = 1000,
    prefix: str = "train",
    num_shards: int | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_samples: int | None = None,
    seed: int = 42,
) -> list[str]:
    """Writes the images of a class-folder tree (`train_dir/<class>/<image>`) as WebDataset shards.

    Each sample is `NNNNNNNNN.<ext>` (the image file's bytes as they are, no re-encoding) and `NNNNNNNNN.cls` (the
    class index, classes numbered in sorted order); `output_dir/classes.txt` lists the class names, one a line.
    The images are spread over the shards round-robin, in class then file-name order, so every shard holds every
    class and the shards' sizes differ by at most one (processes then see as many batches each).

    Every image's header is read first (nothing is decoded): a file that is no image, or whose header gives more
    than `max_image_pixels` pixels (`None` or 0: no limit), is left out of the shards with a warning naming it,
    since no reader would decode it. A file whose pixels are damaged past the header is copied as it is; the readers
    skip it.

    Args:
        shard_size: Images per shard when `num_shards` is not given.
        num_shards: Exactly this many shards (e.g. a multiple of processes x workers).
        max_samples: Write a subset of at most this many images, drawn with `seed` before any file is opened
            (`np.random.default_rng(seed).permutation(num_images)[:max_samples]`, kept in class then file-name
            order); the class list stays that of the whole tree.

    Returns:
        The shard paths, `output_dir/PREFIX-000000.tar`, ...
    """
    if shard_size < 1:
        raise ShardError(f"--shard_size must be >= 1, got {shard_size}.")
    if num_shards is not None and num_shards < 1:
        raise ShardError(f"--num_shards must be >= 1, got {num_shards}.")
    if max_samples is not None and max_samples < 1:
        raise ShardError(f"--max_samples must be >= 1, got {max_samples}.")
    if not os.path.isdir(train_dir):
        raise ShardError(f"--train_dir {train_dir!r} is not a directory.")
    classes, images = _class_folder_images(train_dir)
    if not images:
        raise ShardError(f"--train_dir {train_dir!r} holds no images.")
    if max_samples is not None:
        chosen = np.sort(np.random.default_rng(seed).permutation(len(images))[:max_samples])
        images = [images[index] for index in chosen]
    images = _readable_images(images, max_image_pixels, train_dir)
    if not images:
        raise ShardError(f"--train_dir {train_dir!r} holds no readable images (see the warnings above).")
    extensions = sorted({_field_name(path) for path, _ in images})
    if len(extensions) > 1:
        # datasets' builder takes its columns from a shard's first samples: one image field for all samples
        raise ShardError(
            f"--train_dir {train_dir!r} mixes image formats ({', '.join(extensions)}): convert them to one first."
        )
    count = num_shards if num_shards is not None else -(-len(images) // shard_size)
    if count > len(images):
        raise ShardError(f"--num_shards {count} is more than the {len(images)} images.")
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, f"{prefix}-{index:06d}.tar") for index in range(count)]
    for shard_index, path in enumerate(paths):
        # written under a temporary name, so an interrupted run leaves no shard that looks whole
        partial = path + ".partial"
        with tarfile.open(partial, "w") as tar:
            for sample_index in range(shard_index, len(images), count):
                image_path, label = images[sample_index]
                key = f"{sample_index:09d}"
                with open(image_path, "rb") as file:
                    data = file.read()
                _add_member(tar, f"{key}.{_field_name(image_path)}", data)
                _add_member(tar, f"{key}.cls", str(label).encode())
        os.replace(partial, path)
    with open(os.path.join(output_dir, "classes.txt"), "w") as file:
        file.write("".join(f"{name}\n" for name in classes))
    return paths


def shard_pattern(paths: Sequence[str]) -> str:
    """The brace pattern naming `write_shards`' shards, e.g. `out/train-{000000..000099}.tar`."""
    first, last = paths[0], paths[-1]
    if len(paths) == 1:
        return first
    stem_first, stem_last = first[: -len(SHARD_EXTENSION)], last[: -len(SHARD_EXTENSION)]
    head = stem_first[:-6]
    return f"{head}{{{stem_first[-6:]}..{stem_last[-6:]}}}{SHARD_EXTENSION}"


__all__ = [
    "ShardError",
    "check_shard_files",
    "check_shards_for_workers",
    "data_files_format",
    "expand_braces",
    "shard_pattern",
    "webdataset_columns",
    "write_shards",
]
