"""Decompression bombs: one size limit for every path that turns stored bytes into pixels (issue 35, item 1).

The corpus: a real 13,441 x 13,441 JPEG of 2.1 MB (180 million pixels, 540 MB decoded as RGB), a JPEG and a PNG whose
headers claim 65,000 x 65,000 (12.7 GB decoded), a truncated JPEG, and a valid 3,000 x 2,000 image under the limit,
among small good images with ImageNet's file names. Every decoder (PIL, the reduced-size JPEG draft, torchvision's
fast JPEG path, a lazily opened PIL image, bytes / path / record values, the segmentation masks, WebDataset samples)
must refuse the same files, from their headers, without decoding them; every command that reads images names them
and goes on (or stops in one line over --max_skipped_fraction), and `mimco-make-shards` leaves them out.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from helpers.scripts import finish_all
from test_training import _script_command, _subprocess_env, stage1_args, stage2_args

from modeling_mimco import MimCoConfig, MimCoModel
from modeling_mimco.configuration_mimco import preset_backbone_kwargs
from modeling_mimco.data.decoding import (
    DEFAULT_MAX_IMAGE_PIXELS,
    UnreadableImageError,
    decode_image,
    jpeg_frame_size,
    pil_size_guard_lifted,
)
from modeling_mimco.data.pipeline import (
    UNREADABLE_KEY,
    ContrastiveExampleTransform,
    PretrainingExampleTransform,
    apply_example_transform,
)
from modeling_mimco.data.segmentation import SegmentationExampleTransform, build_segmentation_transforms, read_mask
from modeling_mimco.data.sources import DataArguments, load_training_images
from modeling_mimco.data.webdataset import shard_pattern, write_shards


BOMB_SIDE = 13_441
CLAIMED_SIDE = 65_000
LARGE_SIZE = (3_000, 2_000)

# the corpus, by role: (class folder, file name)
BOMB = ("n01440764", "n01440764_10026.JPEG")
CLAIMED_JPEG = ("n02102040", "n02102040_1052.JPEG")
CLAIMED_PNG = ("n02979186", "n02979186_4120.png")
TRUNCATED = ("n02979186", "n02979186_20.JPEG")
LARGE = ("n01440764", "n01440764_3198.JPEG")
CLASSES = ("n01440764", "n02102040", "n02979186")
GOOD_PER_CLASS = 5
REFUSED_BY_SIZE = (BOMB, CLAIMED_JPEG, CLAIMED_PNG)
UNREADABLE = (*REFUSED_BY_SIZE, TRUNCATED)


# --- the corpus -------------------------------------------------------------------------------------------------------


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def uniform_grey_jpeg(width: int, height: int) -> bytes:
    """A real baseline JPEG of `width` x `height` mid-grey pixels, written without holding them: one component, and
    every 8x8 block coded as a zero DC difference (2 bits) and an end of block (4 bits). 13,441 x 13,441 pixels take
    2.1 MB; a decoder that is not stopped gives 180 million pixels."""
    quantisation = _segment(0xDB, bytes([0]) + bytes([1] * 64))
    frame = _segment(0xC0, bytes([8]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([1, 1, 0x11, 0]))

    def huffman_table(kind: int, code_length: int) -> bytes:  # one symbol (0), coded as `code_length` zero bits
        counts = [0] * 16
        counts[code_length - 1] = 1
        return _segment(0xC4, bytes([kind, *counts, 0]))

    scan = _segment(0xDA, bytes([1, 1, 0x00, 0, 63, 0]))
    num_bits = -(-width // 8) * -(-height // 8) * 6
    entropy = bytes(num_bits // 8) + (bytes([(1 << (8 - num_bits % 8)) - 1]) if num_bits % 8 else b"")
    tables = huffman_table(0x00, 2) + huffman_table(0x10, 4)
    return b"\xff\xd8" + quantisation + frame + tables + scan + entropy + b"\xff\xd9"


def _encoded(image: PIL.Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _noise(seed: int, size: tuple[int, int] = (48, 40)) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is rewritten to claim `width` x `height`."""
    data = bytearray(_encoded(_noise(1, (16, 16)), "JPEG"))
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def png_claiming(width: int, height: int) -> bytes:
    """A small real PNG whose IHDR chunk is rewritten to claim `width` x `height` (its CRC recomputed)."""
    data = bytearray(_encoded(_noise(2, (16, 16)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def large_valid_jpeg() -> bytes:
    """3,000 x 2,000 smooth gradients: under the limit, decoded by every path."""
    width, height = LARGE_SIZE
    ramp_x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    ramp_y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    pixels = np.stack(np.broadcast_arrays(ramp_x, ramp_y, (ramp_x + ramp_y) / 2), axis=-1).astype(np.uint8)
    return _encoded(PIL.Image.fromarray(pixels), "JPEG", quality=60)


def write_corpus(root: Path, with_png: bool = True) -> Path:
    """`root/<synset>/<ImageNet-named file>`: `GOOD_PER_CLASS` small JPEGs per class, and the corpus's bad and
    large files (the PNG left out with `with_png=False`: a shard holds one image format)."""
    for index, synset in enumerate(CLASSES):
        folder = root / synset
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(GOOD_PER_CLASS):
            (folder / f"{synset}_{1000 + number}.JPEG").write_bytes(_encoded(_noise(10 * index + number), "JPEG"))
    truncated = _encoded(_noise(99, (64, 64)), "JPEG")
    files = {
        BOMB: uniform_grey_jpeg(BOMB_SIDE, BOMB_SIDE),
        CLAIMED_JPEG: jpeg_claiming(CLAIMED_SIDE, CLAIMED_SIDE),
        TRUNCATED: truncated[: len(truncated) // 2],
        LARGE: large_valid_jpeg(),
    }
    if with_png:
        files[CLAIMED_PNG] = png_claiming(CLAIMED_SIDE, CLAIMED_SIDE)
    for (synset, name), data in files.items():
        (root / synset / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("bombs") / "train")


def _name(entry: tuple[str, str]) -> str:
    return entry[1]


def test_the_corpus_is_what_it_claims(corpus):
    bomb = corpus.joinpath(*BOMB)
    assert bomb.stat().st_size < 2.2e6 and jpeg_frame_size(bomb.read_bytes()) == (BOMB_SIDE, BOMB_SIDE)
    with pil_size_guard_lifted():  # a real JPEG: decoded at 1/8 of its size, every pixel mid-grey
        image = PIL.Image.open(bomb)
        image.draft("L", (BOMB_SIDE // 8, BOMB_SIDE // 8))
        pixels = np.asarray(image)
    assert pixels.shape == (-(-BOMB_SIDE // 8),) * 2 and np.abs(pixels.astype(int) - 128).max() <= 1
    with pil_size_guard_lifted():
        assert PIL.Image.open(corpus.joinpath(*CLAIMED_JPEG)).size == (CLAIMED_SIDE, CLAIMED_SIDE)
        assert PIL.Image.open(corpus.joinpath(*CLAIMED_PNG)).size == (CLAIMED_SIDE, CLAIMED_SIDE)
    assert PIL.Image.open(corpus.joinpath(*LARGE)).size == LARGE_SIZE


# --- every decoder ----------------------------------------------------------------------------------------------------

DECODERS = {
    "PIL": {},
    "fast JPEG (torchvision)": {"fast_jpeg": True},
    "reduced-size JPEG (draft)": {"draft_for": (32, 0.08)},
    "reduced-size or fast JPEG": {"draft_for": (32, 0.08), "fast_jpeg": True},
}


def _value_forms(path: Path) -> dict[str, object]:
    """The forms a dataset stores one image in; the bytes alone carry no file name."""
    data = path.read_bytes()
    return {
        "path": str(path),
        "record with a path": {"bytes": None, "path": str(path)},
        "record with bytes": {"bytes": data, "path": str(path)},
        "bytes": data,
    }


def _outcome(value, **options) -> str | None:
    """`None` for a decoded image, else the `UnreadableImageError`'s message."""
    try:
        decode_image(value, **options)
    except UnreadableImageError as error:
        return str(error)
    return None


def _corpus_files(root: Path) -> dict[tuple[str, str], Path]:
    return {(path.parent.name, path.name): path for path in sorted(root.rglob("*")) if path.is_file()}


def _assert_names_the_size(message: str, entry: tuple[str, str], limit: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    side = BOMB_SIDE if entry == BOMB else CLAIMED_SIDE
    assert f"its header gives {side} x {side} = {side * side:,} pixels" in message, message
    assert f"limit of {limit:,} (--max_image_pixels" in message and "not decoded" in message, message


def test_every_decoder_refuses_the_same_files_from_their_headers(corpus, recwarn):
    """All 4 decoders x 4 value forms (+ a lazily opened PIL image) agree: the three size bombs and the truncated
    JPEG are unreadable, every other file (the 3,000 x 2,000 one included) decodes; a size bomb's message names the
    file (when the value has a name), its size and the limit; PIL warns about nothing."""
    files = _corpus_files(corpus)
    assert set(UNREADABLE) <= set(files) and len(files) == len(CLASSES) * GOOD_PER_CLASS + len(UNREADABLE) + 1
    for entry, path in files.items():
        for form, value in _value_forms(path).items():
            for decoder, options in DECODERS.items():
                message = _outcome(value, where="row 7 (0-based) of 'train.parquet'", **options)
                assert (message is not None) == (entry in UNREADABLE), (entry, form, decoder, message)
                if entry in REFUSED_BY_SIZE:
                    _assert_names_the_size(message, entry)
                    expected = (
                        "in row 7 (0-based) of 'train.parquet' (no file name)" if form == "bytes" else _name(entry)
                    )
                    assert expected in message, message
        with pil_size_guard_lifted():
            lazily_opened = PIL.Image.open(path)
        message = _outcome(lazily_opened)
        assert (message is not None) == (entry in UNREADABLE), (entry, "PIL image", message)
        if entry in REFUSED_BY_SIZE:
            _assert_names_the_size(message, entry)
    assert PIL.Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS  # PIL's own guard is back in place
    assert not [warning for warning in recwarn if issubclass(warning.category, PIL.Image.DecompressionBombWarning)]


def test_the_limit_is_the_one_given_not_pils(corpus):
    """A lower limit refuses the 3,000 x 2,000 image on every path; a higher one, or none, lets the 13,441 x 13,441
    JPEG through (decoded at 1/8 of its size for a small crop) although PIL alone refuses it (more than twice
    PIL.Image.MAX_IMAGE_PIXELS); the 65,000 x 65,000 claims stay refused under 200 million pixels."""
    large, bomb = corpus.joinpath(*LARGE), corpus.joinpath(*BOMB)
    for decoder, options in DECODERS.items():
        for value in (str(large), large.read_bytes()):
            message = _outcome(value, max_image_pixels=1_000_000, **options)
            assert message is not None and "3000 x 2000 = 6,000,000 pixels" in message, (decoder, message)
            assert "limit of 1,000,000" in message
            assert _outcome(value, max_image_pixels=6_000_000, **options) is None, decoder
    with pytest.raises(PIL.Image.DecompressionBombError):
        PIL.Image.open(bomb)
    for limit in (None, 0, 200_000_000):
        image = decode_image(str(bomb), draft_for=(32, 0.08), max_image_pixels=limit)
        assert image.size == (-(-BOMB_SIDE // 8),) * 2, limit
    for entry in (CLAIMED_JPEG, CLAIMED_PNG):
        for options in DECODERS.values():
            message = _outcome(str(corpus.joinpath(*entry)), max_image_pixels=200_000_000, **options)
            _assert_names_the_size(message, entry, limit=200_000_000)
    assert PIL.Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS


def _tensor_size(image) -> torch.Tensor:
    """A stand-in augmentation: the decoded image's height and width."""
    if isinstance(image, torch.Tensor):
        return torch.tensor(image.shape[-2:])
    return torch.tensor([image.height, image.width])


def _markers(examples: list[dict]) -> list:
    return [example[UNREADABLE_KEY] for example in examples]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_the_example_transforms_skip_them_in_loader_workers(corpus, tmp_path, num_workers):
    """Stage 1's and stage 2's example transforms over a class folder, in the process or in a DataLoader worker:
    the unreadable files are marked (by name) and skipped; a limit given to the transform reaches the worker."""
    dataset, column = load_training_images(DataArguments(train_dir=str(corpus), cache_dir=str(tmp_path)), 32)
    transforms = {
        "stage 2": PretrainingExampleTransform(_tensor_size, column, draft_for=(32, 0.5)),
        "stage 1": ContrastiveExampleTransform(_tensor_size, _tensor_size, column),
        "stage 2, 1 MP": PretrainingExampleTransform(_tensor_size, column, max_image_pixels=1_000_000),
    }
    for name, transform in transforms.items():
        loader = torch.utils.data.DataLoader(
            apply_example_transform(dataset, transform), batch_size=8, num_workers=num_workers, collate_fn=_markers
        )
        marked = {Path(marker).name for batch in loader for marker in batch if marker is not None}
        expected = {_name(entry) for entry in UNREADABLE} | ({_name(LARGE)} if "1 MP" in name else set())
        assert marked == expected, name


def test_segmentation_masks_and_images_are_held_to_the_limit(corpus, tmp_path):
    """`read_mask` refuses a size bomb before decoding it (the 13,441 x 13,441 JPEG is single-channel: a mask of
    1.4 GB as int64); a segmentation example with a bomb for its image or its mask is an `UnreadableImageError`."""
    for entry, path in _corpus_files(corpus).items():
        for value in (str(path), {"bytes": path.read_bytes(), "path": None}):
            if entry in REFUSED_BY_SIZE:
                with pytest.raises(UnreadableImageError) as error:
                    read_mask(value, "row 2 (0-based) of the dataset")
                _assert_names_the_size(str(error.value), entry)
                assert "(the mask of row 2 (0-based) of the dataset)" in str(error.value)
            elif entry == LARGE:
                with pytest.raises(UnreadableImageError, match="3000 x 2000"):
                    read_mask(value, max_image_pixels=1_000_000)
    small_mask = tmp_path / "mask.png"
    PIL.Image.new("L", (48, 40)).save(small_mask)
    good = corpus / CLASSES[1] / f"{CLASSES[1]}_1000.JPEG"
    _, evaluation = build_segmentation_transforms(32, (0.5,) * 3, (0.5,) * 3)
    example = SegmentationExampleTransform(evaluation, "image", "annotation", num_labels=2)
    assert example.process(str(good), str(small_mask))["labels"].shape == (32, 32)
    for image, mask in ((corpus.joinpath(*BOMB), small_mask), (good, corpus.joinpath(*BOMB))):
        with pytest.raises(UnreadableImageError) as error:
            example.process(str(image), str(mask), row=0)
        _assert_names_the_size(str(error.value), BOMB)


def test_webdataset_shards_leave_them_out_or_their_readers_skip_them(tmp_path, caplog):
    """`write_shards` leaves the size bombs out, each named; with no limit it copies them, and a stream of those
    shards through stage 2's example transform marks them (and the truncated JPEG) unreadable by sample."""
    tree = write_corpus(tmp_path / "train", with_png=False)
    total = len(_corpus_files(tree))
    with caplog.at_level("WARNING"):
        checked = write_shards(str(tree), str(tmp_path / "checked"), num_shards=2)
    left_out = [record.getMessage() for record in caplog.records if "Leaving out" in record.getMessage()]
    assert len(left_out) == 2 and f"Left 2 of the {total} images" in caplog.text
    for entry, message in zip((BOMB, CLAIMED_JPEG), left_out):
        assert _name(entry) in message
        _assert_names_the_size(message, entry)
    kept = list(load_training_images(DataArguments(data_files=[shard_pattern(checked)], streaming=True), 32)[0])
    assert len(kept) == total - 2

    unchecked = write_shards(str(tree), str(tmp_path / "unchecked"), num_shards=2, max_image_pixels=0)
    names = sorted(_corpus_files(tree).values(), key=lambda path: (path.parent.name, path.name))
    keys = {f"{index:09d}": path.name for index, path in enumerate(names)}
    stream, column = load_training_images(DataArguments(data_files=[shard_pattern(unchecked)], streaming=True), 32)
    examples = list(apply_example_transform(stream, PretrainingExampleTransform(_tensor_size, column)))
    assert len(examples) == total
    unreadable = {keys[example["key"]] for example in examples if example[UNREADABLE_KEY] is not None}
    assert unreadable == {_name(entry) for entry in (BOMB, CLAIMED_JPEG, TRUNCATED)}


MEMORY_CHILD = """
import resource, sys
from pathlib import Path
from modeling_mimco.data.decoding import UnreadableImageError, decode_image
from modeling_mimco.data.segmentation import read_mask

files = sorted(path for path in Path(sys.argv[1]).rglob("*") if path.is_file())
payloads = [path.read_bytes() for path in files]
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
refused = 0
for path, data in zip(files, payloads):
    for options in ({}, {"fast_jpeg": True}, {"draft_for": (32, 0.08)}):
        for value in (str(path), data):
            try:
                decode_image(value, **options)
            except UnreadableImageError:
                refused += 1
    try:
        read_mask(data)
    except (UnreadableImageError, OSError, ValueError):
        pass
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
print(refused, growth // 1024)
"""


def test_decoding_the_corpus_keeps_memory_bounded(corpus):
    """Every decoder and the mask reader over the whole corpus in a fresh process: the peak RSS grows by what the
    3,000 x 2,000 image costs (about 30 MiB), not by the 540 MB of the 13,441 x 13,441 JPEG (the fast path decoded it
    before the limit covered it; the mask reader would have made 1.4 GB of it) or the 12.7 GB the claims ask for."""
    completed = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(corpus)],
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    refused, growth_mib = map(int, completed.stdout.split())
    assert refused == len(UNREADABLE) * 3 * 2
    assert growth_mib < 150, f"peak RSS grew by {growth_mib} MiB"


# --- every command that reads images ------------------------------------------------------------------------------

ERROR_LINE = re.compile(r"^\S+: error: ", re.MULTILINE)
TINY = ["--model_preset", "tiny"]
TRAINER_ARGS = ["--report_to", "none", "--use_cpu", "--save_strategy", "no", "--dataloader_pin_memory", "false"]


@pytest.fixture(scope="module")
def command_inputs(tmp_path_factory, corpus) -> dict:
    root = tmp_path_factory.mktemp("bomb_commands")
    backbone = root / "backbone"
    torch.manual_seed(0)
    MimCoModel(MimCoConfig(**preset_backbone_kwargs("tiny"))).save_pretrained(backbone)
    from modeling_mimco.interop.model_folders import save_image_processor

    save_image_processor(backbone, 32, [0.5] * 3, [0.5] * 3)
    images, masks = root / "scenes", root / "masks"
    images.mkdir()
    masks.mkdir()
    for source in sorted((corpus / CLASSES[1]).iterdir())[:4] + [corpus.joinpath(*BOMB)]:
        shutil.copy(source, images / source.name)
        with pil_size_guard_lifted():
            size = PIL.Image.open(source).size if source.name != _name(BOMB) else (16, 16)
        PIL.Image.new("L", size).save(masks / f"{source.stem}.png")
    return {
        "root": root,
        "backbone": backbone,
        "corpus": corpus,
        "jpeg_tree": write_corpus(root / "jpeg_tree", with_png=False),
        "scenes": images,
        "masks": masks,
    }


def _cases(inputs: dict) -> dict[str, tuple[str, list[str]]]:
    root, corpus = inputs["root"], str(inputs["corpus"])

    def own(name: str) -> list[str]:
        return ["--output_dir", str(root / name), "--cache_dir", str(root / f"cache_{name}")]

    source = ["--train_dir", corpus]
    tolerant = ["--max_skipped_fraction", "0.5"]
    probe = ["--model_name_or_path", "random-init", *TINY, *source, "--train_val_split", "0.25"]
    finetune = ["--model_name_or_path", str(inputs["backbone"]), *source, "--train_val_split", "0.25"]
    finetune += ["--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8"]
    segment = ["--model_name_or_path", str(inputs["backbone"]), "--train_dir", str(inputs["scenes"])]
    segment += ["--train_masks_dir", str(inputs["masks"]), "--train_val_split", "0.4", "--num_labels", "2"]
    segment += ["--crop_size", "32", "--decoder_hidden_size", "16", "--max_steps", "2", "--eval_strategy", "no"]
    segment += ["--do_eval"]  # the evaluation images are held to the limit too
    segment += ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--seed", "1"]
    return {
        "stage1": ("run_contrastive_pretraining", stage1_args(root / "stage1", *source, *tolerant, steps=3)),
        "stage1_too_many": (  # 5 batches of 20 (the whole folder): the 100 images the limit waits for
            "run_contrastive_pretraining",
            stage1_args(root / "stage1_too_many", *source, "--per_device_train_batch_size", "20", steps=5),
        ),
        "stage2_lower_limit": (
            "run_pretraining",
            stage2_args(
                inputs["backbone"], root / "stage2", *source, *tolerant, "--max_image_pixels", "1000000", steps=3
            ),
        ),
        "probe": ("run_linear_probe", [*probe, "--probe_epochs", "2", "--knn_k", "3", *own("probe")]),
        "finetune": ("run_finetuning", [*finetune, *TRAINER_ARGS, *own("finetune")]),
        "segment": ("run_semantic_segmentation", [*segment, *TRAINER_ARGS, "--output_dir", str(root / "segment")]),
        "make_shards": (
            "make_shards",
            ["--train_dir", str(inputs["jpeg_tree"]), "--output_dir", str(root / "shards"), "--num_shards", "2"],
        ),
    }


@pytest.fixture(scope="module")
def runs(command_inputs) -> dict[str, subprocess.CompletedProcess]:
    """Every command's script on the corpus, started together (each is mostly imports); `{case: CompletedProcess}`."""
    processes = {
        name: subprocess.Popen(
            _script_command(script, args),
            env=_subprocess_env(TQDM_DISABLE="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (script, args) in _cases(command_inputs).items()
    }
    return finish_all(processes)


def _went_on(result: subprocess.CompletedProcess, name: str) -> str:
    tail = result.stderr[-4000:]
    assert result.returncode == 0, f"{name}: exit code {result.returncode}\n{tail}"
    assert "Traceback" not in result.stderr and not ERROR_LINE.search(result.stderr), f"{name}\n{tail}"
    return result.stdout + result.stderr


def _one_error_line(result: subprocess.CompletedProcess, name: str) -> str:
    tail = result.stderr[-4000:]
    assert result.returncode == 1, f"{name}: exit code {result.returncode}\n{tail}"
    assert "Traceback" not in result.stderr, f"{name}: a traceback\n{tail}"
    lines = [line for line in result.stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1, f"{name}: {len(lines)} error lines\n{tail}"
    return lines[0]


def _skip_warnings(output: str) -> dict[str, str]:
    """`{file name: message}` of the 'Skipping an unreadable image' warnings."""
    found = re.findall(r"Skipping an unreadable image: Unreadable image '([^']+)'(.*)", output)
    return {Path(path).name: message for path, message in found}


def _assert_skipped(output: str, name: str, expected=UNREADABLE, limit: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    skipped = _skip_warnings(output)
    assert set(skipped) == {_name(entry) for entry in expected}, f"{name}: {sorted(skipped)}"
    for entry in REFUSED_BY_SIZE:
        _assert_names_the_size(skipped[_name(entry)], entry, limit)


@pytest.mark.slow
def test_pretraining_names_counts_and_skips_them(runs):
    for name in ("stage1", "stage2_lower_limit"):
        output = _went_on(runs[name], name)
        lower = name == "stage2_lower_limit"
        expected = (*UNREADABLE, LARGE) if lower else UNREADABLE
        _assert_skipped(output, name, expected, 1_000_000 if lower else DEFAULT_MAX_IMAGE_PIXELS)
        if lower:
            assert "3000 x 2000 = 6,000,000 pixels, more than the limit of 1,000,000" in output
        counted = re.search(r"(\d+) of 24 images skipped as unreadable", output)
        assert counted and int(counted.group(1)) >= len(expected), f"{name}: no count\n{output[-3000:]}"


@pytest.mark.slow
def test_too_many_of_them_stop_pretraining_in_one_line(runs):
    line = _one_error_line(runs["stage1_too_many"], "stage1_too_many")
    assert "could not be read, more than the allowed 5.00% set by --max_skipped_fraction" in line, line
    _assert_skipped(runs["stage1_too_many"].stderr, "stage1_too_many")


@pytest.mark.slow
def test_evaluation_and_finetuning_name_and_skip_them(runs):
    output = _went_on(runs["probe"], "probe")
    _assert_skipped(output, "probe")
    counts = [int(count) for count in re.findall(r"(\d+) unreadable images were skipped", output)]
    assert sum(counts) == len(UNREADABLE), counts
    _assert_skipped(_went_on(runs["finetune"], "finetune"), "finetune")


@pytest.mark.slow
def test_segmentation_refuses_a_bomb_in_one_line(runs):
    """`mimco-segment` has no skipping: an unreadable image stops it in one line, a bomb as any other."""
    line = _one_error_line(runs["segment"], "segment")
    assert _name(BOMB) in line, line
    _assert_names_the_size(line, BOMB)


@pytest.mark.slow
def test_make_shards_leaves_them_out(runs, command_inputs):
    output = _went_on(runs["make_shards"], "make_shards")
    left_out = re.findall(r"Leaving out an unreadable image: Unreadable image '([^']+)'(.*)", output)
    assert {Path(path).name for path, _ in left_out} == {_name(BOMB), _name(CLAIMED_JPEG)}, output[-3000:]
    for (_, message), entry in zip(sorted(left_out), (BOMB, CLAIMED_JPEG)):
        _assert_names_the_size(message, entry)
    total = len(_corpus_files(command_inputs["jpeg_tree"]))
    assert f"Left 2 of the {total} images" in output and "--data_files" in runs["make_shards"].stdout
