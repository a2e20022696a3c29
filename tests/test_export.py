"""TorchScript export: loads and scores without torchrec or fbgemm_gpu, matching the eager torchrec model."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torchrec import KeyedJaggedTensor

from pimm_model.config import ModelConfig
from pimm_model.export import InferenceModel, export_torchscript, inference_model_from_state
from pimm_model.model import MultiTaskTrain, build_model

FIELDS = [("user", 11), ("item", 7), ("ctx", 5), ("hour", 24)]
CFG = ModelConfig(embedding_dim=4, tower_dims=[16, 8])
NUM_TASKS = 3


def _trained_model():
    """A model whose weights moved away from their init by a few training steps."""
    torch.manual_seed(0)
    model = build_model(CFG, FIELDS, NUM_TASKS, torch.device("cpu"))
    train = MultiTaskTrain(model).train()
    train.set_p(0.5)
    opt = torch.optim.Adagrad(train.parameters(), lr=0.1)
    for _ in range(3):
        ids = _ids(32)
        labels = torch.cumprod((torch.rand(32, NUM_TASKS) > 0.4).float(), dim=1)
        batch = type("B", (), dict(features=_kjt_from_ids(ids), labels=labels, weights=torch.ones(32)))
        opt.zero_grad()
        loss, _ = train(batch)
        loss.backward()
        opt.step()
    return model.eval()


def _ids(b: int) -> torch.Tensor:
    return torch.stack([torch.randint(0, num, (b,)) for _, num in FIELDS], dim=1)  # (B, F)


def _kjt_from_ids(ids: torch.Tensor) -> KeyedJaggedTensor:
    # key-major: all rows of field 0, then field 1, ...
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[name for name, _ in FIELDS],
        values=ids.t().reshape(-1),
        lengths=torch.ones(ids.numel(), dtype=torch.int64),
    )


def test_inference_model_matches_eager():
    model = _trained_model()
    inf = inference_model_from_state(CFG, FIELDS, NUM_TASKS, model.state_dict())
    assert isinstance(inf, InferenceModel) and not inf.training
    ids = _ids(50)
    kjt = _kjt_from_ids(ids)
    with torch.no_grad():
        expected = torch.sigmoid(model(kjt))
        got = inf(ids)
        jagged = inf.forward_jagged(kjt.values(), kjt.lengths())
    assert (got - expected).abs().max().item() <= 1e-6
    assert (jagged - got).abs().max().item() <= 1e-6


def test_state_dict_prefix_and_errors():
    model = _trained_model()
    train_state = MultiTaskTrain(model).state_dict()
    inf = inference_model_from_state(CFG, FIELDS, NUM_TASKS, train_state, prefix="model.")
    ids = _ids(4)
    with torch.no_grad():
        assert torch.allclose(inf(ids), torch.sigmoid(model(_kjt_from_ids(ids))), atol=1e-6)
    with pytest.raises(KeyError, match="t_user"):
        inference_model_from_state(CFG, FIELDS, NUM_TASKS, train_state)
    with pytest.raises(ValueError, match="shape"):
        inference_model_from_state(CFG, [("user", 12)] + FIELDS[1:], NUM_TASKS, model.state_dict())


def test_multi_valued_jagged_matches_torchrec():
    model = _trained_model()
    inf = torch.jit.script(inference_model_from_state(CFG, FIELDS, NUM_TASKS, model.state_dict()))
    b = 6
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 4, (len(FIELDS) * b,), generator=g)  # includes empty bags
    values = torch.cat(
        [
            torch.randint(0, num, (int(lengths[i * b : (i + 1) * b].sum()),), generator=g)
            for i, (_, num) in enumerate(FIELDS)
        ]
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[n for n, _ in FIELDS], values=values, lengths=lengths)
    with torch.no_grad():
        expected = torch.sigmoid(model(kjt))
    assert (inf.forward_jagged(values, lengths) - expected).abs().max().item() <= 1e-6


def test_exported_model_loads_without_torchrec(tmp_path):
    model = _trained_model()
    inf = inference_model_from_state(CFG, FIELDS, NUM_TASKS, model.state_dict())
    model_path = tmp_path / "pimm.pt"
    export_torchscript(inf, str(model_path))
    ids = _ids(64)
    kjt = _kjt_from_ids(ids)
    torch.save({"ids": ids, "values": kjt.values(), "lengths": kjt.lengths()}, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        m = torch.jit.load({str(model_path)!r})
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            probs = m(inputs["ids"])
            jagged = m.forward_jagged(inputs["values"], inputs["lengths"])
        assert "torchrec" not in sys.modules, "torchrec was imported"
        assert "fbgemm_gpu" not in sys.modules, "fbgemm_gpu was imported"
        assert list(m.field_names) == {[n for n, _ in FIELDS]!r}
        torch.save({{"probs": probs, "jagged": jagged}}, {str(tmp_path / "out.pt")!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = torch.sigmoid(model(kjt))
    assert out["probs"].shape == (64, NUM_TASKS)
    assert (out["probs"] - expected).abs().max().item() <= 1e-6
    assert (out["jagged"] - out["probs"]).abs().max().item() <= 1e-6
