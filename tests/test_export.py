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


@pytest.mark.parametrize("dim", [4, 6])  # 6 is stored 8 wide (embedding.STORAGE_ALIGN): a view, always copied
def test_share_uses_the_trained_tables_memory_only_when_they_are_exactly_the_table(dim):
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_dim=dim, tower_dims=[16, 8])
    model = build_model(cfg, FIELDS, NUM_TASKS, torch.device("cpu")).eval()
    state = model.state_dict()
    table = state["embedding.ebc.embedding_bags.t_user.weight"]
    shared = inference_model_from_state(cfg, FIELDS, NUM_TASKS, state, share=True)
    copied = inference_model_from_state(cfg, FIELDS, NUM_TASKS, state)
    ptr = table.untyped_storage().data_ptr()
    assert (shared.bags[0].weight.untyped_storage().data_ptr() == ptr) == (dim == 4)
    assert copied.bags[0].weight.untyped_storage().data_ptr() != ptr
    ids = _ids(20)
    with torch.no_grad():
        torch.testing.assert_close(shared(ids), copied(ids), rtol=0, atol=0)
        torch.testing.assert_close(shared(ids), torch.sigmoid(model(_kjt_from_ids(ids))), rtol=0, atol=1e-6)


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


# ---------------------------------------------------------------------------------------------------- raw inputs


def test_hash_encoder_is_bit_identical_to_data_preparation():
    import numpy as np
    import pyarrow as pa

    from data_pipeline.raw_inputs import string_key, string_keys, string_salt
    from data_pipeline.vocab import Hasher, splitmix64
    from launch.export import _unsplitmix64
    from pimm_model.export import HashEncoder
    from pimm_model.export import splitmix64 as torch_splitmix64

    rng = np.random.default_rng(0)
    x = rng.integers(-(2**63), 2**63 - 1, 20000, dtype=np.int64)
    x[:6] = [0, -1, 2**63 - 1, -(2**63), 1, 2**40]
    assert np.array_equal(torch_splitmix64(torch.from_numpy(x)).numpy(), splitmix64(x.view(np.uint64)).view(np.int64))
    assert np.array_equal(_unsplitmix64(splitmix64(x.view(np.uint64))), x.view(np.uint64))  # the decoder's inverse
    for seed in (0, 5):
        salt = int(splitmix64(np.array([seed], np.uint64))[0])
        assert string_salt(seed) == salt.to_bytes(8, "little")  # the key vocab.Hasher uses for strings
        for buckets in (1, 7, 1000, 2**40 + 3):
            want = Hasher(buckets, seed=seed).encode(pa.array(x))
            enc = torch.jit.script(HashEncoder(buckets, salt, mix=True))
            got = enc(torch.from_numpy(x), torch.zeros(len(x), dtype=torch.bool)).numpy()
            assert np.array_equal(got, want), (seed, buckets)
            words = pa.array(["", "a", "b", "ätm-機", "x" * 100, None])
            want_s = Hasher(buckets, seed=seed).encode(words)
            keys = torch.from_numpy(string_keys(words, string_salt(seed)))
            got_s = HashEncoder(buckets, salt, mix=False)(keys, torch.tensor([False] * 5 + [True])).numpy()
            assert np.array_equal(got_s, want_s), (seed, buckets)
    assert string_key("a", string_salt(5)) == int(string_keys(pa.array(["a"]), string_salt(5))[0])


def test_vocab_and_identity_encoders():
    from pimm_model.export import IdentityEncoder, VocabEncoder

    enc = torch.jit.script(VocabEncoder(torch.tensor([100, 5, -7, 2**62]), torch.tensor([1, 2, 3, 4]), 5))
    raw = torch.tensor([100, 5, -7, 2**62, 6, -(2**63), 2**63 - 1, 5])
    missing = torch.tensor([False] * 7 + [True])
    assert enc(raw, missing).tolist() == [1, 2, 3, 4, 0, 0, 0, 5]  # unknown -> 0, missing -> null_index
    empty = VocabEncoder(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 0)
    assert empty(torch.tensor([0, 3]), torch.tensor([False, True])).tolist() == [0, 0]
    with pytest.raises(ValueError, match="distinct"):
        VocabEncoder(torch.tensor([1, 1]), torch.tensor([1, 2]), 0)
    ident = torch.jit.script(IdentityEncoder(5))
    assert ident(torch.tensor([0, 4, 5, -1, 3]), torch.tensor([False] * 4 + [True])).tolist() == [0, 4, 0, 0, 0]


