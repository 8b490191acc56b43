"""Bad data input gives one line naming the recipe field or file and what is valid (``InputError``, exit code 2 from
``dtrain fit``), before the run starts where it can be known then: shards that do not fit the model, labels outside
the classes, shards the index does not list, files that are not shards, batches larger than the data, bad in-memory
data fields."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dtrain.cli import main
from dtrain.config import RecipeError, load_recipe
from dtrain.data.stream import WdsStream, resolve_shards
from dtrain.data.wds import WdsDataModule
from dtrain.errors import InputError

R = Path(__file__).resolve().parents[2] / "recipes"
QUIET = ["logger.mode=disabled", "trainer.progress_bar=false", "trainer.cpu_threads=1", "trainer.accelerator=cpu",
         "trainer.devices=1", "trainer.max_steps=2", "data.num_workers=0", "data.batch_size=4"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The digits as shards (3 of them, labels 0..9) with their index.json."""
    out = tmp_path_factory.mktemp("digits")
    assert main(["shards", "digits", "--out", str(out), "--num-shards", "3", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("recipe") / "wds.yaml"
    p.write_text(f"base: [{R / '_base' / 'train.yaml'}, {R / '_base' / 'tiny_wds_digits.yaml'}]\n")
    return p


@pytest.fixture
def fit_error(cli_error):
    """``fit_error(*argv)``: ``dtrain fit argv`` fails with one line (``cli_error``, tests/conftest.py)."""
    return lambda *argv: cli_error("fit", *argv)


def test_shards_without_index_that_do_not_fit_the_model(tmp_path, recipe, fit_error):
    """RGB 16x16 images, no index: fails before the run starts, naming the model field and the shard."""
    np.save(tmp_path / "x.npy", np.zeros((8, 16, 16, 3), np.uint8))
    assert main(["shards", "npy", str(tmp_path / "x.npy"), "--out", str(tmp_path / "s"), "--quiet"]) == 0
    (tmp_path / "s" / "index.json").unlink()
    shard = next((tmp_path / "s").glob("*.tar"))
    err = fit_error(str(recipe), f"data.shards={shard}", "model.num_classes=0", "data.labels=false",
                    f"out_dir={tmp_path / 'run'}", *QUIET)
    assert "model.resolution: must be 16" in err and str(shard) in err
    assert not (tmp_path / "run").exists()


def test_labels_outside_the_index_classes(tmp_path, digits, recipe, fit_error):
    """The index says 5 classes, the labels go up to 9: the first batch stops the run naming the sample and field,
    in the main process and from a DataLoader worker alike."""
    root = tmp_path / "d"
    shutil.copytree(digits, root)
    index = json.loads((root / "index.json").read_text())
    index.update(num_classes=5, classes=index.get("classes", [])[:5])
    (root / "index.json").write_text(json.dumps(index))
    for workers in (0, 1):
        err = fit_error(str(recipe), f"data.shards={root / 'index.json'}", "model.num_classes=5",
                        f"out_dir={tmp_path / f'run{workers}'}", *QUIET, f"data.num_workers={workers}")
        assert "data.shards: sample" in err and "outside the 5 classes" in err and "model.num_classes" in err


def test_labels_of_shards_without_an_index_are_checked_against_the_model(tmp_path, digits, recipe, fit_error):
    """No index: nothing to compare the labels with at start, and a label >= model.num_classes reached the class
    embedding as a 30-line IndexError (a label equal to it silently became the CFG null class). The run now stops
    at the first such sample, naming it and model.num_classes."""
    root = tmp_path / "d"
    shutil.copytree(digits, root)
    (root / "index.json").unlink()
    shards = "::".join(str(s) for s in sorted(root.glob("*.tar")))
    err = fit_error(str(recipe), f"data.shards={shards}", "model.num_classes=5", f"out_dir={tmp_path / 'run'}",
                    *QUIET)
    assert "data.shards: sample" in err and "outside the 5 classes (0..4) of model.num_classes" in err


def test_shards_without_an_index_still_need_labels_for_a_conditional_model(tmp_path, digits, recipe, fit_error):
    """The data.labels check sat after the index lookup: with no index a class-conditional model trained on
    unlabelled batches (cond None) without a word."""
    root = tmp_path / "d"
    shutil.copytree(digits, root)
    (root / "index.json").unlink()
    err = fit_error(str(recipe), f"data.shards={root}/train-{{000000..000002}}.tar", "data.labels=false",
                    f"out_dir={tmp_path / 'run'}", *QUIET)
    assert "data.labels: a class-conditional model (model.num_classes > 0) needs labels" in err
    assert not (tmp_path / "run").exists()


def test_shard_specs_that_read_a_shard_twice_or_join_indexes(tmp_path, digits):
    """Overlapping '::' ranges read some samples twice an epoch; 'a/index.json::b/index.json' was reported as an
    index that does not exist; a file:// URL counted as remote (it needs no index)."""
    pattern = f"{digits}/train-{{000000..000001}}.tar::{digits}/train-{{000001..000002}}.tar"
    with pytest.raises(InputError, match=rf"names the shard {digits}/train-000001.tar twice"):
        resolve_shards(pattern)
    with pytest.raises(InputError, match=r"joins shard indexes; give one index\.json"):
        resolve_shards(f"{digits}/index.json::{digits}/index.json")
    from dtrain.data.shards import find_index

    with pytest.raises(InputError, match="joins shard indexes"):
        find_index(f"{digits}/index.json::{digits}/index.json")
    root = tmp_path / "d"
    shutil.copytree(digits, root)
    (root / "index.json").unlink()
    ss = resolve_shards(f"file://{root}/train-{{000000..000002}}.tar")
    assert ss.total == json.loads((digits / "index.json").read_text())["total"] and ss.index is None
    from dtrain.data.shards import from_arrays, write_shards

    write_shards(from_arrays(np.zeros((4, 8, 8), np.uint8)), root / "u", num_shards=1, progress=False)
    (root / "u" / "index.json").unlink()
    with pytest.raises(InputError, match=rf"data.labels: the shards have no .cls labels \(file://{root}/u/train"):
        WdsDataModule(f"file://{root}/u/train-000000.tar").setup()


def test_folder_classes_are_the_visible_sub_folders_with_images(tmp_path, capsys):
    """A hidden folder (.ipynb_checkpoints) became class 0 and shifted every label; an empty class folder was a class
    with no samples; images beside the class folders were dropped; all without a word."""
    from PIL import Image

    from dtrain.data.shards import from_folder

    for name in ("a/1.png", "b/2.png", ".ipynb_checkpoints/x.png", "a/.ipynb_checkpoints/y.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    data = from_folder(tmp_path)
    assert data.classes == ["a", "b"] and data.labels.tolist() == [0, 1] and len(data) == 2
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match=rf"{tmp_path / 'c'}: a class folder with no image files"):
        from_folder(tmp_path)
    (tmp_path / "c").rmdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "loose.png")
    assert main(["shards", "folder", str(tmp_path), "--out", str(tmp_path / "s"), "--quiet"]) == 2
    assert "1 image file(s) beside the class sub-folders (loose.png, ...)" in capsys.readouterr().err


def test_folder_images_of_another_size_are_named(tmp_path, capsys):
    """`dtrain shards folder` named the odd image by its position only."""
    from PIL import Image

    for name, size in (("a/one.png", 8), ("a/two.png", 8), ("b/odd.png", 9)):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(np.zeros((size, 8), np.uint8)).save(tmp_path / name)
    assert main(["shards", "folder", str(tmp_path), "--out", str(tmp_path / "s"), "--quiet", "--no-shuffle"]) == 2
    err = capsys.readouterr().err
    assert (f"error: {tmp_path / 'b' / 'odd.png'}: shape (9, 8, 3) differs from the first image's (8, 8, 3) "
            f"({tmp_path / 'a' / 'one.png'}); resize them") in err


def test_class_names_of_the_shards_reach_the_bundle(tmp_path, recipe):
    """A shard index's class names (dtrain shards folder: the sub-folders) never reached the checkpoint, so a
    bundle called its classes '0', '1', ... and `dtrain sample --labels red` was refused."""
    from dtrain.data.digits import digits_arrays
    from dtrain.data.shards import from_arrays, write_shards
    from dtrain.export.bundle import load_bundle

    x, y = digits_arrays("test")
    names = [f"digit-{i}" for i in range(10)]
    write_shards(from_arrays(((x[:64, 0] + 1) * 127.5).round().numpy().astype(np.uint8), y[:64].numpy(), names),
                 tmp_path / "s", num_shards=1, progress=False)
    assert main(["fit", str(recipe), f"data.shards={tmp_path / 's' / 'index.json'}", f"out_dir={tmp_path / 'runs'}",
                 "name=t", *QUIET]) == 0
    assert main(["export", str(tmp_path / "runs" / "t" / "checkpoints" / "last.ckpt"), "--out",
                 str(tmp_path / "b")]) == 0
    pipe = load_bundle(tmp_path / "b")
    assert pipe.class_names == names
    assert main(["sample", str(tmp_path / "b"), "--num", "2", "--nfe", "1", "--labels", "digit-3",
                 "--out", str(tmp_path / "g.npz")]) == 0
    assert np.load(tmp_path / "g.npz")["labels"].tolist() == [3, 3]


def test_a_batch_larger_than_the_shards_fails_in_a_dry_run(tmp_path, digits, recipe, fit_error):
    """It passed `--dry-run` and failed seconds into the launch."""
    err = fit_error(str(recipe), f"data.shards={digits / 'index.json'}", "data.batch_size=5000",
                    f"out_dir={tmp_path / 'run'}", *[q for q in QUIET if not q.startswith("data.batch_size")],
                    "--dry-run")
    assert "data.batch_size: 5000 is more than the 1347 samples an epoch of" in err


def test_shard_not_in_the_index(tmp_path, digits, recipe, fit_error):
    root = tmp_path / "d"
    shutil.copytree(digits, root)
    shards = sorted(root.glob("*.tar"))
    stale = shutil.copy(shards[0], root / "train-000099.tar")
    err = fit_error(str(recipe), f"data.shards={shards[0]}::{stale}", f"out_dir={tmp_path / 'run'}", *QUIET)
    assert f"data.shards: {stale} is not listed in the index" in err and "dtrain shards index" in err
    assert not (tmp_path / "run").exists()


def test_not_a_shard(tmp_path, recipe, fit_error):
    png = tmp_path / "some.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    err = fit_error(str(recipe), f"data.shards={png}", f"out_dir={tmp_path / 'run'}", *QUIET)
    assert f"data.shards: {png} cannot be read as a tar shard" in err


def test_unbalanced_braces_and_a_folder_name_the_pattern(tmp_path, digits, recipe, fit_error):
    """An unclosed brace range gave braceexpand's 30-line traceback; a folder was reported as a missing file."""
    bad = f"{digits}/train-{{000000..000002.tar"
    err = fit_error(str(recipe), f"data.shards={bad}", f"out_dir={tmp_path / 'run'}", *QUIET)
    assert f"data.shards: {bad!r} has unbalanced braces" in err
    with pytest.raises(InputError, match="unbalanced braces"):
        resolve_shards(f"{digits}/train-000000.tar::{bad}")
    err = fit_error(str(recipe), f"data.shards={digits}", f"out_dir={tmp_path / 'run'}", *QUIET)
    assert f"data.shards: {digits} is a folder, not a shard file" in err and "index.json" in err
    assert not (tmp_path / "run").exists()


def test_setup_errors_are_input_errors(tmp_path, digits):
    shards = sorted(digits.glob("*.tar"))
    with pytest.raises(InputError, match=r"data.latents: the shards have no \.npy latents"):
        WdsDataModule(str(digits / "index.json"), latents=True).setup()
    empty, first = tmp_path / "empty.tar", shutil.copy(shards[0], tmp_path / "first.tar")  # no index beside
    tarfile.open(empty, "w").close()
    with pytest.raises(InputError, match=f"data.shards: shard {empty} holds no samples"):
        resolve_shards([str(first), str(empty)])
    with pytest.raises(InputError, match=r"data.batch_size: 5000 is more than the \d+ samples per rank"):
        WdsStream(resolve_shards(str(digits / "index.json")), batch_size=5000)


@pytest.mark.parametrize(("recipe", "override", "key", "valid"), [
    ("teacher/digits.yaml", "data.split=bogus", "data.split", "['train', 'test', 'all']"),
    ("teacher/digits.yaml", "data.num_workers=-1", "data.num_workers", "must be >= 0"),
    ("teacher/digits.yaml", "data.batch_size=2000", "data.batch_size", "at most 1347"),
    ("teacher/patches.yaml", "data.num_samples=-1", "data.num_samples", "must be >= 1"),
    ("teacher/patches.yaml", "data.size=512", "data.size", "in [1, 427]"),
    ("teacher/patches.yaml", "data.size=0", "data.size", "in [1, 427]"),
    ("teacher/patches.yaml", "data.size=400", "data.num_samples", "use at most"),
    ("teacher/gmm.yaml", "data.num_samples=0", "data.num_samples", "must be >= 1"),
])
def test_memory_data_fields(recipe, override, key, valid):
    with pytest.raises(RecipeError) as e:
        load_recipe(R / recipe, [override])
    assert e.value.key == key and valid in e.value.reason


def test_a_missing_shard_is_bad_input_and_a_missing_file(tmp_path):
    """``check_inputs`` turns InputErrors of the data code into RecipeErrors naming the key, and only those (an OS
    error is not a data.* message); callers that catch FileNotFoundError still catch a missing shard."""
    from dtrain.data.stream import check_local_shards

    (tmp_path / "a.tar").write_bytes(b"")
    with pytest.raises(InputError, match=r"^data\.shards: shard file not found: .*b\.tar \(and 1 more of 3\)$") as e:
        check_local_shards([str(tmp_path / "a.tar"), str(tmp_path / "b.tar"), f"file:{tmp_path / 'c.tar'}"])
    assert isinstance(e.value, FileNotFoundError)
    check_local_shards([str(tmp_path / "a.tar"), "pipe:cat x.tar", "https://host/y.tar"])  # remote: not checked


def test_a_missing_shard_names_the_command_line_when_it_set_the_key(tmp_path, recipe, fit_error):
    """data.shards given on the command line: the error says "command line", not the recipe file; set in the
    recipe file, the file."""
    pattern = str(tmp_path / "train-{000000..000001}.tar")
    err = fit_error(str(recipe), f"data.shards={pattern}", f"out_dir={tmp_path}", *QUIET)
    assert err.startswith("dtrain fit: command line: data.shards: shard file not found"), err
    child = tmp_path / "child.yaml"
    child.write_text(f"base: [{recipe}]\ndata:\n  shards: '{pattern}'\n")
    err = fit_error(str(child), f"out_dir={tmp_path}", *QUIET)
    assert err.startswith(f"dtrain fit: {child}: data.shards: shard file not found"), err
