"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch  # noqa: F401  (before any test: its log handler binds the real stderr, not a test's capture,
import pytest  # which closes when that test ends: a test file run alone then failed on "I/O operation on closed file")
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_module():
    """Every test module runs torch on one intra-op thread (small tensors gain nothing from a second one, and on a
    busy 2-core machine OpenMP's second thread can wait a scheduler quantum per op: tests ran 20-50x slower), and
    gets the count back afterwards (``dtrain fit`` applies ``trainer.cpu_threads`` to this process)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (small convolutions gain nothing from threads, and lose a lot on a busy
    2-core machine); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_digits_teacher(tmp_path_factory, recipe: str):
    """A 4-step digits teacher checkpoint of ``recipes/teacher/<recipe>.yaml`` (16 channels): real weights and
    provenance for the students' from-a-checkpoint tests, not a trained model."""
    from dtrain.cli import main

    out = tmp_path_factory.mktemp(recipe)
    path = Path(__file__).resolve().parents[1] / "recipes" / "teacher" / f"{recipe}.yaml"
    assert main(["fit", str(path), f"out_dir={out}", "trainer.cpu_threads=1", "trainer.progress_bar=false",
                 "logger.mode=disabled", "trainer.accelerator=cpu", "trainer.devices=1", "model.channels=16",
                 "trainer.max_steps=4", "data.batch_size=32", "trainer.sample_every_n_steps=0", "name=t"]) == 0
    return out / "t" / "checkpoints" / "last.ckpt"


@pytest.fixture
def cli_error(capsys):
    """``cli_error(*argv)``: ``dtrain argv`` exits 2 with one stderr line ``dtrain <command>: ...``, returned."""
    from dtrain.cli import main

    def run(*argv: str) -> str:
        capsys.readouterr()
        assert main(list(argv)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"dtrain {argv[0]}: ") and "Traceback" not in err[0], err
        return err[0]

    return run


@pytest.fixture(scope="session")
def fit_spied():
    """``fit_spied(cfg, module, spy)``: ``dtrain fit``'s trainer for the recipe ``cfg`` with the callback ``spy``
    running before its own callbacks (so its hooks see a step before the module's hooks do), fitted on the recipe's
    data; returns the trainer."""

    def run(cfg, module, spy):
        from dtrain.data import build_datamodule
        from dtrain.lit.fit import build_trainer, close_loggers

        trainer = build_trainer(cfg, Path(cfg.out_dir) / cfg.name)
        trainer.callbacks[:0] = [spy]
        try:
            trainer.fit(module, datamodule=build_datamodule(cfg.data, seed=0))
        finally:
            close_loggers(trainer)
        return trainer

    return run


@pytest.fixture(scope="session")
def wandb_records():
    """``wandb_records(run_dir)``: the records of an offline W&B run (``run-*.wandb``: a LevelDB-style log of 32 KiB
    blocks of protobufs; a record, and so a key in the raw bytes, can be split across two blocks)."""
    import struct

    def read(run_dir: Path) -> list:
        from wandb.proto import wandb_internal_pb2 as pb

        data = next(run_dir.glob("run-*.wandb")).read_bytes()
        assert data[:4] == b":W&B"
        out, pos, buf, block = [], 7, b"", 32768
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block tail too short for a header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
            chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
            buf = chunk if kind in (1, 2) else buf + chunk  # FULL / FIRST start a record, MIDDLE / LAST extend it
            if kind in (1, 4):
                rec = pb.Record()
                rec.ParseFromString(buf)
                out.append(rec)
        return out

    return read


@pytest.fixture(scope="session")
def load_tool():
    """``load_tool(name)``: tools/<name>.py as a module (tools/ holds scripts, not a package)."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """recipes/teacher/digits.yaml: discrete VP cosine, v-prediction."""
    return _tiny_digits_teacher(tmp_path_factory, "digits")


@pytest.fixture(scope="session")
def digits_bundle(digits_teacher, tmp_path_factory):
    """The inference bundle of ``digits_teacher`` (dtrain export); a test that changes it works on a copy."""
    from dtrain.cli import main

    out = tmp_path_factory.mktemp("digits_bundle") / "b"
    assert main(["export", str(digits_teacher), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def digits_flow_teacher(tmp_path_factory):
    """recipes/teacher/digits_flow.yaml: the flow schedule, velocity output, time input t."""
    return _tiny_digits_teacher(tmp_path_factory, "digits_flow")