def _serving(cfg: ModelConfig):
    from pimm_model.export import HashEncoder, IdentityEncoder, ServingModel, VocabEncoder

    torch.manual_seed(0)
    model = build_model(cfg, FIELDS, NUM_TASKS, torch.device("cpu")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    core = inference_model_from_state(cfg, FIELDS, NUM_TASKS, model.state_dict())
    # user: identity (11 ids); item: a vocabulary of 6 raw ids (+ unknown = 7); ctx: 4 hash buckets + missing (5)
    # is the `ctx` table of 5 rows; hour: identity
    encoders = [IdentityEncoder(11), VocabEncoder(torch.tensor([70, -3, 9, 2**50, 11, 12]),
                                                  torch.tensor([1, 2, 3, 4, 5, 6]), 0),
                HashEncoder(4, 123, mix=True), IdentityEncoder(24)]
    return model, ServingModel(core, encoders, ["click", "conversion", "core_conversion"])


@pytest.mark.parametrize("name", ["pimm", "esmm", "mmoe", "ple", "aitm", "mncm", "shared_bottom", "linear"])
def test_serving_model_script_and_export_agree(name, tmp_path):
    """Every registered model: raw values -> encoded indices -> the eager torchrec model's probabilities, equal in
    eager, TorchScript and torch.export (dynamic batch size), with the missing mask and without it."""
    from pimm_model.export import export_program

    cfg = ModelConfig(name=name, embedding_dim=5, tower_dims=[16, 8], expert_dims=[16])
    model, serving = _serving(cfg)
    g = torch.Generator().manual_seed(2)
    raw = torch.stack([torch.randint(-2, 13, (37,), generator=g),  # some ids out of range
                       torch.tensor([70, -3, 9, 2**50, 11, 12, 8] * 5 + [0, 1]),  # the vocabulary and unknowns
                       torch.randint(-(2**62), 2**62, (37,), generator=g), torch.randint(0, 24, (37,), generator=g)], 1)
    missing = torch.rand(37, 4, generator=g) < 0.1
    export_torchscript(serving, str(tmp_path / "m.pt"))
    export_program(serving, str(tmp_path / "m.pt2"))
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    ids = serving.encode(raw, missing)
    with torch.no_grad():
        expected = torch.sigmoid(model(_kjt_from_ids(ids)))  # (B, T)
        outs = (serving(raw, missing), scripted(raw, missing), program(raw, missing), program(raw[:1], missing[:1]))
        for out in outs:
            assert list(out) == ["click", "conversion", "core_conversion"]
            got = torch.stack(list(out.values()), 1)
            assert (got - expected[: got.shape[0]]).abs().max().item() <= 1e-6
        assert torch.equal(scripted.encode(raw, missing), ids)
        assert torch.equal(scripted(raw)["click"], scripted(raw, torch.zeros_like(missing))["click"])
        assert (scripted.forward_indices(ids) - expected).abs().max().item() <= 1e-6
        kjt = _kjt_from_ids(ids)
        assert (scripted.forward_jagged(kjt.values(), kjt.lengths()) - expected).abs().max().item() <= 1e-6
        jag = scripted.forward_raw_jagged(raw.t().reshape(-1), torch.ones(raw.numel(), dtype=torch.int64),
                                          missing.t().reshape(-1))
        assert (torch.stack(list(jag.values()), 1) - expected).abs().max().item() <= 1e-6
    with pytest.raises(Exception, match="shape"):
        scripted(raw[:, :3])
    with pytest.raises(Exception, match="int64"):
        scripted(raw.int())
