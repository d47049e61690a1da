"""Checkpoints: atomic writes, a safe loader, a model that comes back identical."""
import os
import pickle
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp

from checkpoint import load_model, read_checkpoint, save_checkpoint, save_shards
from conftest import tiny_config, tiny_model


def make_ckpt(model):
    from dataclasses import asdict
    return dict(model=model.state_dict(), model_args=asdict(model.config), iter_num=3, config=dict(max_len=64))


def test_model_round_trips_through_a_checkpoint(tmp_path):
    model = tiny_model()
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(make_ckpt(model), path)
    loaded, ck = load_model(path)
    idx = torch.randint(32, (2, 30))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert ck["iter_num"] == 3 and loaded.config == model.config


def test_save_leaves_no_temporary_file_and_replaces_the_old_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(dict(model={}, model_args={}, iter_num=1), path)
    save_checkpoint(dict(model={}, model_args={}, iter_num=2), path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert read_checkpoint(path)["iter_num"] == 2


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(dict(model={}, model_args={}, iter_num=1), path)
    with pytest.raises(TypeError, match="cannot pickle"):
        save_checkpoint(dict(model={}, model_args={}, bad=threading.Lock()), path)  # fails mid-write
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert read_checkpoint(path)["iter_num"] == 1


class Payload:
    """An arbitrary object: unpickling it could run code, so the loader must refuse it."""


def test_a_checkpoint_holding_an_arbitrary_object_is_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save(dict(model={}, model_args={}, payload=Payload()), path)
    with pytest.raises(ValueError, match="refused to load .*evil.pt.*weights_only=True"):
        read_checkpoint(path)


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*\(train one with `python train.py`\)"):
        read_checkpoint(str(tmp_path / "nope.pt"))


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(make_ckpt(tiny_model()), str(path))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_checkpoint(str(path))


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        read_checkpoint(str(path))


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    path = str(tmp_path / "weights.pt")
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a nanocomet checkpoint: missing model, model_args"):
        read_checkpoint(path)


def test_weights_of_the_wrong_shape_name_the_tensor(tmp_path):
    from dataclasses import asdict
    ck = make_ckpt(tiny_model())
    ck["model_args"] = asdict(tiny_config(n_embd=64))
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(ck, path)
    with pytest.raises(ValueError, match=r"tensor compression_emb has shape \(1, 32\), but model_args "
                                         r"describe \(1, 64\)"):
        load_model(path)


def test_a_missing_tensor_is_named(tmp_path):
    ck = make_ckpt(tiny_model())
    del ck["model"]["layers.1.attention.wq.weight"]
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(ck, path)
    with pytest.raises(ValueError, match="tensor layers.1.attention.wq.weight is missing"):
        load_model(path)


def test_bad_model_args_are_a_clear_error(tmp_path):
    ck = make_ckpt(tiny_model())
    ck["model_args"]["stride"] = 100
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(ck, path)
    with pytest.raises(ValueError, match="bad model_args: ModelConfig: stride=100 must be <= chunk_size=8"):
        load_model(path)


# --- a directory of shards (train.py --ckpt_shards) ------------------------------------------------------

def sharded_ckpt(tmp_path, model):
    """A one-process checkpoint whose weights and AdamW states live in a directory of shards beside it."""
    opt = torch.optim.AdamW(model.parameters())
    groups = save_shards(model, opt, str(tmp_path / "ckpt-00000003.dcp"))
    save_checkpoint({**make_ckpt(model), "model": {}, "optimizer": dict(param_groups=groups),
                     "shards": "ckpt-00000003.dcp"}, str(tmp_path / "ckpt.pt"))
    return tmp_path / "ckpt.pt"


def test_a_model_comes_back_identical_from_its_shards(tmp_path):
    model = tiny_model()
    loaded, _ = load_model(str(sharded_ckpt(tmp_path, model)))
    idx = torch.randint(32, (2, 30))
    assert torch.equal(model(idx)[0], loaded(idx)[0])


class RunsCode:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_shards_whose_metadata_would_run_code_are_refused_without_running_it(tmp_path, monkeypatch):
    path = sharded_ckpt(tmp_path, tiny_model())
    (tmp_path / "ckpt-00000003.dcp" / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"refused to load the shards in .*: damaged or unsafe metadata"):
        load_model(str(path))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")  # dcp.save in one process, over the directory
def test_shards_holding_anything_but_tensors_are_refused(tmp_path):
    """dcp.load unpickles non-tensor items with torch.load(weights_only=False): none may be read."""
    path = sharded_ckpt(tmp_path, tiny_model())
    dcp.save({"model": {"note": {"any": "object"}}}, checkpoint_id=str(tmp_path / "ckpt-00000003.dcp"))
    with pytest.raises(ValueError, match="they hold objects other than tensors"):
        load_model(str(path))
